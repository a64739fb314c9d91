"""OpenTelemetry tracing (`tidings.connect(url, telemetry=True)`; the `otel` extra).

Off by default: the hub then holds no `Telemetry`, every instrumented site is one
`is not None` check, and `opentelemetry` is never imported. On, spans follow the
messaging semantic conventions (names `{operation} {destination}`):

- `send <topic>` (PRODUCER) around `publish`/`publish_many`; its context goes into
  each message's headers as W3C `traceparent`/`tracestate`. A message that already
  carries a `traceparent` (set by the application, or by the gateway for the HTTP
  request it came in) keeps it: the span links to it instead;
- `process <topic>` (CONSUMER) around a subscriber function or a command handler,
  a child of the context the message carries, so a redelivery is a second
  `process` span beside the first (the failure recorded on the first);
- `settle <topic>` (CLIENT) for each ack, nack and term (`messaging.operation.name`),
  a child of the span it is made in (the `process` span), else of the message's
  context;
- `saga <name>` when a saga starts (a child of whatever is current: the gateway's
  HTTP span for `POST /v1/commands/{saga}`). Its context is stored with the saga
  (`SagaStarted.trace`, so in its event stream): whichever coordinator drives the
  saga, however much later and after however many crashes, runs it in that
  context. Each step's command goes out under a `send <command>` span, a child of
  the saga's; the handler's `process` span is a child of that; its reply goes out
  under a `send saga.<name>.replies` span under the handler's, and the coordinator
  takes it in a `process` span under that. Compensations alike; inline handlers
  get a `process` span under the saga's;
- `process <projection>` for a projection handling an event, a child of the context
  the event was appended in (every append carries the current `traceparent`);
- `<METHOD> <route>` (SERVER) for each gateway request, a child of an incoming
  `traceparent`.

Attributes: `messaging.system` ("tidings"), `messaging.destination.name`,
`messaging.operation.type` (send | process | settle), `messaging.operation.name`
(publish | process | ack | nack | term), `messaging.consumer.group.name`,
`messaging.message.id`, `messaging.message.conversation_id` (the correlation id),
`messaging.message.body.size`, `messaging.batch.message_count`, `tidings.position`,
`tidings.attempt`, and for sagas `tidings.saga.name`/`.id`/`.step`/`.kind`/`.attempt`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .messages import Message, OutMessage, Published

__all__ = ["Telemetry", "telemetry_for"]

SYSTEM = "tidings"
_EXTRACTED_KEPT = 256  # contexts extracted from headers, kept for the next messages
_SAGA_HEADERS = (("saga-name", "tidings.saga.name"), ("saga-id", "tidings.saga.id"),
                 ("saga-step-name", "tidings.saga.step"), ("saga-kind", "tidings.saga.kind"))


def telemetry_for(option: object) -> Telemetry | None:
    """`connect(telemetry=...)`: False/None (off), True (the global tracer provider) or
    a TracerProvider."""
    if option is None or option is False:
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        from .errors import Unsupported

        raise Unsupported("telemetry needs OpenTelemetry's API: pip install 'tidings[otel]' "
                          "(and an SDK to export spans, such as opentelemetry-sdk)") from None
    if option is True:
        provider: Any = trace.get_tracer_provider()
    elif hasattr(option, "get_tracer"):
        provider = option
    else:
        from .errors import InvalidArgument

        raise InvalidArgument(f"telemetry is True, False or an OpenTelemetry TracerProvider, "
                              f"got {option!r}")
    return Telemetry(provider)


def _saga_attributes(h: Mapping[str, str], attrs: dict[str, Any]) -> None:
    for header, attribute in _SAGA_HEADERS:
        value = h.get(header)
        if value is not None:
            attrs[attribute] = value
    attempt = h.get("saga-attempt")
    if attempt is not None and attempt.isdigit():
        attrs["tidings.saga.attempt"] = int(attempt)


def span_topic(topic: str) -> str:
    """A topic as span names carry it: a coordinator's own reply topic,
    `saga.N.replies.<coordinator>`, as `saga.N.replies` (span names must not grow a new
    name per process; `messaging.destination.name` keeps the whole topic)."""
    if topic.startswith("saga.") and ".replies." in topic:
        return topic.rpartition(".")[0]
    return topic


class _Current:
    """A span made current until the block ends, then ended (what the tracer's
    `start_as_current_span` does, for a fraction of its cost on the hot paths)."""

    __slots__ = ("_telemetry", "_token", "span")

    def __init__(self, telemetry: Telemetry, span: Any) -> None:
        self._telemetry = telemetry
        self.span = span
        self._token: object = None

    def __enter__(self) -> Any:
        t = self._telemetry
        self._token = t._context.attach(t._trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        self._telemetry._context.detach(self._token)
        if isinstance(exc, Exception):
            self._telemetry.failed(self.span, exc)
        self.span.end()


class Telemetry:
    """The tracer and the W3C propagator a hub uses (built by `telemetry_for`)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import Link, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from . import __version__

        self._trace = trace
        self._context = context
        self._link = Link
        self._status, self._code = Status, StatusCode.ERROR
        self.tracer = provider.get_tracer("tidings", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._extracted: dict[tuple[str, str | None], Any] = {}  # see `extract`
        self._producer = trace.SpanKind.PRODUCER
        self._consumer = trace.SpanKind.CONSUMER
        self._client = trace.SpanKind.CLIENT
        self._server = trace.SpanKind.SERVER

    def _error(self, description: str) -> Any:
        return self._status(self._code, description[:200])

    # context in headers ---------------------------------------------------------------
    def inject(self, headers: MutableMapping[str, str], context: Any = None) -> None:
        """Write the current (or `context`'s) span context into `headers`."""
        self._propagator.inject(headers, context=context)

    def extract(self, headers: Mapping[str, str]) -> Any:
        """The context `headers` carry (None: they carry none)."""
        parent = headers.get("traceparent")
        if parent is None:
            return None
        key = (parent, headers.get("tracestate"))
        found = self._extracted.get(key)
        if found is None:
            # Contexts are immutable: the messages of one batch (one send span) share one.
            if len(self._extracted) >= _EXTRACTED_KEPT:
                self._extracted.clear()
            found = self._extracted[key] = self._propagator.extract(headers)
        return found

    def traceparent(self) -> str | None:
        """The current span context as a `traceparent` value (None: no span)."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get("traceparent")

    def carrying(self, headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
        """`headers` plus the current context, unless they carry one: for a message that
        is published later by another task (the gateway batches concurrent requests'
        messages), so that each keeps the trace of the request it came in."""
        if headers is not None and "traceparent" in headers:
            return headers
        carrier = dict(headers or {})
        self._propagator.inject(carrier)
        return carrier

    def adopt(self, trace: str | None) -> None:
        """Make the stored context `trace` (a saga's) current for the rest of this task:
        what a saga's driver does (its appends, its local steps' spans) joins its trace."""
        if trace is not None:
            self._context.attach(self._propagator.extract({"traceparent": trace}))

    # spans ------------------------------------------------------------------------------
    def send(self, topic: str, messages: Sequence[OutMessage]) -> _Current:
        """`send <topic>` around a publish; each message leaves with its context (or the
        one it already carries, which the span then links to)."""
        attrs: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.destination.name": topic,
            "messaging.operation.type": "send", "messaging.operation.name": "publish",
        }
        if len(messages) == 1:
            attrs["messaging.message.id"] = messages[0].id
            attrs["messaging.message.body.size"] = len(messages[0].data)
        else:
            attrs["messaging.batch.message_count"] = len(messages)
        # decided before any injection: messages of a batch may share one headers dict
        carried = [m for m in messages if m.headers and "traceparent" in m.headers]
        keep = {id(m) for m in carried}
        links = [self._link(self._trace.get_current_span(
            self.extract(m.headers or {})).get_span_context())
            for m in carried] if carried else None
        span = self.tracer.start_span(f"send {span_topic(topic)}", kind=self._producer,
                                      attributes=attrs,
                                      links=links)
        own: dict[str, str] = {}
        self._propagator.inject(own, context=self._trace.set_span_in_context(span))
        if own:  # (nothing: a no-op tracer)
            for m in messages:
                if keep and id(m) in keep:
                    continue
                if m.headers is None:
                    m.headers = dict(own)
                else:
                    m.headers.update(own)
        return _Current(self, span)

    def sent(self, span: Any, published: Published) -> Published:
        """Note where the engine stored a message sent in `span`; returns `published`."""
        span.set_attribute("tidings.position", published.position)
        return published

    @contextlib.contextmanager
    def sending(self, messages: Sequence[OutMessage]) -> Iterator[None]:
        """A `send <topic>` span per message of a saga's commit (commands, replies, its
        end): each a child of the context the message carries (the saga's for a command,
        the handler's for a reply), which it then carries instead."""
        spans = []
        for m in messages:
            h = m.headers if m.headers is not None else {}
            attrs: dict[str, Any] = {
                "messaging.system": SYSTEM, "messaging.destination.name": m.topic,
                "messaging.operation.type": "send", "messaging.operation.name": "publish",
                "messaging.message.id": m.id, "messaging.message.body.size": len(m.data),
            }
            if "saga-id" in h:
                _saga_attributes(h, attrs)
            span = self.tracer.start_span(f"send {span_topic(m.topic)}", context=self.extract(h),
                                          kind=self._producer, attributes=attrs)
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
            m.headers = {**h, **carrier}
            spans.append(span)
        try:
            yield
        except BaseException as exc:
            for span in spans:
                self.failed(span, exc)
            raise
        finally:
            for span in spans:
                span.end()

    def process(self, msg: Message, group: str) -> _Current:
        """`process <topic>` around handling one delivery, a child of the context the
        message carries."""
        h = msg.headers
        span = self.tracer.start_span(
            f"process {span_topic(msg.topic)}", context=self.extract(h), kind=self._consumer,
            # (what a sampler may look at; the rest only when the span records)
            attributes={"messaging.system": SYSTEM, "messaging.destination.name": msg.topic,
                        "messaging.operation.type": "process",
                        "messaging.consumer.group.name": group})
        if span.is_recording():
            attrs: dict[str, Any] = {
                "messaging.operation.name": "process", "messaging.message.id": msg.id,
                "messaging.message.body.size": len(msg.data),
                "tidings.position": msg.position, "tidings.attempt": msg.attempt,
            }
            correlation = h.get("correlation-id")
            if correlation:
                attrs["messaging.message.conversation_id"] = correlation
            if "saga-id" in h:
                _saga_attributes(h, attrs)
            span.set_attributes(attrs)
        return _Current(self, span)

    def settle(self, msg: Message, group: str, kind: str) -> None:
        """A `settle <topic>` span for an ack, nack or term of `msg` made now: a child of
        the current span (the handler's `process`), else of the message's context."""
        current = self._trace.get_current_span().get_span_context()
        span = self.tracer.start_span(
            f"settle {msg.topic}", context=None if current.is_valid else self.extract(
                msg.headers), kind=self._client)
        if span.is_recording():
            span.set_attributes({
                "messaging.system": SYSTEM, "messaging.destination.name": msg.topic,
                "messaging.operation.type": "settle", "messaging.operation.name": kind,
                "messaging.consumer.group.name": group, "messaging.message.id": msg.id,
                "tidings.position": msg.position, "tidings.attempt": msg.attempt})
        span.end()

    def replying(self, headers: MutableMapping[str, str], status: str, error: str) -> None:
        """A command handler's reply: it carries the current (the handler's) context, and
        the handler's span shows how the command went."""
        span = self._trace.get_current_span()
        span.set_attribute("tidings.reply.status", status)
        if status != "ok":
            span.set_status(self._error(f"{status}: {error}"))
        self._propagator.inject(headers)

    @contextlib.contextmanager
    def inline(self, command: str, group: str, saga: str, saga_id: str, step: str,
               kind: str, attempt: int) -> Iterator[Any]:
        """`process <command>` around an inline handler (run by the saga's driver, no
        message sent), a child of the current context: the saga's (see `adopt`)."""
        with self.tracer.start_as_current_span(
                f"process {command}", kind=self._consumer,
                attributes={"messaging.system": SYSTEM, "messaging.destination.name": command,
                            "messaging.operation.type": "process",
                            "messaging.operation.name": "process",
                            "messaging.consumer.group.name": group, "tidings.inline": True,
                            "tidings.saga.name": saga, "tidings.saga.id": saga_id,
                            "tidings.saga.step": step, "tidings.saga.kind": kind,
                            "tidings.saga.attempt": attempt}) as span:
            yield span

    def outcome(self, span: Any, outcome: Any) -> None:
        """Note an inline attempt's `Outcome` (None: contended, it did not run)."""
        kind = "contended" if outcome is None else outcome.kind
        span.set_attribute("tidings.reply.status", kind)
        if kind not in ("ok", "contended"):
            span.set_status(self._error(f"{kind}: {outcome.error}"))

    @contextlib.contextmanager
    def projecting(self, rec: Any, projection: str) -> Iterator[Any]:
        """`process <projection>` around a projection handling one event, a child of the
        context the event was appended in."""
        with self.tracer.start_as_current_span(
                f"process {projection}", context=self.extract(rec.headers),
                kind=self._consumer,
                attributes={"messaging.system": SYSTEM, "messaging.operation.type": "process",
                            "messaging.operation.name": "project",
                            "messaging.destination.name": projection,
                            "messaging.consumer.group.name": projection,
                            "tidings.position": rec.position, "tidings.stream_id": rec.stream_id,
                            "tidings.event.type": rec.type,
                            "tidings.event.version": rec.version}) as span:
            yield span

    def saga_started(self, name: str, saga_id: str) -> str | None:
        """A `saga <name>` span for a saga starting now (a child of the current span);
        returns its context (a `traceparent`) to store with the saga."""
        with self.tracer.start_as_current_span(
                f"saga {name}", attributes={"messaging.system": SYSTEM,
                                            "tidings.saga.name": name,
                                            "tidings.saga.id": saga_id}):
            return self.traceparent()

    @contextlib.contextmanager
    def server(self, method: str, path: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """A SERVER span for one gateway request, a child of its `traceparent`; named
        `<METHOD> <route>` once the route is known (see `routed`)."""
        with self.tracer.start_as_current_span(
                method, context=self.extract(headers), kind=self._server,
                attributes={"http.request.method": method, "url.path": path}) as span:
            yield span

    def routed(self, span: Any, method: str, route: str | None, status: int | None) -> None:
        """Name a request's span after its route template (low cardinality: one name for
        every saga id or topic) and note its status."""
        if route is not None:
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(self._error(f"HTTP {status}"))

    def failed(self, span: Any, exc: BaseException) -> None:
        span.record_exception(exc)
        span.set_status(self._error(f"{type(exc).__name__}: {exc}"))
