"""``lifecycle.commands.v1``: what the timeout sweeper asks conversation-state to do when a
deadline falls due. Keyed by customer id; one owner (conversation-state)."""

from __future__ import annotations

from pydantic import AwareDatetime

from shared.contracts.common import Identifier
from shared.contracts.envelope import InboundModel


class CloseInactiveConversation(InboundModel):
    """The customer stayed silent past their adaptive inactivity timeout: close the
    conversation (if it is still waiting on them) and free the agent's room."""

    command_id: Identifier
    customer_id: Identifier
    conversation_id: Identifier
    deadline: AwareDatetime


class StartCallback(InboundModel):
    """A callback the customer asked for is due: queue a conversation with priority."""

    command_id: Identifier
    customer_id: Identifier
    callback_id: Identifier
    due_at: AwareDatetime
