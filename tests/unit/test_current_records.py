"""Handlers read their batch's records from the broker's context (``current_records``), not
from a ``message: KafkaMessage`` parameter, which FastStream 0.7 resolves in a worker thread
for every batch (fast_depends calls the sync ``Context.use`` through ``anyio.to_thread``)."""

from __future__ import annotations

import importlib
import inspect
import typing

import anyio.to_thread
import pytest
from fast_depends.library import CustomField
from faststream.kafka import KafkaBroker, KafkaMessage, TestKafkaBroker

from shared.runtime.kafka import current_records

SERVICES = ("ingest", "conversation_state", "team_routing", "timeout_sweeper", "metrics")


async def test_a_handler_gets_its_batch_without_a_worker_thread(monkeypatch) -> None:
    broker = KafkaBroker()
    seen: list[list[bytes]] = []

    @broker.subscriber("t", batch=True)
    async def handle(batch: list[bytes]) -> None:
        seen.append([r.value for r in current_records(broker)])

    async def no_threads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a worker thread was asked for")

    async with TestKafkaBroker(broker) as br:
        monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)
        await br.publish_batch(b"a", b"b", topic="t")
        await br.publish_batch(b"c", topic="t")
    assert seen == [[b"a", b"b"], [b"c"]]


async def test_a_context_parameter_would_take_a_worker_thread(monkeypatch) -> None:
    """What the rule above avoids, so that the test above can fail."""
    broker = KafkaBroker()

    @broker.subscriber("t", batch=True)
    async def handle(batch: list[bytes], message: KafkaMessage) -> None:
        pass

    threads: list[object] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(func: typing.Any, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        threads.append(func)
        return await run_sync(func, *args, **kwargs)

    async with TestKafkaBroker(broker) as br:
        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        await br.publish_batch(b"a", topic="t")
    assert threads


def test_current_records_outside_a_handler_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        current_records(KafkaBroker())


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_handler_takes_a_context_parameter(service: str) -> None:
    app = importlib.import_module(f"services.{service}.app").asyncapi_app()
    handlers = [call.handler._original_call for sub in app.broker.subscribers for call in sub.calls]
    assert handlers
    for handler in handlers:
        hints = typing.get_type_hints(handler, include_extras=True)
        for name in inspect.signature(handler).parameters:
            extras = getattr(hints.get(name), "__metadata__", ())
            assert not any(isinstance(m, CustomField) for m in extras), f"{service}: {handler.__name__}({name}) is resolved in a worker thread"
