"""The conversation lifecycle, as pure transitions over one customer's records.

Rules (product brief 1, 5, 6, 7): a customer has one open conversation across channels; a new
message joins it, reopens a recently resolved one (within the reopen window) or opens a new
one; replies go out on the channel the customer last used; the home team is set on first
contact and changes only by explicit reassignment; opting out is honoured until opt-in.
Each transition takes ``now`` from its input, so a replay after a crash does the same thing.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import BaseModel

from shared.contracts import conversations as ev
from shared.contracts.agents import ReplyToCustomer, ResolveConversation, TransferConversation
from shared.contracts.common import Channel, ConversationStatus, Direction, WaitingOn
from shared.contracts.customers import OptInToHomeTeam, OptOutOfHomeTeam, ReassignHomeTeam, ScheduleCallback
from shared.contracts.lifecycle import CloseInactiveConversation, StartCallback
from shared.contracts.envelope import derived_id
from shared.contracts.messages import CustomerMessageReceived, DeliverMessage
from shared.contracts.routing import (
    ChangeConversationWeight,
    ConversationRouted,
    MoveToTeammate,
    ReleaseConversation,
    RouteConversation,
    TransferRefused,
)
from shared.teams import TeamDirectory, home_team_for

from services.conversation_state.inactivity import InactivityPolicy, inactivity_timeout
from services.conversation_state.model import (
    INPUT_DIGEST_BYTES,
    INPUT_TIME_BYTES,
    Conversation,
    Customer,
    Line,
    holds_digest,
    input_digest,
    pack_seconds,
    second_at,
)

MAX_REPLY_GAPS = 50
# A new conversation within this time of the customer's last resolution is a repeat contact
# (product brief, "Messaging KPIs").
REPEAT_CONTACT_WINDOW = timedelta(days=7)
# Ids of the latest inputs applied to a customer (message, action, command and decision ids),
# to drop a repeat: a provider's retry, a desktop's resend, a decision republished after a
# crash. Stored with the customer, so it survives restarts; repeats come within minutes.
# Kept: the latest RECENT_INPUTS_ALWAYS whatever their age, and any other of the last
# RECENT_INPUT_WINDOW, at most MAX_RECENT_INPUT_IDS. (Keeping 512 whatever their age made a
# busy customer's document ~20 KB, written on every change.)
RECENT_INPUTS_ALWAYS = 64
RECENT_INPUT_WINDOW = timedelta(minutes=15)
MAX_RECENT_INPUT_IDS = 512


@dataclass(frozen=True, slots=True)
class Rules:
    directory: TeamDirectory
    reopen_window: timedelta = timedelta(hours=1)
    inactivity: InactivityPolicy = InactivityPolicy()
    callback_priority: int = 5


@dataclass(slots=True)
class Effects:
    """What one transition produced; ids are derived from the input's id, so replays match."""

    input_id: str
    events: list[BaseModel] = field(default_factory=list)
    routing: list[tuple[str, BaseModel]] = field(default_factory=list)
    deliveries: list[DeliverMessage] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)

    def next_id(self, kind: str) -> str:
        n = len(self.events) + len(self.routing) + len(self.deliveries)
        return derived_id(self.input_id, kind, str(n))


@dataclass(slots=True)
class StoredSummary:
    """What the store holds of a customer, as much as a write needs (bookkeeping of the
    store's): each stored document's id with the fields it is queried by (a conversation's; None
    for the customer's), and which documents changed since."""

    queried: dict[str, tuple[object, ...] | None]
    changed: set[str] = field(default_factory=set)


@dataclass(slots=True)
class CustomerRecords:
    """A customer and the conversations of theirs that a batch touches."""

    customer: Customer | None
    conversations: dict[str, Conversation] = field(default_factory=dict)
    # The documents as the store last wrote or read them, by id: the store writes only what
    # changed (bookkeeping of the store's, which the rules never read).
    stored: dict[str, dict[str, object]] = field(default_factory=dict, repr=False, compare=False)
    # Conversations whose own stored document may trail ``stored`` (the customer's document
    # holds the newer copy; see the store): written in full once no longer current.
    trailing: set[str] = field(default_factory=set, repr=False, compare=False)
    # ``stored`` left empty while the customer is kept in memory stored and unchanged: the
    # store then holds exactly the records' own documents, so they are rebuilt when a batch
    # takes the customer again instead of being kept twice (see write_behind).
    stored_derived: bool = field(default=False, repr=False, compare=False)
    # Instead of ``stored`` while the customer has changes not stored yet (write_behind): what
    # a write needs of it (see the store's ``summarize_stored``).
    summary: StoredSummary | None = field(default=None, repr=False, compare=False)

    @property
    def open_conversation(self) -> Conversation | None:
        c = self.customer
        if c is None or c.open_conversation_id is None:
            return None
        return self.conversations.get(c.open_conversation_id)


def _status(
    conv: Conversation, status: ConversationStatus, now: datetime, fx: Effects, inactive_after: datetime | None = None
) -> None:
    if conv.status is status and conv.inactive_after == inactive_after:
        return
    conv.status = status
    conv.updated_at = now
    conv.inactive_after = inactive_after
    fx.events.append(
        ev.ConversationStatusChanged(
            conversation_id=conv.id, customer_id=conv.customer_id, status=status, at=now, inactive_after=inactive_after
        )
    )


def _route_request(
    customer: Customer, conv: Conversation, now: datetime, fx: Effects, current_agent: str | None = None, priority: int = 0
) -> None:
    fx.routing.append(
        (
            customer.home_team_id,
            RouteConversation(
                request_id=fx.next_id("route"),
                conversation_id=conv.id,
                customer_id=customer.id,
                home_team_id=customer.home_team_id,
                opted_out=customer.opted_out,
                channel=conv.last_channel,
                current_agent_id=current_agent,
                known_agent_id=customer.known_agent_id,
                known_agent_served_at=customer.known_agent_served_at,
                waiting_on=WaitingOn.AGENT,
                priority=priority,
                requested_at=now,
            ),
        )
    )


def _reweigh(conv: Conversation, waiting_on: WaitingOn, now: datetime, fx: Effects) -> None:
    """Tell the pool holding the conversation who it now waits on (its weight changes)."""
    if conv.team_id is not None:
        fx.routing.append(
            (
                conv.team_id,
                ChangeConversationWeight(
                    request_id=fx.next_id("weight"),
                    conversation_id=conv.id,
                    customer_id=conv.customer_id,
                    waiting_on=waiting_on,
                    changed_at=now,
                ),
            )
        )


def _next_line(conv: Conversation) -> int | None:
    """The position of the conversation's next transcript line (None where it counts none:
    stored before lines had positions)."""
    if conv.line_count is None:
        return None
    conv.line_count += 1
    return conv.line_count


def _kpi_line(conv: Conversation, direction: Direction, channel: Channel, at: datetime) -> tuple[bool, float | None]:
    """What a new line means for the KPIs: does it start a turn (the other side wrote last),
    and is it the first response (seconds since the customer's first message, or since the
    opening). A line while no team holds the conversation is kept for the team that takes it
    (``lines_before_placement`` on the placement or ending that follows)."""
    starts_turn = conv.last_direction is not direction
    conv.last_direction = direction
    first_response = None
    if direction is Direction.INBOUND:
        if conv.first_customer_message_at is None:
            conv.first_customer_message_at = at
    elif conv.first_response_at is None:
        first_response = max(0.0, (at - (conv.first_customer_message_at or conv.opened_at)).total_seconds())
    if conv.team_id is None:
        conv.unplaced_lines = _with_unplaced(conv.unplaced_lines, at, direction, channel, starts_turn)
    return starts_turn, first_response


def _with_unplaced(groups: list[dict], at: datetime, direction: Direction, channel: Channel, starts_turn: bool) -> list[dict]:
    """Unplaced lines grouped by hour, direction and channel (a new list: stored copies of the
    old one stay as they were)."""
    hour = at.replace(minute=0, second=0, microsecond=0)
    for n, g in enumerate(groups):
        if g["direction"] == direction.value and g["channel"] == channel.value and g["at"].replace(minute=0, second=0, microsecond=0) == hour:
            changed = {**g, "lines": g["lines"] + 1, "turns": g["turns"] + int(starts_turn)}
            return [*groups[:n], changed, *groups[n + 1 :]]
    return [*groups, {"at": at, "direction": direction.value, "channel": channel.value, "lines": 1, "turns": int(starts_turn)}]


def _take_unplaced(conv: Conversation) -> list[ev.LinesBeforePlacement]:
    lines = [ev.LinesBeforePlacement(**g) for g in conv.unplaced_lines]
    conv.unplaced_lines = []
    return lines


def _opened(conv: Conversation, previous: Conversation | None) -> ev.ConversationOpened:
    """The event of a conversation just opened; ``previous`` is the customer's last one."""
    return ev.ConversationOpened(
        conversation_id=conv.id,
        customer_id=conv.customer_id,
        home_team_id=conv.home_team_id,
        channel=conv.last_channel,
        opened_at=conv.opened_at,
        previous_conversation_id=conv.previous_conversation_id,
        repeat_of=_repeat_of(previous, conv.opened_at),
    )


def _repeat_of(previous: Conversation | None, opened_at: datetime) -> ev.RepeatContact | None:
    """The resolved conversation a new one repeats, if it was resolved within the window."""
    if (
        previous is None
        or previous.status is not ConversationStatus.RESOLVED
        or previous.resolved_at is None
        or opened_at - previous.resolved_at > REPEAT_CONTACT_WINDOW
    ):
        return None
    return ev.RepeatContact(
        conversation_id=previous.id,
        resolved_at=previous.resolved_at,
        team_id=previous.team_id or previous.home_team_id,
        agent_id=previous.agent_id,
    )


INPUT_ID_FIELDS = ("message_id", "action_id", "command_id", "decision_id")
# Per payload type, which of ``INPUT_ID_FIELDS`` it has: asking a pydantic model for a field
# it lacks goes through its ``__getattr__`` and an exception (2.7% of conversation-state's CPU,
# twice per input).
_ID_FIELDS_OF: dict[type, tuple[str, ...]] = {}


def input_id(payload: BaseModel) -> str:
    """The id that makes an input unique: a message, action, command or decision id."""
    names = _ID_FIELDS_OF.get(type(payload))
    if names is None:
        fields = getattr(type(payload), "model_fields", None)
        if fields is None:  # (not a model: asked as it is)
            names = INPUT_ID_FIELDS
        else:
            names = _ID_FIELDS_OF[type(payload)] = tuple(n for n in INPUT_ID_FIELDS if n in fields)
    for name in names:
        value = getattr(payload, name, None)
        if value is not None:
            return f"{name}:{value}"
    raise TypeError(f"{type(payload).__name__} carries no input id")


def already_applied(records: CustomerRecords, payload: BaseModel) -> bool:
    """Was this input (same message / action / command / decision id) applied already?"""
    return records.customer is not None and holds_digest(records.customer.recent_inputs, input_digest(input_id(payload)))


def remember_applied(records: CustomerRecords, payload: BaseModel, at: datetime) -> None:
    """Remember an applied input (``at``: its time) among the customer's recent inputs."""
    customer = records.customer
    if customer is not None:
        customer.recent_inputs, customer.recent_input_at = recent_inputs(
            customer.recent_inputs, customer.recent_input_at, input_digest(input_id(payload)), at.timestamp()
        )


def recent_inputs(digests: bytes, times: bytes, new: bytes, at: float) -> tuple[bytes, bytes]:
    """The recent inputs after one more (``model.Customer.recent_inputs``: the ids' digests
    and their times in whole seconds, packed, oldest first): the latest ``RECENT_INPUTS_ALWAYS``, and older ones
    within ``RECENT_INPUT_WINDOW`` of ``at``, at most ``MAX_RECENT_INPUT_IDS``. Ids remembered
    before times were kept count as of ``at``."""
    count = len(digests) // INPUT_DIGEST_BYTES
    had = len(times) // INPUT_TIME_BYTES
    if had < count:
        times = pack_seconds([at] * (count - had)) + times
    elif had > count:
        times = times[(had - count) * INPUT_TIME_BYTES :]
    digests, times, count = digests + new, times + pack_seconds([at]), count + 1
    oldest = at - RECENT_INPUT_WINDOW.total_seconds()
    first = max(0, count - MAX_RECENT_INPUT_IDS)
    always = count - RECENT_INPUTS_ALWAYS
    while first < always and second_at(times, first) < oldest:
        first += 1
    if first == 0:
        return digests, times
    return digests[first * INPUT_DIGEST_BYTES :], times[first * INPUT_TIME_BYTES :]


already_received = already_applied


def customer_message(records: CustomerRecords, msg: CustomerMessageReceived, rules: Rules, fx: Effects) -> None:
    """A customer wrote: join the open conversation, reopen a recent one, or open a new one."""
    now = msg.received_at
    customer = records.customer
    if customer is None:
        team_id, source = home_team_for(
            rules.directory, channel=msg.channel, address=msg.address, zip_code=msg.region.zip, market=msg.region.market
        )
        customer = Customer(id=msg.customer_id, home_team_id=team_id, home_team_source=source, created_at=now)
        records.customer = customer
    customer.addresses[msg.channel.value] = msg.address
    if msg.business_id:
        customer.business_ids[msg.channel.value] = msg.business_id
    customer.last_channel = msg.channel
    if msg.authenticated and not customer.authenticated:
        customer.authenticated = True
        fx.events.append(_preferences(customer, now))

    conv = records.open_conversation
    if conv is None:
        last = records.conversations.get(customer.last_conversation_id or "")
        if (
            last is not None
            and last.status is ConversationStatus.RESOLVED
            and last.resolved_at is not None
            and now - last.resolved_at <= rules.reopen_window
        ):
            conv = last
            conv.resolved_at = None
            conv.agent_id = conv.team_id = conv.pool = None
            _status(conv, ConversationStatus.WAITING_ON_AGENT, now, fx)
        else:
            conv = Conversation(
                id=derived_id("conversation", msg.message_id),
                customer_id=customer.id,
                home_team_id=customer.home_team_id,
                status=ConversationStatus.WAITING_ON_AGENT,
                opened_at=now,
                updated_at=now,
                last_channel=msg.channel,
                previous_conversation_id=customer.last_conversation_id,
            )
            records.conversations[conv.id] = conv
            fx.events.append(_opened(conv, last))
        conv.waiting_since = now
        customer.open_conversation_id = conv.id
        customer.last_conversation_id = conv.id
        _route_request(customer, conv, now, fx)
    elif conv.status is ConversationStatus.WAITING_ON_CUSTOMER:
        if conv.last_agent_message_at is not None:
            gap = (now - conv.last_agent_message_at).total_seconds()
            gaps = array("d", customer.reply_gaps_s)
            gaps.append(max(gap, 0.0))
            del gaps[:-MAX_REPLY_GAPS]
            customer.reply_gaps_s = gaps
        conv.waiting_since = now
        _status(conv, ConversationStatus.WAITING_ON_AGENT, now, fx)
        _reweigh(conv, WaitingOn.AGENT, now, fx)

    conv.last_channel = msg.channel
    conv.last_customer_message_at = now
    conv.updated_at = now
    conv.inbound_count += 1
    starts_turn, _ = _kpi_line(conv, Direction.INBOUND, msg.channel, now)
    fx.lines.append(
        Line(
            seq=_next_line(conv),
            message_id=msg.message_id,
            conversation_id=conv.id,
            customer_id=customer.id,
            direction=Direction.INBOUND,
            channel=msg.channel,
            text=msg.text,
            at=now,
            attachments=tuple(a.model_dump(mode="json") for a in msg.attachments),
        )
    )
    fx.events.append(
        ev.MessageAdded(
            conversation_id=conv.id,
            customer_id=customer.id,
            message_id=msg.message_id,
            direction=Direction.INBOUND,
            channel=msg.channel,
            team_id=conv.team_id,
            agent_id=conv.agent_id,
            at=now,
            starts_turn=starts_turn,
        )
    )


def routed(records: CustomerRecords, decision: ConversationRouted, fx: Effects) -> None:
    """Record where routing placed a conversation; a placement of an ended one is undone."""
    now = decision.decided_at
    conv = records.conversations.get(decision.conversation_id)
    if conv is None or not conv.is_open:
        fx.routing.append(
            (
                decision.team_id,
                ReleaseConversation(
                    request_id=fx.next_id("release"),
                    conversation_id=decision.conversation_id,
                    customer_id=decision.customer_id,
                    released_at=now,
                ),
            )
        )
        return
    first_placement = conv.assigned_at is None and conv.queued_at is None
    previous_agent = conv.agent_id
    conv.pool = decision.pool
    conv.team_id = decision.team_id
    conv.agent_id = decision.agent_id
    conv.pool_reason = decision.pool_reason
    conv.routing_reason = decision.reason
    conv.updated_at = now
    if decision.agent_id is None:
        conv.queued_at = now
        fx.events.append(
            ev.ConversationQueued(
                conversation_id=conv.id,
                customer_id=conv.customer_id,
                pool=decision.pool,
                team_id=decision.team_id,
                pool_reason=decision.pool_reason,
                queue_position=decision.queue_position,
                at=now,
                home_team_id=conv.home_team_id,
                first_placement=first_placement,
                lines_before_placement=_take_unplaced(conv),
            )
        )
    else:
        conv.assigned_at = now
        fx.events.append(
            ev.ConversationAssigned(
                conversation_id=conv.id,
                customer_id=conv.customer_id,
                pool=decision.pool,
                team_id=decision.team_id,
                agent_id=decision.agent_id,
                reason=decision.reason,
                pool_reason=decision.pool_reason,
                at=now,
                home_team_id=conv.home_team_id,
                previous_agent_id=previous_agent,
                first_placement=first_placement,
                lines_before_placement=_take_unplaced(conv),
            )
        )


def transfer_refused(records: CustomerRecords, refusal: TransferRefused, fx: Effects) -> None:
    fx.events.append(
        ev.ConversationTransferRefused(
            conversation_id=refusal.conversation_id,
            customer_id=refusal.customer_id,
            from_agent_id=refusal.from_agent_id,
            to_agent_id=refusal.to_agent_id,
            reason=refusal.reason,
            at=refusal.decided_at,
        )
    )


def _agent_conversation(
    records: CustomerRecords,
    action: ReplyToCustomer | ResolveConversation | TransferConversation,
    now: datetime,
    fx: Effects,
) -> Conversation | None:
    """The conversation an agent acts on, if the action is allowed; else a rejection event."""
    conv = records.conversations.get(action.conversation_id)
    reason = None
    if records.customer is None or conv is None or conv.customer_id != action.customer_id:
        reason = "unknown_conversation"
    elif not conv.is_open:
        reason = "conversation_not_open"
    elif conv.agent_id != action.agent_id:
        reason = "not_assignee"
    if reason is None:
        return conv
    fx.events.append(
        ev.CommandRejected(
            command_id=action.action_id,
            command_type=type(action).__name__,
            customer_id=action.customer_id,
            conversation_id=action.conversation_id,
            agent_id=action.agent_id,
            reason=reason,
            at=now,
        )
    )
    return None


def agent_reply(records: CustomerRecords, action: ReplyToCustomer, rules: Rules, fx: Effects) -> None:
    """An agent answers: the reply goes out on the customer's last channel; the conversation
    now waits on the customer; this agent becomes the customer's known agent."""
    now = action.sent_at
    conv = _agent_conversation(records, action, now, fx)
    if conv is None:
        return
    customer = records.customer
    assert customer is not None
    channel = customer.last_channel or conv.last_channel
    line_id = derived_id("reply", action.action_id)
    fx.deliveries.append(
        DeliverMessage(
            delivery_id=line_id,
            customer_id=customer.id,
            conversation_id=conv.id,
            channel=channel,
            address=customer.addresses[channel.value],
            business_id=customer.business_ids.get(channel.value),
            text=action.text,
            agent_id=action.agent_id,
            requested_at=now,
        )
    )
    fx.lines.append(
        Line(
            seq=_next_line(conv),
            message_id=line_id,
            conversation_id=conv.id,
            customer_id=customer.id,
            direction=Direction.OUTBOUND,
            channel=channel,
            text=action.text,
            at=now,
            agent_id=action.agent_id,
        )
    )
    conv.outbound_count += 1
    conv.last_agent_message_at = now
    starts_turn, first_response = _kpi_line(conv, Direction.OUTBOUND, channel, now)
    if conv.first_response_at is None:
        conv.first_response_at = now
    customer.known_agent_id = action.agent_id
    customer.known_agent_served_at = now
    fx.events.append(
        ev.MessageAdded(
            conversation_id=conv.id,
            customer_id=customer.id,
            message_id=line_id,
            direction=Direction.OUTBOUND,
            channel=channel,
            agent_id=action.agent_id,
            team_id=conv.team_id,
            at=now,
            starts_turn=starts_turn,
            first_response_seconds=first_response,
        )
    )
    if conv.status is ConversationStatus.WAITING_ON_AGENT or conv.inactive_after is not None:
        was_waiting_on_agent = conv.status is ConversationStatus.WAITING_ON_AGENT
        conv.waiting_since = now
        timeout = inactivity_timeout(customer.reply_gaps_s, rules.inactivity)
        _status(conv, ConversationStatus.WAITING_ON_CUSTOMER, now, fx, inactive_after=now + timeout)
        if was_waiting_on_agent:
            _reweigh(conv, WaitingOn.CUSTOMER, now, fx)
    conv.updated_at = now


def _end(records: CustomerRecords, conv: Conversation, status: ConversationStatus, now: datetime, fx: Effects) -> None:
    customer = records.customer
    assert customer is not None
    team_id, agent_id = conv.team_id, conv.agent_id
    _status(conv, status, now, fx)
    if status is ConversationStatus.RESOLVED:
        conv.resolved_at = now
        fx.events.append(
            ev.ConversationResolved(
                conversation_id=conv.id,
                customer_id=conv.customer_id,
                team_id=team_id,
                agent_id=agent_id,
                resolved_at=now,
                home_team_id=conv.home_team_id,
                opened_at=conv.opened_at,
                lines_before_placement=_take_unplaced(conv),
            )
        )
    else:
        conv.closed_at = now
        fx.events.append(
            ev.ConversationClosed(
                conversation_id=conv.id,
                customer_id=conv.customer_id,
                team_id=team_id,
                agent_id=agent_id,
                status=status,
                closed_at=now,
                home_team_id=conv.home_team_id,
                lines_before_placement=_take_unplaced(conv),
            )
        )
    if team_id is not None:
        fx.routing.append(
            (
                team_id,
                ReleaseConversation(
                    request_id=fx.next_id("release"), conversation_id=conv.id, customer_id=conv.customer_id, released_at=now
                ),
            )
        )
    if customer.open_conversation_id == conv.id:
        customer.open_conversation_id = None


def resolve(records: CustomerRecords, action: ResolveConversation, fx: Effects) -> None:
    now = action.resolved_at
    conv = _agent_conversation(records, action, now, fx)
    if conv is not None:
        _end(records, conv, ConversationStatus.RESOLVED, now, fx)


def close_inactive(records: CustomerRecords, cmd: CloseInactiveConversation, fx: Effects) -> None:
    """Close a conversation whose customer stayed silent past its deadline (the sweeper's
    command). A stale deadline (the customer wrote since, or a newer one was set) is ignored."""
    conv = records.conversations.get(cmd.conversation_id)
    if (
        records.customer is not None
        and conv is not None
        and conv.status is ConversationStatus.WAITING_ON_CUSTOMER
        and conv.inactive_after == cmd.deadline
    ):
        _end(records, conv, ConversationStatus.CLOSED_INACTIVE, cmd.deadline, fx)


def schedule_callback(records: CustomerRecords, cmd: ScheduleCallback, fx: Effects) -> None:
    """Remember a callback the customer asked for; the sweeper fires it at ``callback_at``."""
    customer = records.customer
    if customer is None:
        _reject(cmd, "unknown_customer", fx)
        return
    if cmd.callback_at <= cmd.requested_at:
        _reject(cmd, "callback_in_the_past", fx)
        return
    callback_id = derived_id("callback", cmd.command_id)
    customer.callbacks = {**customer.callbacks, callback_id: cmd.callback_at}
    fx.events.append(
        ev.CallbackScheduled(callback_id=callback_id, customer_id=customer.id, due_at=cmd.callback_at, at=cmd.requested_at)
    )


def start_callback(records: CustomerRecords, cmd: StartCallback, rules: Rules, fx: Effects) -> None:
    """A callback is due: queue a conversation for the customer with priority (routing picks
    the home team, or the standard pool when the team is closed). Fires once."""
    customer = records.customer
    if customer is None or cmd.callback_id not in customer.callbacks:
        return
    customer.callbacks = {k: v for k, v in customer.callbacks.items() if k != cmd.callback_id}
    now = cmd.due_at
    if records.open_conversation is not None:
        return  # already being served: the agent sees them now
    channel = customer.last_channel
    if channel is None:
        return
    previous = records.conversations.get(customer.last_conversation_id or "")
    conv = Conversation(
        id=derived_id("conversation", "callback", cmd.callback_id),
        customer_id=customer.id,
        home_team_id=customer.home_team_id,
        status=ConversationStatus.WAITING_ON_AGENT,
        opened_at=now,
        updated_at=now,
        last_channel=channel,
        previous_conversation_id=customer.last_conversation_id,
        waiting_since=now,
    )
    records.conversations[conv.id] = conv
    customer.open_conversation_id = customer.last_conversation_id = conv.id
    fx.events.append(_opened(conv, previous))
    _route_request(customer, conv, now, fx, priority=rules.callback_priority)


def transfer(records: CustomerRecords, action: TransferConversation, fx: Effects) -> None:
    """Forward a transfer to the pool that holds the conversation; the pool refuses anything
    outside the team."""
    now = action.requested_at
    conv = _agent_conversation(records, action, now, fx)
    if conv is None or conv.team_id is None:
        return
    fx.routing.append(
        (
            conv.team_id,
            MoveToTeammate(
                request_id=fx.next_id("transfer"),
                conversation_id=conv.id,
                customer_id=conv.customer_id,
                from_agent_id=action.agent_id,
                to_agent_id=action.to_agent_id,
                requested_at=now,
            ),
        )
    )


def _preferences(customer: Customer, now: datetime) -> ev.CustomerPreferencesChanged:
    return ev.CustomerPreferencesChanged(
        customer_id=customer.id,
        home_team_id=customer.home_team_id,
        opted_out=customer.opted_out,
        authenticated=customer.authenticated,
        at=now,
    )


def _reject(cmd: OptOutOfHomeTeam | OptInToHomeTeam | ReassignHomeTeam | ScheduleCallback, reason: str, fx: Effects) -> None:
    fx.events.append(
        ev.CommandRejected(
            command_id=cmd.command_id,
            command_type=type(cmd).__name__,
            customer_id=cmd.customer_id,
            reason=reason,
            at=cmd.requested_at,
        )
    )


def customer_command(
    records: CustomerRecords, cmd: OptOutOfHomeTeam | OptInToHomeTeam | ReassignHomeTeam, rules: Rules, fx: Effects
) -> None:
    """Opt out of / back into the home team, or reassign it explicitly (the customer moved)."""
    customer = records.customer
    if customer is None:
        _reject(cmd, "unknown_customer", fx)
        return
    if isinstance(cmd, ReassignHomeTeam):
        if rules.directory.team(cmd.team_id) is None:
            _reject(cmd, "unknown_team", fx)
            return
        customer.home_team_id = cmd.team_id
        customer.home_team_source = "reassigned"
    else:
        customer.opted_out = isinstance(cmd, OptOutOfHomeTeam)
    fx.events.append(_preferences(customer, cmd.requested_at))

