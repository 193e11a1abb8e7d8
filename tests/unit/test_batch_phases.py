"""``hometeam_batch_phase_seconds``: each mark observes the time since the previous one, and
``waited`` the age of a batch's oldest record."""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from shared.runtime.phases import BatchPhases, NoPhases

from services.conversation_state import handlers
from tests.support import ManualClock




def observed(registry: CollectorRegistry, phase: str) -> tuple[float, float]:
    count = registry.get_sample_value("hometeam_batch_phase_seconds_count", {"phase": phase})
    total = registry.get_sample_value("hometeam_batch_phase_seconds_sum", {"phase": phase})
    return count or 0.0, total or 0.0


def test_each_mark_observes_the_time_since_the_previous_one() -> None:
    registry, clock = CollectorRegistry(), ManualClock(10.0)
    phases = BatchPhases(registry, ["read", "apply"], clock=clock, wall=lambda: 0.0)
    batch = phases.start()
    clock.now = 10.25
    batch.mark("read")
    clock.now = 11.0
    batch.mark("apply")
    assert observed(registry, "read") == (1.0, pytest.approx(0.25))
    assert observed(registry, "apply") == (1.0, pytest.approx(0.75))
    assert observed(registry, "waited") == (0.0, 0.0)  # no records, no age


def test_waited_is_the_age_of_the_oldest_record_when_the_batch_starts() -> None:
    registry = CollectorRegistry()
    phases = BatchPhases(registry, ["read"], clock=ManualClock(), wall=lambda: 1_000.5)
    records = [SimpleNamespace(timestamp=1_000_400), SimpleNamespace(timestamp=1_000_100), SimpleNamespace(timestamp=None)]
    phases.start(records)
    assert observed(registry, "waited") == (1.0, pytest.approx(0.4))


def test_a_record_from_the_future_waited_nothing() -> None:
    registry = CollectorRegistry()
    BatchPhases(registry, ["read"], clock=ManualClock(), wall=lambda: 5.0).start([SimpleNamespace(timestamp=9_000)])
    assert observed(registry, "waited") == (1.0, 0.0)


def test_a_phase_not_declared_is_refused() -> None:
    batch = BatchPhases(CollectorRegistry(), ["read"], clock=ManualClock()).start()
    with pytest.raises(KeyError):
        batch.mark("reed")


def test_without_phases_nothing_is_recorded_and_any_mark_is_taken() -> None:
    batch = NoPhases().start([SimpleNamespace(timestamp=1)])
    batch.mark("anything")


def test_conversation_state_declares_every_phase_it_marks() -> None:
    """A mark of an undeclared phase would fail the batch (KeyError), and a declared phase
    never marked would show an empty histogram: the handler marks each of ``BATCH_PHASES``
    once."""
    source = inspect.getsource(handlers.ConversationConsumer)
    marked = re.findall(r'clock\.mark\("([a-z_]+)"\)', source)
    assert sorted(marked) == sorted(handlers.BATCH_PHASES)
