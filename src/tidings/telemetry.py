"""OpenTelemetry tracing (`tidings.connect(url, telemetry=True)`; the `otel` extra).

Off by default: the hub then holds no `Telemetry`, every instrumented site is one
`is not None` check, and `opentelemetry` is never imported. On, spans follow the
messaging semantic conventions:

- `send <topic>` (PRODUCER) around `publish`/`publish_many`; its context goes into
  each message's headers as W3C `traceparent`/`tracestate`;
- `process <topic>` (CONSUMER) around a subscriber function or a command handler,
  a child of the context the message carries, so a redelivery is a second
  `process` span beside the first;
- `saga <name>` when a saga starts (a child of whatever is current: the gateway's
  HTTP span for `POST /v1/commands/{saga}`). Its context is stored with the saga
  (`SagaStarted.trace`), so every step's command, sent by whichever coordinator
  drives the saga and however much later, carries it: the handlers' `process`
  spans, their replies and the compensations all join the saga's trace;
- `POST /v1/…` (SERVER) for each gateway request, a child of an incoming
  `traceparent`.

Attributes: `messaging.system` ("tidings"), `messaging.destination.name`,
`messaging.operation.type` (send | process), `messaging.operation.name`,
`messaging.consumer.group.name`, `messaging.message.id`, `messaging.batch.message_count`,
`tidings.position`, `tidings.attempt`, and for sagas `tidings.saga.name`/`.id`/`.step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .messages import Message, OutMessage

__all__ = ["Telemetry", "telemetry_for"]

SYSTEM = "tidings"


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


class Telemetry:
    """The tracer and the W3C propagator a hub uses (built by `telemetry_for`)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from . import __version__

        self._trace = trace
        self.tracer = provider.get_tracer("tidings", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._producer = trace.SpanKind.PRODUCER
        self._consumer = trace.SpanKind.CONSUMER
        self._server = trace.SpanKind.SERVER

    # context in headers ---------------------------------------------------------------
    def inject(self, headers: MutableMapping[str, str], context: Any = None) -> None:
        """Write the current (or `context`'s) span context into `headers`."""
        self._propagator.inject(headers, context=context)

    def extract(self, headers: Mapping[str, str]) -> Any:
        return self._propagator.extract(headers)

    def traceparent(self) -> str | None:
        """The current span context as a `traceparent` value (None: no span)."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get("traceparent")

    # spans ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def send(self, topic: str, messages: list[OutMessage]) -> Iterator[Any]:
        """`send <topic>` around a publish; each message leaves with its context."""
        attrs: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.destination.name": topic,
            "messaging.operation.type": "send", "messaging.operation.name": "publish",
        }
        if len(messages) == 1:
            attrs["messaging.message.id"] = messages[0].id
        else:
            attrs["messaging.batch.message_count"] = len(messages)
        with self.tracer.start_as_current_span(f"send {topic}", kind=self._producer,
                                               attributes=attrs) as span:
            for m in messages:
                if m.headers is None:
                    m.headers = {}
                self._propagator.inject(m.headers)
            yield span

    @contextlib.contextmanager
    def process(self, msg: Message, group: str, **extra: Any) -> Iterator[Any]:
        """`process <topic>` around handling one delivery, a child of the context the
        message carries."""
        attrs: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.destination.name": msg.topic,
            "messaging.operation.type": "process", "messaging.operation.name": "process",
            "messaging.consumer.group.name": group, "messaging.message.id": msg.id,
            "tidings.position": msg.position, "tidings.attempt": msg.attempt,
        }
        h = msg.headers
        if "saga-id" in h:
            attrs.update({"tidings.saga.name": h.get("saga-name", ""),
                          "tidings.saga.id": h["saga-id"],
                          "tidings.saga.step": h.get("saga-step-name", ""),
                          "tidings.saga.kind": h.get("saga-kind", "")})
        attrs.update(extra)
        parent = self._propagator.extract(h) if "traceparent" in h else None
        with self.tracer.start_as_current_span(f"process {msg.topic}", context=parent,
                                               kind=self._consumer, attributes=attrs) as span:
            yield span

    @contextlib.contextmanager
    def projecting(self, rec: Any, projection: str) -> Iterator[Any]:
        """`process <projection>` around a projection handling one event, a child of the
        context the event was appended in."""
        h = rec.headers
        parent = self._propagator.extract(h) if "traceparent" in h else None
        with self.tracer.start_as_current_span(
                f"process {projection}", context=parent, kind=self._consumer,
                attributes={"messaging.system": SYSTEM, "messaging.operation.type": "process",
                            "messaging.consumer.group.name": projection,
                            "tidings.position": rec.position, "tidings.stream_id": rec.stream_id,
                            "tidings.event.type": rec.type}) as span:
            yield span

    def saga_started(self, name: str, saga_id: str) -> str | None:
        """A `saga <name>` span for a saga starting now (a child of the current span);
        returns its context to store with the saga."""
        with self.tracer.start_as_current_span(
                f"saga {name}", attributes={"messaging.system": SYSTEM,
                                            "tidings.saga.name": name,
                                            "tidings.saga.id": saga_id}):
            return self.traceparent()

    @contextlib.contextmanager
    def server(self, method: str, path: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """A SERVER span for one gateway request, a child of its `traceparent`."""
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        with self.tracer.start_as_current_span(
                f"{method} {path}", context=parent, kind=self._server,
                attributes={"http.request.method": method, "url.path": path}) as span:
            yield span

    def failed(self, span: Any, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
