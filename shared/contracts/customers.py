"""``customers.commands.v1``: changes to a customer's routing preferences. Key: customer id."""

from __future__ import annotations

from pydantic import AwareDatetime

from shared.contracts.common import Identifier, ReasonText
from shared.contracts.envelope import InboundModel


class OptOutOfHomeTeam(InboundModel):
    """The customer chooses standard care; routing honours it until they opt back in."""

    command_id: Identifier
    customer_id: Identifier
    requested_at: AwareDatetime


class OptInToHomeTeam(InboundModel):
    """The customer returns to their home team."""

    command_id: Identifier
    customer_id: Identifier
    requested_at: AwareDatetime


class ReassignHomeTeam(InboundModel):
    """Explicit reassignment (e.g. the customer moved); the only way a home team changes."""

    command_id: Identifier
    customer_id: Identifier
    team_id: Identifier
    reason: ReasonText
    requested_at: AwareDatetime


class ScheduleCallback(InboundModel):
    """The customer asks to be contacted at a chosen time; then a conversation is queued to
    their home team (or the standard pool when it is closed) with priority."""

    command_id: Identifier
    customer_id: Identifier
    callback_at: AwareDatetime
    requested_at: AwareDatetime
