"""``surveys.responses.v1``: customer satisfaction answers after a conversation. Keyed by
customer id; published by the survey tool, read by the metrics service (CSAT)."""

from __future__ import annotations

from pydantic import AwareDatetime, Field

from shared.contracts.common import Identifier
from shared.contracts.envelope import InboundModel


class SurveyAnswered(InboundModel):
    survey_id: Identifier
    customer_id: Identifier
    conversation_id: Identifier
    score: int = Field(ge=1, le=5, description="1 (very unsatisfied) to 5 (very satisfied)")
    answered_at: AwareDatetime
