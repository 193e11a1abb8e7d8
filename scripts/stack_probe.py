"""Python side of scripts/stack.sh: readiness checks and topic creation with the real clients.

Run from the repository root with the project's interpreter, e.g.::

    PYTHONPATH=. .venv/bin/python scripts/stack_probe.py kafka-ready --bootstrap 127.0.0.1:19092
    PYTHONPATH=. .venv/bin/python scripts/stack_probe.py mongo-ready --url mongodb://127.0.0.1:27027/
    PYTHONPATH=. .venv/bin/python scripts/stack_probe.py create-topics --bootstrap 127.0.0.1:19092

Every wait polls against a deadline (short retry pauses, never long fixed sleeps). Exit codes:
0 success, 1 failure or timeout, 3 the watched process (``--pid``) exited while waiting.
Progress goes to stderr; ``create-topics`` reports what it did on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

RETRY_PAUSE_S = 0.25
EXIT_TIMEOUT = 1
EXIT_PROCESS_DIED = 3


class ProcessDied(Exception):
    pass


def _err(msg: str) -> None:
    print(f"stack_probe: {msg}", file=sys.stderr, flush=True)


def _alive(pid: int | None) -> bool:
    """True while ``pid`` runs (a zombie, i.e. exited but not yet reaped, counts as dead)."""
    if pid is None:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # Format: "pid (comm) state ..."; comm may contain spaces or parentheses.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


async def _poll(
    what: str,
    attempt: Callable[[float], Awaitable[str]],
    timeout: float,
    pid: int | None,
) -> str:
    """Call ``attempt(seconds_left)`` until it returns, the deadline passes or ``pid`` dies."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    tries = 0
    while True:
        if not _alive(pid):
            raise ProcessDied(f"{what}: process {pid} exited while waiting")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s (last error: {last_error!r})")
        tries += 1
        try:
            # Cap each attempt so a hung connection cannot eat the whole budget.
            return await asyncio.wait_for(attempt(min(left, 10.0)), timeout=min(left, 15.0))
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = exc
        await asyncio.sleep(min(RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------- Kafka


def _quiet_aiokafka() -> None:
    # While the broker is starting aiokafka logs every refused connection at ERROR level.
    logging.basicConfig(level=logging.CRITICAL)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _admin(bootstrap: str, request_timeout_s: float):
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="hometeam-stack-probe",
        request_timeout_ms=max(1000, int(request_timeout_s * 1000)),
    )


async def _wait_kafka(bootstrap: str, timeout: float, pid: int | None) -> str:
    async def attempt(budget: float) -> str:
        admin = _admin(bootstrap, budget)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            if not cluster.get("brokers"):
                raise RuntimeError("metadata lists no live broker yet")
            await admin.list_topics()
            # A fresh broker creates its offsets topic on the first group request: until its
            # partitions are loaded every consumer's join fails ("GroupCoordinatorNotAvailable",
            # logged as an error by aiokafka in each service), so ready means groups work.
            await admin.find_coordinator("hometeam-stack-probe")
            return f"cluster {cluster.get('cluster_id')}, brokers {len(cluster['brokers'])}"
        finally:
            await admin.close()

    return await _poll(f"kafka at {bootstrap}", attempt, timeout, pid)


async def kafka_ready(bootstrap: str, timeout: float, pid: int | None) -> int:
    _quiet_aiokafka()
    info = await _wait_kafka(bootstrap, timeout, pid)
    _err(f"kafka at {bootstrap} is ready ({info})")
    return 0


async def create_topics(bootstrap: str, timeout: float, replication: int) -> int:
    _quiet_aiokafka()
    from shared.runtime.topics import ensure_topics

    await _wait_kafka(bootstrap, timeout, None)
    try:
        report = await ensure_topics(bootstrap, replication=replication, timeout_s=timeout)
    except (RuntimeError, TimeoutError) as exc:
        _err(str(exc))
        return 1
    for line in report:
        print(line)
    _err(f"{len(report)} topics in place")
    return 0


# --------------------------------------------------------------------------- MongoDB / FerretDB


async def mongo_ready(url: str, timeout: float, pid: int | None) -> int:
    from pymongo import MongoClient

    def ping(budget: float) -> str:
        ms = max(500, int(budget * 1000))
        with MongoClient(
            url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms
        ) as client:
            client.admin.command("ping")
            info = client.server_info()
            return f"version {info.get('version')}" + (
                ", ferretdb " + info["ferretdb"]["version"]
                if isinstance(info.get("ferretdb"), dict) and "version" in info["ferretdb"]
                else ""
            )

    async def attempt(budget: float) -> str:
        return await asyncio.to_thread(ping, budget)

    info = await _poll(f"mongodb at {url}", attempt, timeout, pid)
    _err(f"mongodb-compatible store is ready ({info})")
    return 0


# --------------------------------------------------------------------------- helpers


def port_free(host: str, port: int) -> int:
    """Exit 0 if ``host:port`` can be bound (nothing listens there), 1 otherwise."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return 1
    return 0


def kafka_cluster_id() -> str:
    """A random cluster id the way org.apache.kafka.common.Uuid.randomUuid() makes one."""
    while True:
        raw = uuid.uuid4().bytes
        text = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
        # Kafka reserves the all-zero id and id 1 (metadata topic) and avoids a leading '-'.
        if int.from_bytes(raw, "big") > 1 and not text.startswith("-"):
            return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("kafka-ready", help="wait until the broker answers describe_cluster and finds a group coordinator")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--pid", type=int, help="give up as soon as this process exits")

    p = sub.add_parser("mongo-ready", help="wait until the server answers ping")
    p.add_argument("--url", required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--pid", type=int, help="give up as soon as this process exits")

    p = sub.add_parser("create-topics", help="create/grow the topics of shared.contracts.registry")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--replication-factor", type=int, default=1)

    p = sub.add_parser("port-free", help="exit 0 if the TCP port can be bound")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)

    sub.add_parser("cluster-id", help="print a new random Kafka cluster id")

    args = parser.parse_args(argv)
    try:
        if args.cmd == "kafka-ready":
            return asyncio.run(kafka_ready(args.bootstrap, args.timeout, args.pid))
        if args.cmd == "mongo-ready":
            return asyncio.run(mongo_ready(args.url, args.timeout, args.pid))
        if args.cmd == "create-topics":
            return asyncio.run(
                create_topics(args.bootstrap, args.timeout, args.replication_factor)
            )
        if args.cmd == "port-free":
            return port_free(args.host, args.port)
        if args.cmd == "cluster-id":
            print(kafka_cluster_id())
            return 0
    except ProcessDied as exc:
        _err(str(exc))
        return EXIT_PROCESS_DIED
    except TimeoutError as exc:
        _err(str(exc))
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
