"""``python -m tools.simulator``: play a day of hometeam in real time (see the package docstring).

    python -m tools.simulator --seed 42 --rate 3 --duration 300 \\
        --ingest-url http://127.0.0.1:8081 --bootstrap 127.0.0.1:19092
    python -m tools.simulator --seed 42 --rate 3 --duration 300 --dry-run   # print the plan only

Webhook secrets come from the same variables the services read (TWILIO_AUTH_TOKEN,
BUSINESS_CHAT_JWT_SECRET, APP_JWT_SECRET, PUBLIC_BASE_URL; the audiences too), with the
local-only defaults of scripts/run.sh. The team directory is TEAMS_CONFIG (or --teams), the
same file the services read: agent ids and regions must match theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from shared.teams import load_directory
from tools.simulator.channels import Secrets
from tools.simulator.runner import Simulator
from tools.simulator.script import WEBHOOK_SHARE, build_script, describe, summary, teams_open


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.simulator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=42, help="fixes every choice of the plan (default 42)")
    parser.add_argument("--rate", type=float, default=2.0, help="customer messages per second, on average and at most overall (default 2)")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds to run; the simulator stops by itself (default 300)")
    parser.add_argument("--ingest-url", default="http://127.0.0.1:8081", help="where ingest's webhooks listen")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"), help="Kafka bootstrap servers")
    parser.add_argument("--topic-prefix", default=os.environ.get("KAFKA_TOPIC_PREFIX", ""), help="prefix of every topic name (as the services' KAFKA_TOPIC_PREFIX)")
    parser.add_argument("--teams", type=Path, default=Path(os.environ.get("TEAMS_CONFIG", "deploy/teams.yaml")), help="the team directory (TEAMS_CONFIG)")
    parser.add_argument("--webhook-share", type=float, default=WEBHOOK_SHARE, help=f"share of customer messages sent through the signed webhooks (default {WEBHOOK_SHARE})")
    parser.add_argument("--pace", type=float, default=1.0, help="multiplies agents' and customers' delays (2 = twice as slow)")
    parser.add_argument("--status-file", type=Path, default=None, help="keep a JSON status here (read by python -m tools.live --sim-status)")
    parser.add_argument("--start", default=None, help="ISO time the plan starts at (default now; for --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan as JSON lines and exit")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    if not 0 <= args.webhook_share <= 1:
        parser.error("--webhook-share must be between 0 and 1")
    return args


async def run(args: argparse.Namespace) -> int:
    directory = load_directory(args.teams)
    start = datetime.fromisoformat(args.start) if args.start else datetime.now(UTC)
    script = build_script(directory, seed=args.seed, rate=args.rate, duration=args.duration, start=start, webhook_share=args.webhook_share)
    if args.dry_run:
        print(json.dumps(summary(script)))
        for action in script.actions:
            print(json.dumps(describe(action)))
        return 0
    opened = [t for t, is_open in teams_open(directory, start) if is_open]
    closed = [t for t, is_open in teams_open(directory, start) if not is_open]
    print(f"sim teams open now: {', '.join(opened) or 'none'}; closed: {', '.join(closed) or 'none'}", flush=True)
    print("sim plan: " + json.dumps(summary(script)), flush=True)
    simulator = Simulator(
        script,
        directory,
        bootstrap=args.bootstrap,
        ingest_url=args.ingest_url,
        topic_prefix=args.topic_prefix,
        secrets=Secrets.from_env(),
        status_file=args.status_file,
        pace=args.pace,
        webhook_share=args.webhook_share,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, simulator.stop.set)
    await simulator.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(run(parse_args(argv)))
    except BrokenPipeError:  # --dry-run | head
        return 0


if __name__ == "__main__":
    sys.exit(main())
