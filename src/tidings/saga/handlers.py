"""Service command handlers with an inbox: a redelivered command changes nothing.

`@hub.handler("customer.reserve_credit")` subscribes the function to the
command topic. The function gets a `Command`, changes aggregates and enlists
them with `cmd.save(agg)`; its return value is the reply. A handler with an
input type (`input=ReserveCredit`, or its parameter annotated
`Command[ReserveCredit]`) gets `cmd.data` as that type; a command that does
not fit it never reaches the function: it is rejected (the error names the
field) and dead-lettered with reason `decode-error`. After it returns,
the aggregates' events, the inbox record (keyed by the command's idempotency
key) and the reply message are stored in ONE transaction. A duplicate
command finds the inbox record and gets the stored reply again, without
running the handler.

A compensation of a step whose command may still be in flight somewhere (it
timed out or failed, and a delivery held by a dead process can come back when
its lease expires) carries a *fence*: the forward command's name and
idempotency key. Its handler commits, with the compensation, an
`InboxRecorded(status="fenced")` under that key unless the command already
ran — so the command, when it arrives, finds the fence and changes nothing.
Both writes expect the inbox stream to be new, so exactly one of them wins.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, get_args, get_origin

import msgspec

from .. import topics as _topics
from ..errors import ConcurrencyError, InvalidArgument, Rejected
from ..eventsourcing.aggregate import Aggregate
from ..eventsourcing.events import Event
from ..eventsourcing.records import NO_STREAM
from ..inputs import (
    KINDS,
    check_input_type,
    is_input_type,
    json_decoder,
    parameter_type,
    validate,
)
from ..messages import JSON, Message, OutMessage, encode_data, new_id
from ..pubsub import DECODE_ERROR, feed

if TYPE_CHECKING:
    from ..hub import Hub

__all__ = ["Command", "CommandHandler", "InboxRecorded", "fence_append", "inbox_stream"]

log = logging.getLogger("tidings.handler")

HandlerFn = Callable[["Command[Any]"], Awaitable[Any]]
T = TypeVar("T")

#: headers of a compensation that fences its step's command (see the module docstring)
FENCE_COMMAND, FENCE_KEY = "saga-fence-command", "saga-fence-key"
#: what a fenced command replies (the saga gave up on it before it ran)
FENCED = "fenced: the saga compensated this step before the command ran; it changed nothing"


class InboxRecorded(Event):
    """A handled command: its idempotency key's outcome, stored once."""

    event_type = "tidings.InboxRecorded"
    command: str
    status: str  # ok | rejected | fenced (compensated before it ran: it never will)
    result: dict[str, Any] | None = None
    error: str = ""


@dataclass
class Command(Generic[T]):
    """A command delivered to a handler: its data, idempotency key and saga context.

    `data` is an instance of the handler's input type (`Command[ReserveCredit]`),
    or, without one, the decoded JSON (a dict for a saga's command).
    """

    name: str
    data: T
    key: str
    headers: Mapping[str, str]
    message: Message
    _saves: list[Aggregate] = field(default_factory=list)

    @property
    def saga_id(self) -> str | None:
        return self.headers.get("saga-id")

    @property
    def attempt(self) -> int:
        return int(self.headers.get("saga-attempt", "1"))

    def save(self, *aggregates: Aggregate) -> None:
        """Store these aggregates' new events together with the inbox record and the reply."""
        for agg in aggregates:
            if not isinstance(agg, Aggregate):
                raise InvalidArgument("cmd.save takes tidings.Aggregate instances")
            if agg not in self._saves:
                self._saves.append(agg)


class CommandHandler:
    """Runs one `@hub.handler` function for its command topic."""

    def __init__(self, hub: Hub, command: str, fn: HandlerFn, *, group: str | None,
                 concurrency: int, conflict_retries: int = 10, inline: bool = False,
                 ack_wait: float = 60.0, input: type[Any] | None = None) -> None:
        _topics.validate_topic(command)
        if not inspect.iscoroutinefunction(fn):
            raise InvalidArgument(f"handler {getattr(fn, '__name__', fn)!r} must be async")
        self.hub = hub
        self.command = command
        self.fn = fn
        #: the type `cmd.data` is decoded to (None: the decoded JSON)
        self.input = _input_of(fn, command, input)
        self._fast = None if self.input is None else json_decoder(self.input)
        self.group = group or ("handler-" + command.replace(".", "-"))
        self.concurrency = concurrency
        self.conflict_retries = conflict_retries
        self.inline = inline
        self.ack_wait = ack_wait

    def inbox_stream(self, key: str) -> str:
        return inbox_stream(self.command, key)

    async def run(self) -> None:
        sub = await self.hub.subscribe(self.command, group=self.group, ordered=True,
                                       max_in_flight=max(self.concurrency, 1) * 4,
                                       ack_wait=self.ack_wait, max_deliver=50)
        try:
            await feed(sub, self._one, self.concurrency)
        finally:
            await sub.close()

    async def _one(self, msg: Message, slots: asyncio.Semaphore) -> None:
        tel = self.hub.telemetry
        if tel is None:
            await self._settle_one(msg, slots)
        else:
            with tel.process(msg, self.group):
                await self._settle_one(msg, slots)

    async def _settle_one(self, msg: Message, slots: asyncio.Semaphore) -> None:
        try:
            dead = await self.handle(msg)
            if dead is None:
                await msg.ack()
            else:
                await msg.term(reason=dead[0], error=dead[1])
        except asyncio.CancelledError:
            msg._hand_back()  # stopped, not failed: no attempt spent, never dead-lettered
            raise
        except Exception:
            log.exception("handler for %s failed to settle position %d", self.command,
                          msg.position)
            await msg.nack(min(5.0, 0.05 * 2 ** msg.attempt))
        finally:
            slots.release()

    def decode(self, msg: Message) -> Any:
        """The command's data for the handler: an instance of its input type (else
        InvalidArgument naming the field), or the decoded JSON when it has none."""
        if self.input is None:
            return _decode(msg)
        if self._fast is not None and msg.headers.get("content-type") == JSON:
            try:
                return self._fast(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass  # the slow path says which field, and why
        try:
            value = msg.decode()
        except Exception:
            raise InvalidArgument(
                f"command {self.command!r} is not JSON ({msg.content_type or 'no content type'}"
                f"); send a JSON object with the fields of {self.input.__name__}",
                field="$") from None
        return validate(self.input, value, f"command {self.command!r}")

    async def handle(self, msg: Message) -> tuple[str, str] | None:
        """Handle one delivery: replay the stored reply, or run the handler once.

        Returns None, or the dead letter's (reason, error) when the delivery is not to be
        retried (`decode-error`: the command does not fit the handler's input type;
        it was answered with a rejection).
        """
        key = msg.headers.get("idempotency-key") or msg.id
        stream = self.inbox_stream(key)
        for _ in range(self.conflict_retries):
            stored = await _stored(self.hub, stream)
            if stored is not None:
                if stored.status == "fenced":  # its saga gave up on it: never runs now
                    await self._reply(msg, "rejected", None, stored.error or FENCED)
                else:
                    await self._reply(msg, stored.status, stored.result, stored.error)
                return None
            fence = await _fence_of(self.hub, msg.headers)
            dead: tuple[str, str] | None = None
            saves: list[Aggregate] = []
            try:
                cmd: Command[Any] = Command(self.command, self.decode(msg), key, msg.headers, msg)
            except InvalidArgument as invalid:
                # Malformed: the function never sees it, and no retry can fix it. Answered
                # as a rejection, so its saga compensates now instead of timing out.
                log.warning("command %s at position %d does not fit %s; dead-lettered: %s",
                            self.command, msg.position, getattr(self.input, "__name__", "?"),
                            invalid)
                dead = (DECODE_ERROR, str(invalid))
                if msg.headers.get("saga-kind") == "compensation":
                    await self._reply(msg, "error", None, f"compensation rejected: {invalid}")
                    return dead
                status, data, error = "rejected", None, str(invalid)
            else:
                try:
                    result = await self.fn(cmd)
                except Rejected as exc:
                    if msg.headers.get("saga-kind") == "compensation":
                        # A compensation must not be refused for good: store nothing, so a
                        # retry of the (then stuck) saga runs the handler again.
                        await self._reply(msg, "error", None,
                                          f"compensation rejected: {exc.reason}")
                        return None
                    status, data, error = "rejected", None, exc.reason
                except Exception as exc:  # a failure: nothing is stored, the saga may retry
                    log.warning("handler for %s failed: %r", self.command, exc)
                    await self._reply(msg, "error", None, f"{type(exc).__name__}: {exc}")
                    return None
                else:
                    if result is not None and not isinstance(result, dict):
                        await self._reply(msg, "error", None,
                                          "a command handler must return a dict or None")
                        return None
                    status, data, error = "ok", result, ""
                    saves = cmd._saves
            record = InboxRecorded(command=self.command, status=status, result=data, error=error)
            try:
                await self._commit(msg, stream, record, saves, fence)
                return dead
            except ConcurrencyError:
                # a duplicate raced us, an aggregate moved, or the fenced command ran
                # meanwhile (then the compensation runs again and undoes it): look again
                continue
        raise RuntimeError(f"command {key!r} kept conflicting; will be redelivered")

    def _reply_message(self, msg: Message, status: str, result: dict[str, Any] | None,
                       error: str) -> OutMessage | None:
        reply_to = msg.headers.get("reply-to")
        if not reply_to:
            return None
        h = {k: v for k, v in msg.headers.items() if k.startswith("saga-")}
        h.update({"status": status, "correlation-id": msg.headers.get("correlation-id", ""),
                  "causation-id": msg.id})
        if error:
            h["error"] = error[:1000]
        raw, ct = encode_data(result or {})
        h["content-type"] = ct
        if self.hub.telemetry is not None:  # the reply joins the handler's trace
            self.hub.telemetry.replying(h, status, error)
        return OutMessage(new_id(), reply_to, msg.key, raw, h, False)

    async def _reply(self, msg: Message, status: str, result: dict[str, Any] | None,
                     error: str) -> None:
        out = self._reply_message(msg, status, result, error)
        if out is not None:
            self.hub.counters.on_publish([out], await self.hub.engine.append([out]))

    async def _commit(self, msg: Message, stream: str, record: InboxRecorded,
                      saves: list[Aggregate], fence: InboxAppend | None) -> None:
        from ..eventsourcing.transaction import commit

        reply = self._reply_message(msg, record.status, record.result, record.error)
        appends: list[InboxAppend] = [(stream, [record], NO_STREAM, "inbox")]
        if fence is not None and record.status == "ok":
            appends.append(fence)
        await commit(self.hub, saves, appends, [reply] if reply else [],
                     headers={"causation-id": msg.id,
                              "correlation-id": msg.headers.get("correlation-id", msg.id)})


InboxAppend = tuple[str, list[Event], int, str]


def inbox_stream(command: str, key: str) -> str:
    """The stream holding the outcome of command `command` under idempotency key `key`."""
    return f"inbox-{command}-{key}"


async def _stored(hub: Hub, stream: str) -> InboxRecorded | None:
    async for rec in hub.events.read(stream, to_version=1):
        ev = rec.event
        if isinstance(ev, InboxRecorded):
            return ev
    return None


async def fence_append(hub: Hub, command: str, key: str) -> InboxAppend | None:
    """The append that fences command `command` under `key` (its inbox records that
    its saga gave up on it), or None if it already ran or is fenced.

    Commit it atomically with what the saga does instead: it expects the inbox
    stream not to exist, as the command's own commit does, so exactly one of
    them is stored; a conflict means the command ran meanwhile — look again.
    """
    stream = inbox_stream(command, key)
    if await _stored(hub, stream) is not None:
        return None
    return (stream, [InboxRecorded(command=command, status="fenced", error=FENCED)],
            NO_STREAM, "inbox")


async def _fence_of(hub: Hub, headers: Mapping[str, str]) -> InboxAppend | None:
    command, key = headers.get(FENCE_COMMAND), headers.get(FENCE_KEY)
    if not command or not key or headers.get("saga-kind") != "compensation":
        return None
    return await fence_append(hub, command, key)


def _decode(msg: Message) -> Any:
    try:
        return msg.decode()
    except Exception:
        return msg.data


def _input_of(fn: HandlerFn, command: str, given: type[Any] | None) -> type[Any] | None:
    """A handler's input type: `input=`, or `T` of its parameter's `Command[T]`."""
    what = f"handler {getattr(fn, '__name__', fn)!r} for {command!r}"
    if given is not None:
        check_input_type(given, what)
    try:
        hint = parameter_type(fn, what)
    except InvalidArgument:
        if given is not None:
            return given  # said explicitly: the annotation is not needed
        raise
    if get_origin(hint) is not Command:
        return given
    (annotated,) = get_args(hint)
    if not is_input_type(annotated):
        if annotated is Any or annotated is dict or get_origin(annotated) is dict:
            return given  # the decoded JSON
        raise InvalidArgument(
            f"{what}: Command[{annotated!r}] is not an input type; use {KINDS}, or "
            "Command[dict[str, Any]] for the decoded JSON")
    if given is not None and given is not annotated:
        raise InvalidArgument(
            f"{what} has input={given.__name__} but its parameter is annotated "
            f"Command[{annotated.__name__}]; give one of them")
    return check_input_type(annotated, what)

