"""The adaptive inactivity timeout (product brief, rule 7).

A conversation waiting on the customer is closed as inactive after a timeout that follows how
this customer actually replies: a multiple of a high percentile of their past reply gaps,
clamped to configured bounds; a fixed default until there are enough gaps to judge by. So a
slow replier is not cut off, and a customer who has gone does not clog an agent's queue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True, slots=True)
class InactivityPolicy:
    default: timedelta = timedelta(hours=24)
    minimum: timedelta = timedelta(minutes=30)
    maximum: timedelta = timedelta(hours=72)
    multiplier: float = 3.0
    percentile: float = 0.9
    min_samples: int = 3


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 1]) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def inactivity_timeout(reply_gaps_s: Sequence[float], policy: InactivityPolicy) -> timedelta:
    """How long to wait for this customer before closing the conversation as inactive."""
    if len(reply_gaps_s) < policy.min_samples:
        return policy.default
    adaptive = timedelta(seconds=policy.multiplier * percentile(reply_gaps_s, policy.percentile))
    return min(max(adaptive, policy.minimum), policy.maximum)
