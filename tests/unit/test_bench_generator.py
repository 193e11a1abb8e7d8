"""The bench's load generator runs in a child process: if it dies (Ctrl-C signals the whole
process group; a crash), the run learns it at once instead of waiting for ever on the pipe
(it hung there after cleaning up, in asyncio's shutdown)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_a_generator_that_dies_ends_the_wait() -> None:
    # A spec the child cannot plan from: it raises and exits before saying it is ready. In a
    # process of its own, so that a wait that never ends fails this test, not the session.
    code = "import asyncio\nfrom bench.pipeline import run_generator\nasyncio.run(run_generator({}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "EOFError" in done.stderr


@pytest.mark.parametrize("acks_every", [20_000, 10])  # at the end only; every 10 records too
def test_the_generator_names_the_messages_whose_send_failed(monkeypatch: pytest.MonkeyPatch, acks_every: int) -> None:
    # A producer that refuses every seventh record: the step's audit leaves exactly those out
    # (they never entered the system), so the report must name them, not only count them.
    import aiokafka

    from bench import pipeline

    class Producer:
        def __init__(self, **_: Any) -> None:
            self.sent = 0

        async def start(self) -> None: ...

        async def stop(self) -> None: ...

        async def partitions_for(self, topic: str) -> set[int]:
            return {0}

        async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[Any]:
            sent_at.append(time.monotonic())
            future = asyncio.get_running_loop().create_future()
            if self.sent % 7 == 3:
                future.set_exception(RuntimeError("refused"))
            else:
                future.set_result(None)
            self.sent += 1
            return future

    class Pipe:
        def __init__(self) -> None:
            self.said: list[Any] = []

        def send(self, message: Any) -> None:
            self.said.append(message)

        def recv(self) -> float:
            return time.time()

    sent_at: list[float] = []
    naps: list[float] = []  # the generator's sleeps once it has sent
    sleep = asyncio.sleep

    async def recorded_sleep(delay: float, *args: Any) -> Any:
        if sent_at:
            naps.append(delay)
        return await sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", Producer)
    monkeypatch.setattr(pipeline, "check_plan", lambda plan: None)
    monkeypatch.setattr(pipeline, "GENERATOR_ACKS_EVERY", acks_every)
    spec = {"bootstrap": "-", "topic": "t", "customers": 50, "teams": 4, "seed": 1, "step_seed": 2, "tag": "t", "rate": 200.0, "duration": 0.3, "skew": 1.5}
    pipe = Pipe()
    asyncio.run(pipeline._generate(spec, pipe))
    kind, report = pipe.said[-1]
    assert kind == "done" and report["messages"] > 20
    assert report["failed_sends"] == [n for n in range(report["messages"]) if n % 7 == 3]
    assert report["errors"] == len(report["failed_sends"])
    assert len(report["customers"]) == len(report["message_ids"]) == report["messages"]
    # Never before its time; and the generator sleeps at least a tick between wakes (a wake
    # sends every message due by then at once), so that what it costs stays off the system
    # it measures.
    assert all(lag >= 0 for lag in report["lags"])
    assert naps and min(naps) >= pipeline.GENERATOR_TICK_S
    assert len(naps) < report["messages"]
