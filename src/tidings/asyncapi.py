"""The application's AsyncAPI 3.0 document, made from what it registered on a hub.

`hub.asyncapi()` describes, with no I/O: each `@hub.subscriber` (a `receive`
operation on its topic or pattern, the payload typed by its parameter's
annotation), each `@hub.handler` (a `receive` operation on its command topic,
replying wherever the command's `reply-to` header points), each topic declared
with `hub.publishes` (a `send` operation), and each saga's commands and their
compensations (`send` operations whose AsyncAPI `reply` is the saga's reply
topic `saga.<name>.replies.{slot}`) and its start (the `SagaStarted` event on
`saga.<name>.started`, whose `data` is the saga's input). Payload schemas come from `inputs.input_schema`,
named under `components.schemas`, so every `$ref` resolves inside the document.

A subscription pattern is not an address AsyncAPI knows, so a channel for one
gets parameters instead of wildcards: `orders.*.paid` has the address
`orders.{token1}.paid`, `orders.>` has `orders.{rest}`, and the pattern itself is
kept as the channel's `x-tidings-pattern`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import topics as _topics
from .errors import InvalidArgument
from .inputs import check_schema, decodable, input_schema, is_input_type
from .messages import Message

if TYPE_CHECKING:
    from .pubsub import Handler
    from .saga.definition import Saga
    from .saga.handlers import CommandHandler

__all__ = ["ASYNCAPI_VERSION", "PublishedTopic", "declare", "document"]

ASYNCAPI_VERSION = "3.0.0"
MAX_DESCRIPTION = 10_000
#: what AsyncAPI allows as the key of a component (and what we use for every id)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_REPLY_TO = "$message.header#/reply-to"
_SERVER_NAME = re.compile(r"[A-Za-z0-9_\-]+\Z")

_STR = {"type": "string"}
_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "tidings message headers (str -> str)",
    "properties": {
        "content-type": {**_STR, "description": "how the data is encoded"},
        "correlation-id": _STR,
        "causation-id": _STR,
        "traceparent": {**_STR, "description": "W3C trace context"},
    },
    "additionalProperties": _STR,
}
_COMMAND_HEADERS: dict[str, Any] = {
    **_HEADERS,
    "description": "a command's headers; a saga sets them all",
    "properties": {
        **_HEADERS["properties"],
        "reply-to": {**_STR, "description": "the topic the reply goes to"},
        "idempotency-key": {**_STR, "description": "a redelivered command with the same key "
                            "changes nothing and gets the stored reply"},
        "saga-id": _STR, "saga-name": _STR, "saga-version": _STR, "saga-step": _STR,
        "saga-step-name": _STR, "saga-kind": {"type": "string",
                                              "enum": ["action", "compensation"]},
        "saga-attempt": _STR,
        "saga-coordinator": {**_STR, "description": "the id of the coordinator that sent "
                             "the command; the reply carries it back"},
    },
}
_REPLY_HEADERS: dict[str, Any] = {
    **_HEADERS,
    "description": "a reply's headers: the command's saga-* headers, and its outcome",
    "properties": {
        **_COMMAND_HEADERS["properties"],
        "status": {"type": "string", "enum": ["ok", "rejected", "error"],
                   "description": "ok: the payload is the handler's result; rejected: a "
                   "business refusal (tidings.Rejected); error: the handler failed"},
        "error": {**_STR, "description": "why, when the status is not ok"},
    },
    "required": ["status"],
}
_STARTED_HEADERS = {
    **_HEADERS,
    "description": "an event's headers (the event store publishes each event it stores)",
    "properties": {
        **_HEADERS["properties"],
        "event-type": {"const": "tidings.saga.SagaStarted"},
        "event-version": _STR, "stream-id": {**_STR, "description": "saga-<name>-<id>"},
        "stream-version": _STR, "event-position": _STR,
    },
}
_CORRELATION = {"location": "$message.header#/correlation-id"}


@dataclass(frozen=True, slots=True)
class PublishedTopic:
    """A topic the application publishes to, declared with `hub.publishes`."""

    topic: str
    payload_type: Any = None
    description: str | None = None


def declare(topic: object, payload_type: object = None,
            description: object = None) -> PublishedTopic:
    """`hub.publishes(...)`'s arguments checked: InvalidArgument says what is wrong."""
    if not isinstance(topic, str):
        raise InvalidArgument(f"publishes() takes a topic name (str), got {topic!r}")
    if any(t in ("*", ">") for t in topic.split(".")):
        raise InvalidArgument(f"publishes({topic!r}): a published topic is one topic, not a "
                              "pattern; declare each topic the application publishes to")
    _topics.validate_topic(topic)
    if payload_type is not None and (payload_type is Message or not _decodable(payload_type)):
        raise InvalidArgument(
            f"publishes({topic!r}): payload_type must be a msgspec Struct, a dataclass, a "
            f"pydantic model, a JSON type (dict, list, int, ...), str or bytes, got "
            f"{payload_type!r}")
    if payload_type is not None and payload_type is not bytes and payload_type is not str:
        check_schema(payload_type, f"publishes({topic!r}): payload_type")
    if description is not None and (not isinstance(description, str)
                                    or len(description) > MAX_DESCRIPTION):
        raise InvalidArgument(f"publishes({topic!r}): description must be a str of at most "
                              f"{MAX_DESCRIPTION} characters, got {description!r:.80}")
    return PublishedTopic(topic, payload_type, description)


def _decodable(tp: object) -> bool:
    try:
        return decodable(tp)
    except Exception:  # (an object msgspec cannot even inspect)
        return False


def document(*, subscribers: Sequence[Handler], handlers: Sequence[CommandHandler],
             sagas: Sequence[Saga], published: Iterable[PublishedTopic],
             title: str | None = None, version: str = "1.0.0",
             servers: Mapping[str, str | Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of these registrations (see the module docstring)."""
    if title is not None and not isinstance(title, str):
        raise InvalidArgument(f"title must be a str, got {title!r}")
    if not isinstance(version, str) or not version:
        raise InvalidArgument(f"version must be a non-empty str, got {version!r}")
    b = _Builder()
    for decl in published:
        cid = b.channel(decl.topic)
        if decl.description:
            b.channels[cid].setdefault("description", decl.description)
        mid = b.event(decl.payload_type)
        b.operation(f"publish.{decl.topic}", {
            "action": "send", "channel": _ref("channels", cid),
            "summary": f"the application publishes to {decl.topic}",
            **({"description": decl.description} if decl.description else {}),
            "messages": [b.attach(cid, mid)],
        })
    for h in subscribers:
        cid = b.channel(h.pattern)
        mid = b.event(h.decode_as)
        b.operation(f"receive.{h.group}", {
            "action": "receive", "channel": _ref("channels", cid),
            "summary": f"{_name(h.fn)} handles each message (group {h.group})",
            "messages": [b.attach(cid, mid)],
            "x-tidings-group": h.group,
        })
    b.commands(handlers, sagas)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title or "tidings application",
            "version": version,
            "description": (
                "Channels are tidings topics. A channel whose address has parameters "
                "stands for a subscription pattern (its x-tidings-pattern): a parameter "
                "named token<n> is one token ('*'), one named rest is the rest of the "
                "topic ('>'). Commands reply on the topic named by their reply-to header."),
        },
        **({"servers": _servers(servers)} if servers else {}),
        "defaultContentType": "application/json",
        "channels": b.channels,
        "operations": b.operations,
        "components": {"schemas": b.schemas, "messages": b.messages},
    }


def _servers(servers: object) -> dict[str, Any]:
    """`servers=` checked: names to AsyncAPI Server Objects (at least `host` and
    `protocol`) or to URLs such as `nats://nats.internal:4222`, whose user and password
    are left out of the document."""
    if not isinstance(servers, Mapping):
        raise InvalidArgument(f"servers must be a mapping of names to URLs or AsyncAPI "
                              f"Server Objects, got {servers!r:.80}")
    out: dict[str, Any] = {}
    for name, server in servers.items():
        if not isinstance(name, str) or not _SERVER_NAME.match(name):
            raise InvalidArgument(f"server name {name!r} must be letters, digits, '_' or '-'")
        if isinstance(server, str):
            url = urlsplit(server)
            if not url.scheme or not url.hostname:
                raise InvalidArgument(f"server {name!r}: {server!r} is not a URL with a host, "
                                      "such as 'nats://nats.internal:4222'")
            host = url.hostname if url.port is None else f"{url.hostname}:{url.port}"
            out[name] = {"host": host, "protocol": url.scheme,
                         **({"pathname": url.path} if url.path not in ("", "/") else {})}
        elif isinstance(server, Mapping) and all(
                isinstance(server.get(k), str) and server.get(k) for k in ("host", "protocol")):
            out[name] = dict(server)
        else:
            raise InvalidArgument(f"server {name!r} must be a URL or a mapping with a str "
                                  f"'host' and 'protocol', got {server!r:.80}")
    return out


def _ref(*path: str) -> dict[str, str]:
    # (no id holds '/' or '~', so no JSON-pointer escaping is needed)
    return {"$ref": "#/" + "/".join(path)}


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name) or "_"


def _unique(name: str, taken: Iterable[str]) -> str:
    taken = set(taken)
    found, n = name, 1
    while found in taken:
        n += 1
        found = f"{name}_{n}"
    return found


def _address(pattern: str) -> tuple[str, dict[str, Any]]:
    """A topic pattern as an AsyncAPI address with parameters for its wildcards."""
    tokens: list[str] = []
    params: dict[str, Any] = {}
    for t in pattern.split("."):
        if t == "*":
            name = f"token{len(params) + 1}"
            params[name] = {"description": "any one token (the pattern's '*')"}
            tokens.append("{" + name + "}")
        elif t == ">":
            params["rest"] = {"description": "one or more tokens joined by '.' "
                                             "(the pattern's '>')"}
            tokens.append("{rest}")
        else:
            tokens.append(t)
    return ".".join(tokens), params


class _Builder:
    """The document's maps, filled as the registrations are walked."""

    def __init__(self) -> None:
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.schemas: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self._channel_ids: dict[str | None, str] = {}  # pattern (None: reply-to) -> id
        self._message_ids: dict[tuple[str, Any], str] = {}  # (role, type) -> id
        self._schema_refs: dict[Any, dict[str, Any]] = {}  # type -> its payload schema

    # channels and operations ------------------------------------------------------------
    def channel(self, pattern: str | None, description: str | None = None) -> str:
        found = self._channel_ids.get(pattern)
        if found is not None:
            return found
        body: dict[str, Any] = {}
        if pattern is None:  # (AsyncAPI: a null address is one known only at runtime)
            cid = _unique("reply-to", self.channels)
            body["address"] = None
        else:
            address, params = _address(pattern)
            cid = _unique(_safe(address.replace("{", "").replace("}", "")), self.channels)
            body["address"] = address
            if params:
                body["parameters"] = params
                body["x-tidings-pattern"] = pattern
        if description:
            body["description"] = description
        body["messages"] = {}
        self.channels[cid] = body
        self._channel_ids[pattern] = cid
        return cid

    def saga_replies(self, saga: str) -> str:
        """The channel replies to saga `saga`'s commands come back on: the sending
        coordinator's slot (the address's last token), the coordinator in their
        `saga-coordinator` header."""
        pattern = f"saga.{saga}.replies.*"
        found = self._channel_ids.get(pattern)
        if found is not None:
            return found
        cid = _unique(_safe(f"saga.{saga}.replies"), self.channels)
        self.channels[cid] = {
            "address": f"saga.{saga}.replies.{{slot}}",
            "parameters": {"slot": {
                "description": "the slot of the coordinator that sent the command (a "
                               "number): each reads its slot and takes the replies whose "
                               "saga-coordinator header names it"}},
            "x-tidings-pattern": pattern,
            "description": f"replies to the commands of saga {saga}, on the topic the "
                           "command's reply-to header names (saga.<name>.replies itself "
                           "is read too, by all the coordinators together)",
            "messages": {},
        }
        self._channel_ids[pattern] = cid
        return cid

    def attach(self, cid: str, mid: str) -> dict[str, str]:
        """Put message `mid` on channel `cid`; the reference an operation uses for it."""
        self.channels[cid]["messages"].setdefault(mid, _ref("components", "messages", mid))
        return _ref("channels", cid, "messages", mid)

    def operation(self, name: str, body: dict[str, Any]) -> str:
        oid = _unique(_safe(name), self.operations)
        self.operations[oid] = body
        return oid

    # payloads and messages --------------------------------------------------------------
    def payload(self, tp: Any) -> tuple[dict[str, Any], str]:
        """(the schema, the content type) of data decoded as `tp`."""
        if tp is bytes:
            return {"type": "string", "format": "binary"}, "application/octet-stream"
        if tp is str:
            return {"type": "string"}, "text/plain"
        found = self._schema_refs.get(tp)
        if found is None:
            found = self._schema_refs[tp] = self._schema(tp)
        return found, "application/json"

    def _schema(self, tp: Any) -> dict[str, Any]:
        module = _safe(str(getattr(tp, "__module__", "") or "types"))
        name = _safe(str(getattr(tp, "__name__", "") or "Payload"))
        n = 0
        while True:
            # a name another type already holds gets this type's module as a prefix
            prefix = "" if n == 0 else f"{module}." if n == 1 else f"{module}.{n}."
            schema, named = input_schema(tp, prefix)
            own = None
            if is_input_type(tp) and "$ref" not in schema:  # (pydantic: inline) name it
                own = prefix + name
                named = {**named, own: schema}
            if all(self.schemas.get(k, v) == v for k, v in named.items()):
                self.schemas.update(named)
                return _ref("components", "schemas", own) if own else schema
            n += 1

    def _message(self, role: str, tp: Any, name: str, body: dict[str, Any]) -> str:
        key = (role, tp)
        found = self._message_ids.get(key)
        if found is None:
            found = _unique(_safe(name), self.messages)
            self.messages[found] = {"name": found, **body}
            self._message_ids[key] = found
        return found

    def event(self, tp: Any) -> str:
        """The message of a published or subscribed topic whose data is a `tp` (None or
        Message: any data)."""
        if tp is None or tp is Message:
            return self._message("event", None, "Message", {
                "summary": "any data (the subscriber takes a tidings.Message)",
                "headers": _HEADERS})
        schema, content_type = self.payload(tp)
        name = tp.__name__ if is_input_type(tp) else {
            bytes: "Bytes", str: "Text"}.get(tp, "Payload")
        return self._message("event", tp, name, {
            "contentType": content_type, "headers": _HEADERS, "payload": schema})

    def command(self, tp: Any) -> str:
        """The message of a command a handler decodes as `tp` (None: any JSON object)."""
        if tp is None:
            return self._message("command", None, "Command", {
                "summary": "a command (the handler takes its JSON object as it is)",
                "headers": _COMMAND_HEADERS, "payload": {"type": "object"},
                "correlationId": _CORRELATION})
        schema, content_type = self.payload(tp)
        return self._message("command", tp, f"{tp.__name__}Command", {
            "contentType": content_type, "headers": _COMMAND_HEADERS, "payload": schema,
            "correlationId": _CORRELATION})

    def saga_command(self, saga: Saga) -> str:
        """The message a saga sends its commands as: its data (input, what earlier
        steps returned, its id; `reason` for a compensation)."""
        own = {"type": "object", "properties": {
            "saga_id": {"type": "string", "description": "the saga's id"},
            "reason": {"type": "string", "description": "why a compensation runs"}},
            "required": ["saga_id"]}
        schema = own if saga.input is None else {"allOf": [self.payload(saga.input)[0], own]}
        return self._message("saga", saga.name, f"{saga.name}.Command", {
            "summary": f"a command of saga {saga.name}: the saga's data (its input, what "
                       "earlier steps returned) and its id",
            "headers": _COMMAND_HEADERS, "payload": schema, "correlationId": _CORRELATION})

    def reply(self) -> str:
        """A command's reply: the JSON object its handler returned (a handler returns a
        dict or None; `CommandHandler` answers anything else with an error)."""
        return self._message("reply", None, "Reply", {
            "summary": "a command's reply: the handler's result when the status is ok",
            "headers": _REPLY_HEADERS, "payload": {"type": "object"},
            "correlationId": _CORRELATION})

    def saga_started(self, saga: Saga) -> str:
        """The `SagaStarted` event a saga's start stores and publishes on
        `saga.<name>.started`: its `data` is the saga's input."""
        data = {"type": "object"} if saga.input is None else self.payload(saga.input)[0]
        return self._message("started", saga.name, f"{saga.name}.Started", {
            "summary": f"a {saga.name} saga started with this data",
            "contentType": "application/json",
            "headers": _STARTED_HEADERS,
            "payload": {"type": "object", "required": ["saga", "version", "data"],
                        "properties": {
                            "saga": {"const": saga.name},
                            "version": {"type": "integer", "minimum": 1},
                            "data": data,
                            "trace": {"type": ["string", "null"],
                                      "description": "the W3C traceparent its commands "
                                      "carry (null: not traced)"}}},
            "correlationId": _CORRELATION})

    # commands, their handlers and the sagas that send them -------------------------------
    def commands(self, handlers: Sequence[CommandHandler], sagas: Sequence[Saga]) -> None:
        # the message each command topic is typed by here: its handler's (else a saga's)
        # (a handler's reply is the dict it returns, or {}: CommandHandler refuses others)
        typed = {h.command: (self.command(h.input), self.reply())
                 for h in handlers if h.input is not None}
        replies = {h.command: self.reply() for h in handlers}
        for saga in sagas:
            started = self.channel(f"saga.{saga.name}.started",
                                   f"the {saga.name} sagas started (their SagaStarted events)")
            self.operation(f"start.{saga.name}", {
                "action": "send", "channel": _ref("channels", started),
                "summary": f"start a {saga.name} saga: hub.sagas(definition).start(data), "
                           f"or POST /v1/commands/{saga.name} on the gateway",
                "messages": [self.attach(started, self.saga_started(saga))],
                "x-tidings-saga": saga.name,
            })
            reply_cid = self.saga_replies(saga.name)
            for i, step in enumerate(saga.steps):
                for kind, command in (("action", step.command),
                                      ("compensation", step.compensation)):
                    if not isinstance(command, str):
                        continue
                    cid = self.channel(command)
                    mid, rid = typed.get(command) or (self.saga_command(saga),
                                                      replies.get(command) or self.reply())
                    name = f"{saga.name}.{step.name}"
                    self.operation(name if kind == "action" else name + ".compensate", {
                        "action": "send", "channel": _ref("channels", cid),
                        "summary": (f"saga {saga.name} step {i + 1} ({step.name}): "
                                    + ("its command" if kind == "action"
                                       else "its compensation")),
                        "messages": [self.attach(cid, mid)],
                        "reply": {"channel": _ref("channels", reply_cid),
                                  "messages": [self.attach(reply_cid, rid)]},
                        "x-tidings-saga": saga.name,
                    })
        for h in handlers:
            cid = self.channel(h.command)
            if h.input is not None:
                mids = [typed[h.command][0]]
            else:  # what the sagas here send it, else any object
                mids = list(self.channels[cid]["messages"]) or [self.command(None)]
            reply_cid = self.channel(None, "the topic a command's reply-to header names "
                                           "(a saga's saga.<name>.replies.<slot>)")
            self.operation(f"handle.{h.command}", {
                "action": "receive", "channel": _ref("channels", cid),
                "summary": f"{_name(h.fn)} handles the command (group {h.group})",
                "messages": [self.attach(cid, m) for m in mids],
                "reply": {"address": {"location": _REPLY_TO,
                                      "description": "the command's reply-to header"},
                          "channel": _ref("channels", reply_cid),
                          "messages": [self.attach(reply_cid, replies[h.command])]},
                "x-tidings-group": h.group,
            })
