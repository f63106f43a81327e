"""The WebSocket ops (contract section 3): parsing, rate limiting and dispatch, one reply per ref.

``send``/``edit``/``delete`` go through the command bus exactly as REST does (same validation,
same errors); ``subscribe`` checks that the thread belongs to one of the user's projects (404
``not_found`` otherwise) and then goes through the hub (replay, then live).

Every inbound frame is charged to the shared rate limiter, per user and per client IP, as it is
read; Ping frames too (``charge_ping``, called by the transport). A refusal is an error reply
``rate_limited`` (for a Ping, only a strike); ``settings.ws_abuse_strikes`` refusals in a row
close the connection 4029 ``rate_limited``. In a cluster, a valid op refused only because this
node's lease of a shared bucket ran dry is not refused by the reader: it goes to the dispatcher,
which charges it again after waiting (up to 250 ms) for the shared bucket's answer, as REST does;
the ops behind it keep their order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
import trio
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from actors.connection import CLOSE_INTERNAL, CLOSE_RATE_LIMITED, Connection
from actors.hub import Hub, Subscription
from server import jsoninput, metrics
from server.commands.bus import execute
from server.commands.models import (
    Command,
    DeleteMessage,
    EditMessage,
    SendMessage,
    parse_command,
    validation_details,
)
from server.commands.unit import require_id
from server.errors import (
    BadRequest,
    InternalError,
    NotFound,
    RateLimited,
    ThreadlineError,
    ValidationFailed,
)
from server.principal import Principal
from server.ratelimit import Limit
from server.services import Services
from server.storage.events import thread_visible_to

log = structlog.get_logger(__name__)

Ref = Annotated[str, StringConstraints(min_length=1, max_length=200)]
ThreadId = Annotated[str, StringConstraints(min_length=1, max_length=100)]

COMMANDS: dict[str, type[Command]] = {
    "send": SendMessage,
    "edit": EditMessage,
    "delete": DeleteMessage,
}
OPS = frozenset({"subscribe", "unsubscribe", "cancel", "ping", *COMMANDS})


class _Subscribe(BaseModel):
    model_config = ConfigDict(extra="ignore")
    thread_id: ThreadId
    after_seq: int | None = Field(default=None, ge=0, le=2**63 - 1)  # a bigint in the database


class _ThreadOp(BaseModel):
    model_config = ConfigDict(extra="ignore")
    thread_id: ThreadId


@dataclass(frozen=True, slots=True)
class Request:
    """An admitted frame: its op, its ref and the whole decoded object."""

    op: str
    ref: str | None
    body: dict[str, Any]
    # Buckets whose refusal waits for the cluster's shared bucket: charged by the dispatcher.
    charge_later: tuple[tuple[str, Limit], ...] = ()


def reply_ok(ref: str | None, data: dict[str, Any]) -> str:
    return json.dumps({"op": "reply", "ref": ref, "ok": True, "data": data}, default=str)


def reply_error(ref: str | None, exc: ThreadlineError, request_id: str | None = None) -> str:
    envelope = exc.envelope(request_id)
    return json.dumps({"op": "reply", "ref": ref, "ok": False, **envelope}, default=str)


class WSOps:
    """``actors.connection.OpHandler`` for one authenticated connection."""

    def __init__(
        self,
        services: Services,
        hub: Hub,
        principal: Principal,
        client_ip: str,
        request_id: str | None = None,
    ) -> None:
        self.request_id = request_id  # the handshake's; error envelopes carry it
        self.services = services
        self.hub = hub
        self.principal = principal
        self.client_ip = client_ip

    # -- admission (in the reader task; never blocks) -------------------------------------------

    def admit(self, conn: Connection, raw: str | bytes) -> Request | None:
        """Decode and rate-limit one frame; answer and return None when it goes no further.

        Every frame is charged, invalid ones included, so garbage cannot dodge the limiter.
        """
        body: object = None
        refusal: ThreadlineError | None = None
        try:
            body = jsoninput.loads(raw)
        except BadRequest as exc:  # invalid, too deep, a number too long: answered, kept open
            refusal = exc
        raw_ref = body.get("ref") if isinstance(body, dict) else None
        ref = raw_ref if isinstance(raw_ref, str) and 0 < len(raw_ref) <= 200 else None
        if refusal is None and not isinstance(body, dict):
            refusal = BadRequest("A frame must be a JSON object.")
        op = body.get("op") if isinstance(body, dict) else None
        if refusal is None and (not isinstance(op, str) or op not in OPS):
            refusal = BadRequest("Unknown op.", details={"op": op if isinstance(op, str) else None})
        try:
            # Only a valid op may wait for the shared bucket: garbage is charged (or refused) now.
            later = self._charge(conn, may_defer=refusal is None)
            if refusal is not None:
                raise refusal
            assert isinstance(op, str) and isinstance(body, dict)
            return Request(op=op, ref=ref, body=body, charge_later=later)
        except ThreadlineError as exc:
            self._refuse(conn, ref, exc)
        return None

    def _charge(self, conn: Connection, *, may_defer: bool) -> tuple[tuple[str, Limit], ...]:
        """Charge one frame to the user's and the client IP's buckets; ``RateLimited`` if
        refused. With ``may_defer``, the buckets whose refusal could be lifted by waiting for the
        cluster's shared bucket are returned, uncharged, for the dispatcher (``_charge_later``)."""
        limiter = self.services.limiter
        later: list[tuple[str, Limit]] = []
        for key, limit in (
            (f"user:{self.principal.user_id}", limiter.user_limit),
            (f"ip:{self.client_ip}", limiter.ip_limit),
        ):
            wait = limiter.try_acquire(key, limit)
            if wait is None:
                continue
            if may_defer and limiter.may_wait(key):
                later.append((key, limit))
                continue
            self._strike(conn)
            raise RateLimited(wait)
        if not later:
            conn.strikes = 0
        return tuple(later)

    async def _charge_later(self, conn: Connection, request: Request) -> None:
        """Charge what the reader left to the cluster's shared buckets, waiting (briefly) for
        their answer; ``RateLimited`` (with a strike) if still refused."""
        limiter = self.services.limiter
        try:
            for key, limit in request.charge_later:
                await limiter.acquire(key, limit)
        except RateLimited:
            self._strike(conn)
            raise
        conn.strikes = 0

    def _strike(self, conn: Connection) -> None:
        metrics.RATE_LIMITED.labels(transport="ws").inc()
        conn.strikes += 1
        if conn.strikes >= self.services.settings.ws_abuse_strikes:
            log.warning("ws.rate_limit_abuse", strikes=conn.strikes)
            conn.close(CLOSE_RATE_LIMITED, "rate_limited")

    def charge_ping(self, conn: Connection) -> None:
        """A Ping frame from the client is charged like an op (the server answers every one);
        it has no ref to answer, so a refusal only counts a strike (4029 after enough)."""
        try:
            self._charge(conn, may_defer=False)
        except RateLimited:
            pass

    def _refuse(self, conn: Connection, ref: str | None, exc: ThreadlineError) -> None:
        conn.send_frame(reply_error(ref, exc, self.request_id))

    # -- handling (in the dispatcher task, one op at a time) ------------------------------------

    async def handle(self, conn: Connection, request: Request) -> None:
        """Run one op; queue exactly one reply for its ref."""
        subscription: Subscription | None = None
        try:
            if request.charge_later:
                await self._charge_later(conn, request)
            if request.op == "subscribe":
                subscription = await self._subscribe(conn, request.body)
                data = {
                    "thread_id": subscription.thread_id,
                    "last_seq": subscription.last_seq,
                    "replayed": subscription.replayed,
                }
            else:
                data = await self._run(conn, request)
        except ThreadlineError as exc:
            conn.send_frame(reply_error(request.ref, exc, self.request_id))
            return
        except trio.TooSlowError:
            conn.send_frame(
                reply_error(request.ref, InternalError("The server timed out."), self.request_id)
            )
            return
        except Exception as exc:
            log.exception("ws.op_failed", op=request.op, error=type(exc).__name__)
            conn.send_frame(
                reply_error(
                    request.ref, InternalError("Something went wrong on our side."), self.request_id
                )
            )
            return
        conn.send_frame(reply_ok(request.ref, data))
        if subscription is not None:
            await self._finish_subscribe(conn, subscription)

    async def _run(self, conn: Connection, request: Request) -> dict[str, Any]:
        op, body = request.op, request.body
        if op == "ping":
            return {}
        if op in COMMANDS:
            command = parse_command(COMMANDS[op], body)
            result = await execute(self.services, self.principal, command)
            return result.data or {}
        thread_id = require_id(_parse(_ThreadOp, body).thread_id)
        if op == "unsubscribe":
            if thread_id in conn.subscriptions:
                conn.subscriptions.discard(thread_id)
                await self.hub.unsubscribe(thread_id, conn)
            return {}
        # cancel
        if not await thread_visible_to(self.services.db, thread_id, self.principal.user_id):
            raise NotFound("Not found.")
        assistant = self.services.assistant
        cancelled = await assistant.cancel(thread_id) if assistant is not None else False
        return {"cancelled": cancelled}

    async def _subscribe(self, conn: Connection, body: dict[str, Any]) -> Subscription:
        sub = _parse(_Subscribe, body)
        thread_id = require_id(sub.thread_id)
        if not await thread_visible_to(self.services.db, thread_id, self.principal.user_id):
            raise NotFound("Not found.")
        if thread_id in conn.subscriptions:
            # Subscribing again restarts the stream from the new after_seq.
            conn.subscriptions.discard(thread_id)
            await self.hub.unsubscribe(thread_id, conn)
        # Recorded first: if we are cancelled mid-registration, the close still forgets it.
        conn.subscriptions.add(thread_id)
        try:
            return await self.hub.subscribe(thread_id, conn, sub.after_seq)
        except BaseException:
            conn.subscriptions.discard(thread_id)
            self.hub.forget(thread_id, conn)
            raise

    async def _finish_subscribe(self, conn: Connection, subscription: Subscription) -> None:
        """Replay and go live; the reply has gone, so a failure here closes the connection."""
        try:
            live = await self.hub.finish_subscribe(subscription)
        except Exception as exc:
            log.exception("ws.replay_failed", error=type(exc).__name__)
            conn.close(CLOSE_INTERNAL, "error")
            return
        if not live:
            conn.subscriptions.discard(subscription.thread_id)


def _parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        details = validation_details(exc)
        raise ValidationFailed(
            f"Invalid value for: {', '.join(details['fields'])}.", details=details
        ) from None
