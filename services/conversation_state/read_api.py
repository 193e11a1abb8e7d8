"""Read API for agent desktops: a customer's current conversation with earlier transcripts,
one conversation by id, and a team's queue. JSON, paginated, with clear 404s."""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from shared.contracts.common import ConversationStatus, Identifier
from shared.contracts.customers import ScheduleCallback
from shared.contracts.registry import CUSTOMER_COMMANDS
from shared.contracts.routing import STANDARD_POOL_ID
from shared.runtime.compact import expand_document
from shared.runtime.outbox import Outbox
from shared.runtime.store import queries_scan
from shared.runtime.http import problem
from shared.teams import DirectoryWatcher

from services.conversation_state.store import LINES_PER_READ, ConversationStore, held_conversations
from services.conversation_state.write_behind import JournaledCustomers

MAX_PAGE_SIZE = LINES_PER_READ  # also the most lines of a conversation a customer's view shows
OPEN = [ConversationStatus.WAITING_ON_AGENT.value, ConversationStatus.WAITING_ON_CUSTOMER.value]


def _page(request: Request, default_size: int = 50) -> tuple[int, int] | Response:
    try:
        page = int(request.query_params.get("page", "1"))
        size = int(request.query_params.get("page_size", str(default_size)))
    except ValueError:
        return problem(400, "page and page_size must be integers")
    if page < 1 or not 1 <= size <= MAX_PAGE_SIZE:
        return problem(400, f"page must be >= 1 and page_size between 1 and {MAX_PAGE_SIZE}")
    return page, size


def _conversation_json(doc: dict[str, Any]) -> dict[str, Any]:
    # unplaced_lines: bookkeeping for the KPI events, not part of what a conversation shows.
    out = {k: v for k, v in doc.items() if k not in ("_id", "unplaced_lines")}
    out["conversation_id"] = doc["_id"]
    return _jsonable(out)


def _line_json(doc: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k not in ("_id", "customer_id", "seq", "gen")}
    out["message_id"] = doc.get("message_id", doc["_id"])  # lines stored by message id have no field
    return _jsonable(out)


def _nulls_first(value: Any) -> tuple[bool, Any]:
    """A sort key that puts a missing value first, as the store's sort does."""
    return (value is not None, value if value is not None else 0)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def read_routes(
    store: ConversationStore, directory: DirectoryWatcher, token: str | None, memory: JournaledCustomers | None = None
) -> list[Route]:
    """The read API. Customers and conversations are written behind (``write_behind``), and
    their transcript lines with them: this replica answers from its memory for the customers
    it owns, so what it has applied shows at once; another replica's customers, their lines
    and the team queue may trail by one and a half ``STATE_FLUSH_INTERVAL_S``."""
    unstored_lines: Mapping[str, Mapping[str, Any]] = memory.unstored_lines if memory is not None else {}

    def latest(doc_id: str, customer_id: str | None = None) -> dict[str, Any] | None:
        return memory.latest(doc_id, customer_id) if memory is not None else None

    def authorized(request: Request) -> bool:
        if not token:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    async def customer_conversation(request: Request) -> Response:
        if not authorized(request):
            return problem(401, "missing or wrong bearer token")
        paging = _page(request, default_size=5)
        if isinstance(paging, Response):
            return paging
        page, size = paging
        customer_id = request.path_params["customer_id"]
        customer = latest(customer_id) or await store.find_customer(customer_id)
        if customer is None:
            return problem(404, "unknown customer", customer_id=customer_id)
        current_id = customer.get("open_conversation_id") or customer.get("last_conversation_id")
        current = None
        if current_id:  # from memory, else as the customer's document holds it, else its own
            current = latest(current_id, customer_id) or held_conversations(customer).get(current_id)
            # (not find_conversation: it would read this customer's document again)
            current = current or (await store.find_conversations([current_id])).get(current_id)
        others = {"customer_id": customer_id, "_id": {"$ne": current_id}}
        held = {k: v for k, v in (memory.conversations_of(customer_id) if memory is not None else {}).items() if k != current_id}
        if await queries_scan(store.conversations):
            # Each query scans there: along the previous conversations, by _id.
            ordered = await store.earlier_conversations(current, held) if current is not None else []
            page_docs, total_earlier = ordered[(page - 1) * size : page * size], len(ordered)
        elif held:  # some may not be stored yet: merge, then page here (a customer has few)
            docs = {d["_id"]: expand_document(d) async for d in store.conversations.find(others)} | held
            ordered = sorted(docs.values(), key=lambda d: d["_id"])
            ordered.sort(key=lambda d: d["opened_at"].timestamp(), reverse=True)
            page_docs, total_earlier = ordered[(page - 1) * size : page * size], len(ordered)
        else:
            cursor = store.conversations.find(others).sort([("opened_at", DESCENDING), ("_id", ASCENDING)])
            page_docs = [expand_document(d) async for d in cursor.skip((page - 1) * size).limit(size)]
            total_earlier = await store.conversations.count_documents(others)
        shown = ([current] if current is not None else []) + page_docs
        lines = await store.read_transcripts(shown, trailing={current["_id"]} if current is not None else (), unstored=unstored_lines)
        earlier = [{**_conversation_json(doc), "transcript": [_line_json(d) for d in lines[doc["_id"]]]} for doc in page_docs]
        return JSONResponse(
            {
                "customer": {
                    "customer_id": customer_id,
                    "home_team_id": customer["home_team_id"],
                    "authenticated": customer.get("authenticated", False),
                    "opted_out": customer.get("opted_out", False),
                    "last_channel": customer.get("last_channel"),
                    "known_agent_id": customer.get("known_agent_id"),
                },
                "current": None if current is None else {**_conversation_json(current), "transcript": [_line_json(d) for d in lines[current["_id"]]]},
                "earlier": earlier,
                "earlier_page": page,
                "earlier_page_size": size,
                "earlier_total": total_earlier,
            }
        )

    async def conversation(request: Request) -> Response:
        if not authorized(request):
            return problem(401, "missing or wrong bearer token")
        paging = _page(request, default_size=100)
        if isinstance(paging, Response):
            return paging
        page, size = paging
        conversation_id = request.path_params["conversation_id"]
        doc = latest(conversation_id) or await store.find_conversation(conversation_id)
        if doc is not None:
            doc = latest(conversation_id, doc["customer_id"]) or doc
        if doc is None:
            return problem(404, "unknown conversation", conversation_id=conversation_id)
        lines, total = await store.read_page(doc, (page - 1) * size, size, unstored_lines)
        transcript = [_line_json(d) for d in lines]
        return JSONResponse({**_conversation_json(doc), "transcript": transcript, "page": page, "page_size": size, "transcript_total": total})

    async def team_queue(request: Request) -> Response:
        if not authorized(request):
            return problem(401, "missing or wrong bearer token")
        paging = _page(request, default_size=50)
        if isinstance(paging, Response):
            return paging
        page, size = paging
        team_id = request.path_params["team_id"]
        if team_id != STANDARD_POOL_ID and directory.current.team(team_id) is None:
            return problem(404, "unknown team", team_id=team_id)
        # The query fields of ``conversations`` are current; the rest of a current
        # conversation is read from its customer's document (``overlay_held``).
        base = {"team_id": team_id, "status": {"$in": OPEN}}
        waiting_filter = {**base, "agent_id": None}
        if await queries_scan(store.conversations):
            # One query of the open conversations (each query is a scan there: of
            # ``open_conversations``, not of every conversation stored), split, sorted and
            # paged here by the fields kept as fields; expanded only where shown.
            open_docs = [d async for d in store.open_conversations.find(base)]
            queued = sorted((d for d in open_docs if d.get("agent_id") is None), key=lambda d: (_nulls_first(d.get("queued_at")), d["_id"]))
            page_docs, waiting_total = queued[(page - 1) * size : page * size], len(queued)
            taken = sorted((d for d in open_docs if d.get("agent_id") is not None), key=lambda d: _nulls_first(d.get("assigned_at")))
        else:  # indexed: only the page of those waiting
            cursor = store.conversations.find(waiting_filter).sort([("queued_at", ASCENDING), ("_id", ASCENDING)])
            page_docs = [d async for d in cursor.skip((page - 1) * size).limit(size)]
            waiting_total = await store.conversations.count_documents(waiting_filter)
            taken = [d async for d in store.conversations.find({**base, "agent_id": {"$ne": None}}).sort([("assigned_at", ASCENDING)])]
        # (as their customers' documents hold them: one that a replica filling
        # ``open_conversations`` put there after it closed is left out)
        still = lambda d: d.get("status") in OPEN and d.get("team_id") == team_id  # noqa: E731
        waiting = [d for d in await store.overlay_held([expand_document(d) for d in page_docs]) if still(d)]
        assigned: dict[str, list[dict[str, Any]]] = {}
        for doc in await store.overlay_held([expand_document(d) for d in taken]):
            if still(doc) and doc.get("agent_id") is not None:
                assigned.setdefault(doc["agent_id"], []).append(_conversation_json(doc))
        return JSONResponse(
            {
                "team_id": team_id,
                "waiting": [_conversation_json(d) for d in waiting],
                "waiting_total": waiting_total,
                "page": page,
                "page_size": size,
                "assigned": assigned,
            }
        )

    return [
        Route("/customers/{customer_id}/conversation", customer_conversation, methods=["GET"]),
        Route("/conversations/{conversation_id}", conversation, methods=["GET"]),
        Route("/teams/{team_id}/queue", team_queue, methods=["GET"]),
    ]


class _CallbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    callback_at: AwareDatetime


def _authorized(request: Request, token: str | None) -> bool:
    if not token:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def command_routes(outbox: Outbox, token: str | None) -> list[Route]:
    """``POST /customers/{id}/callbacks``: a customer asks to be contacted at a time (the app
    or an agent calls this on their behalf). Publishes ``ScheduleCallback``; 202 once Kafka
    has it."""

    async def schedule_callback(request: Request) -> Response:
        if not _authorized(request, token):
            return problem(401, "missing or wrong bearer token")
        customer_id = request.path_params["customer_id"]
        try:
            Identifier_check = _IdentifierModel(value=customer_id)
            body = _CallbackRequest.model_validate(json.loads(await request.body()))
        except (ValueError, ValidationError) as exc:
            detail = exc.errors(include_input=False, include_url=False) if isinstance(exc, ValidationError) else None
            return problem(422, "body must be {\"callback_at\": <ISO 8601 time with offset>}", details=detail)
        now = datetime.now(UTC)
        if body.callback_at <= now:
            return problem(422, "callback_at must be in the future")
        command = ScheduleCallback(
            command_id=f"api-{uuid.uuid4().hex}",
            customer_id=Identifier_check.value,
            callback_at=body.callback_at,
            requested_at=now,
        )
        await outbox.send(CUSTOMER_COMMANDS.name, customer_id, command, id=command.command_id, time=now)
        await outbox.flush()
        return JSONResponse({"status": "accepted", "command_id": command.command_id}, status_code=202)

    return [Route("/customers/{customer_id}/callbacks", schedule_callback, methods=["POST"])]


class _IdentifierModel(BaseModel):
    value: Identifier
