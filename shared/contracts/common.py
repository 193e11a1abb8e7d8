"""Value types shared by several topic families."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

# Identifiers are short opaque strings; the pattern keeps store operators ("$...") and
# control characters out, whatever the caller sends.
Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@+\-]*$"),
]
# A channel address: a phone number, an opaque business-chat source id or an app account id.
Address = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\s$]\S*$")]
MAX_TEXT_CHARS = 4096
MessageText = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
ReasonText = Annotated[str, StringConstraints(max_length=500)]
Priority = Annotated[int, Field(ge=0, le=9, description="0 is normal; higher is served first")]


class Channel(StrEnum):
    SMS = "sms"
    BUSINESS_CHAT = "business_chat"
    APP = "app"


class Direction(StrEnum):
    INBOUND = "inbound"  # customer to company
    OUTBOUND = "outbound"  # agent to customer


class PoolKind(StrEnum):
    HOME_TEAM = "home_team"
    STANDARD = "standard"


class WaitingOn(StrEnum):
    AGENT = "agent"
    CUSTOMER = "customer"


class ConversationStatus(StrEnum):
    WAITING_ON_AGENT = "waiting_on_agent"
    WAITING_ON_CUSTOMER = "waiting_on_customer"
    RESOLVED = "resolved"
    CLOSED_INACTIVE = "closed_inactive"


class RoutingReason(StrEnum):
    """Why a conversation went where it went; a bounded set, safe as a metric label."""

    HOME_TEAM = "home_team"
    OPT_OUT = "opt_out"
    AFTER_HOURS = "after_hours"
    SURGE = "surge"
    CURRENT_AGENT = "current_agent"
    KNOWN_AGENT = "known_agent"
    LEAST_LOADED = "least_loaded"
    QUEUED = "queued"
    TRANSFER = "transfer"
    AGENT_OFFLINE = "agent_offline"
    RETURNED_HOME = "returned_home"
    RESPONSE_TARGET_MISSED = "response_target_missed"


class Region(StrEnum):
    """How a region hint was given."""

    ZIP = "zip"
    AREA_CODE = "area_code"
    MARKET = "market"
