"""`hub.sagas(definition)`: start, inspect, wait for, cancel and retry one definition's sagas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..errors import InvalidArgument, NotFound
from .coordinator import Coordinator, check_saga_id
from .definition import Saga, SagaStarted, SagaState
from .moves import stream_id
from .timeline import fold_timeline

__all__ = ["SagaRunner", "view"]


class SagaRunner:
    """The sagas of one definition on one hub (get it from `hub.sagas(defn)`)."""

    def __init__(self, coordinator: Coordinator, defn: Saga) -> None:
        self._c = coordinator
        self.definition = defn

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def input(self) -> type[Any] | None:
        """The type the saga's data must fit (`Saga(..., input=T)`), or None."""
        return self.definition.input

    async def start(self, data: object, id: str | None = None) -> str:
        """Start a saga and return its id at once; the work runs asynchronously.

        `data` is a dict (JSON object), or an instance of the saga's `input` type;
        with an `input` type, data that does not fit it raises `InvalidArgument`
        naming the field, and nothing is stored. Starting again with the same `id`
        is a no-op that returns the same id.
        """
        self._c.hub.check_open()
        return await self._c.start(self.definition, data, id)

    async def get(self, id: str) -> dict[str, Any]:
        """The saga's status, data, step history, and why it compensated or is stuck."""
        state = await self._c.load(self.name, check_saga_id(id))
        if not state.version:
            raise NotFound(f"no saga {id!r} of {self.name!r}; check the id")
        return view(state)

    async def timeline(self, id: str) -> dict[str, Any]:
        """`get(id)`, plus `timeline`: each step's attempts with their start, duration,
        outcome, the command sent and the reply (see saga/timeline.py)."""
        sid = check_saga_id(id)
        events = [(r.event, r.timestamp) async for r in
                  self._c.hub.events.read(stream_id(self.name, sid))]
        if not events:
            raise NotFound(f"no saga {id!r} of {self.name!r}; check the id")
        first = events[0][0]
        defn = self._c.definition(self.name, first.version) \
            if isinstance(first, SagaStarted) else None
        state, rows = fold_timeline(defn, sid, events)
        return {**view(state), "timeline": rows}

    async def wait(self, id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the saga is completed, compensated or stuck, and return `get(id)`."""
        state = await self._c.wait(self.name, check_saga_id(id), timeout)
        if not state.version:
            raise NotFound(f"no saga {id!r} of {self.name!r}; check the id")
        return view(state)

    async def cancel(self, id: str, reason: str = "cancelled") -> None:
        """Ask a running saga to stop and compensate what it did.

        The compensations run in the coordinator, to completion, even if the
        caller is cancelled. A saga past its pivot cannot be cancelled: it
        finishes forward.
        """
        if not isinstance(reason, str):
            raise InvalidArgument(f"a cancel reason is text, got {type(reason).__name__}")
        await self._c.cancel(self.name, check_saga_id(id), reason)

    async def retry(self, id: str) -> None:
        """Resume a stuck saga (its failed compensation or forward step is tried again)."""
        await self._c.retry(self.name, check_saga_id(id))

    async def list(self, status: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every saga of this definition (optionally by status), oldest first."""
        async for m in self._c.hub.read(f"saga.{self.name}.started"):
            sid = m.headers.get("stream-id", "")
            state = await self._c.load(self.name, sid[len(f"saga-{self.name}-"):])
            if status is None or state.status == status:
                yield view(state)


def view(state: SagaState) -> dict[str, Any]:
    return {
        "id": state.id, "saga": state.name, "version": state.version, "status": state.status,
        "data": state.data, "reason": state.reason, "error": state.error,
        "started": state.started, "finished": state.finished,
        "steps": state.history,
    }

