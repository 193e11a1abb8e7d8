"""``python -m tools.live``: a live terminal view of a running hometeam (see the package docstring).

    python -m tools.live --metrics-url http://127.0.0.1:8085 --state-url http://127.0.0.1:8083 \\
        --bootstrap 127.0.0.1:19092 [--sim-status .stack/simulator.status.json]

On a terminal it redraws every second; when stdout is not a terminal (a pipe, a log file) it
prints a plain snapshot every few seconds instead. ``--once`` prints one snapshot and exits.
Ctrl-C (or SIGTERM) stops it and leaves the terminal as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

import httpx

from shared.teams import load_directory
from tools.live import EventFeed, collect, render


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.live", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics-url", default="http://127.0.0.1:8085")
    parser.add_argument("--state-url", default="http://127.0.0.1:8083", help="conversation-state (read API)")
    parser.add_argument("--ingest-url", default="http://127.0.0.1:8081", help="shown with the URLs to look at")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"))
    parser.add_argument("--topic-prefix", default=os.environ.get("KAFKA_TOPIC_PREFIX", ""))
    parser.add_argument("--teams", type=Path, default=Path(os.environ.get("TEAMS_CONFIG", "deploy/teams.yaml")))
    parser.add_argument("--sim-status", type=Path, default=None, help="the simulator's --status-file, to show its progress")
    parser.add_argument("--sim-log", default=None, help="shown with the URLs to look at")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between redraws on a terminal")
    parser.add_argument("--plain-interval", type=float, default=5.0, help="seconds between snapshots when not on a terminal")
    parser.add_argument("--queue-interval", type=float, default=5.0, help="seconds between reads of the teams' queues (read API)")
    parser.add_argument("--history", type=int, default=300, help="events to read back per partition at start")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    return parser.parse_args(argv)


def urls(args: argparse.Namespace, example_team: str) -> dict[str, str]:
    m, s, i = args.metrics_url.rstrip("/"), args.state_url.rstrip("/"), args.ingest_url.rstrip("/")
    out = {
        "KPIs (JSON)": f"{m}/kpis   {m}/kpis?group_by=agent",
        "Prometheus": f"{m}/metrics   (every service has /metrics, /healthz, /readyz)",
        "read API": f"{s}/teams/{example_team}/queue   /customers/<id>/conversation   /conversations/<id>",
        "webhooks": f"{i}/webhooks/sms   /webhooks/business-chat   /webhooks/app",
    }
    if args.sim_log:
        out["simulator log"] = args.sim_log
    return out


async def run(args: argparse.Namespace) -> int:
    directory = load_directory(args.teams)
    tty = sys.stdout.isatty()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    feed = EventFeed(args.bootstrap, args.topic_prefix, history=args.history)
    try:
        await asyncio.wait_for(feed.start(), timeout=30)
    except Exception as exc:  # noqa: BLE001 - the view still shows what HTTP gives
        feed.error = f"cannot read {feed.topic}: {type(exc).__name__}"
    token = os.environ.get("READ_API_TOKEN") or None
    from datetime import UTC, datetime

    from shared.teams import is_open

    open_now = [t.id for t in directory.teams if is_open(t, datetime.now(UTC))]
    links = urls(args, (open_now or [directory.teams[0].id])[0])
    out = sys.stdout
    if tty:
        out.write("\x1b[?25l\x1b[2J\x1b[H")  # hide the cursor, clear once
    try:
        async with httpx.AsyncClient() as client:
            last_plain = last_queues = -1e9
            snap = None
            while not stop.is_set():
                await feed.poll(timeout_ms=50)
                read_queues = loop.time() - last_queues >= args.queue_interval
                if read_queues:
                    last_queues = loop.time()
                snap = await collect(
                    directory,
                    metrics=client,
                    state=client,
                    feed=feed,
                    urls=links,
                    metrics_base=args.metrics_url.rstrip("/"),
                    state_base=args.state_url.rstrip("/"),
                    read_token=token,
                    sim_status=args.sim_status,
                    previous=snap,
                    queues=read_queues,
                )
                if args.once:
                    out.write(render(snap, color=False, width=200) + "\n")
                    out.flush()
                    return 0
                now = loop.time()
                if tty:
                    size = shutil.get_terminal_size((120, 50))
                    text = render(snap, color=True, width=size.columns - 1)
                    rows = text.split("\n")[: max(1, size.lines - 1)]
                    out.write("\x1b[H" + "".join(row + "\x1b[K\n" for row in rows) + "\x1b[J")
                    out.flush()
                    wait = args.interval
                elif now - last_plain >= args.plain_interval:
                    last_plain = now
                    out.write(render(snap, color=False, width=200) + "\n" + "-" * 80 + "\n")
                    out.flush()
                    wait = args.interval
                else:
                    wait = args.interval
                try:
                    await asyncio.wait_for(stop.wait(), timeout=wait)
                except TimeoutError:
                    pass
    finally:
        if tty:
            out.write("\x1b[?25h\n")  # show the cursor again
            out.flush()
        await feed.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(run(parse_args(argv)))
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
