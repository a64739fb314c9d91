"""The saga's pure decision core: evolve / advance / on_outcome, and definition checks.

No I/O and no real time: `Sim` (tests/saga/_sim.py) plays the coordinator,
jumping its clock to every `Wait`.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tidings
from tidings.saga.definition import (
    DEFAULT_COMMAND_TIMEOUT,
    CompensationCompleted,
    CompensationFailed,
    CompensationStarted,
    Outcome,
    ReplyIgnored,
    Saga,
    SagaCancelRequested,
    SagaCompensated,
    SagaCompleted,
    SagaResumed,
    SagaStarted,
    SagaState,
    SagaStuck,
    Step,
    StepCompleted,
    StepFailed,
    StepStarted,
    Wait,
    advance,
    evolve,
    on_outcome,
)

from ._sim import OK, T0, TIMEOUT, Sim, cmd, error, local, noop, rejected


def compensated_steps(sim: Sim) -> list[int]:
    return [e.step for e in sim.of(CompensationCompleted)]


# the forward path -----------------------------------------------------------------------
def test_forward_path_completes_every_step_in_order() -> None:
    defn = Saga("fwd", [local("a"), cmd("b"), local("c", comp=False)])
    sim = Sim(defn, {"order": "o-1"})
    state = sim.run([Outcome("ok", result={"x": 1}), OK, Outcome("ok", result={"y": 2})])
    assert state.status == "completed"
    assert state.done
    assert sim.names() == ["SagaStarted",
                           "StepStarted", "StepCompleted",
                           "StepStarted", "StepCompleted",
                           "StepStarted", "StepCompleted",
                           "SagaCompleted"]
    assert [e.step for e in sim.of(StepStarted)] == [0, 1, 2]
    assert all(e.attempt == 1 for e in sim.of(StepStarted))
    assert state.completed == [0, 1, 2]
    # each returned dict merges into the saga's data; SagaCompleted carries it
    assert state.data == {"order": "o-1", "x": 1, "y": 2}
    assert sim.of(SagaCompleted)[0].data == state.data
    assert not sim.of(CompensationStarted)
    # nothing more to do once completed
    assert advance(defn, state, sim.now) is None
    assert on_outcome(defn, state, OK, sim.now) == []
    # history names the steps
    assert [h.get("name") for h in state.history if h["event"] == "StepCompleted"] == \
        ["a", "b", "c"]


def test_deadlines_command_default_and_local_without_timeout() -> None:
    defn = Saga("dl", [local("a"), cmd("b"), local("c", timeout=2.5)])
    sim = Sim(defn)
    [started] = sim.step()
    assert started.deadline is None  # a local step without timeout= has no deadline
    sim.step(OK)
    [started] = sim.step()
    assert started.deadline == T0 + DEFAULT_COMMAND_TIMEOUT == T0 + 30.0
    assert sim.state.pending is not None and sim.state.pending.kind == "action"
    sim.step(OK)
    [started] = sim.step()
    assert started.deadline == T0 + 2.5


def test_advance_waits_while_an_attempt_is_pending() -> None:
    defn = Saga("p", [cmd("a")])
    sim = Sim(defn)
    sim.step()
    assert advance(defn, sim.state, sim.now + 1e6) is None  # in flight: the outcome decides


# rejection ----------------------------------------------------------------------------------
def test_rejection_compensates_completed_steps_in_reverse_order() -> None:
    # b has no compensation (e.g. a read-only check): it is skipped
    defn = Saga("rej", [local("a"), local("b", comp=False), cmd("c"), local("d"),
                        cmd("e", retries=3)])
    sim = Sim(defn)
    state = sim.run([OK, OK, OK, OK, rejected("out of stock"), OK, OK, OK])
    assert state.status == "compensated"
    [failed] = sim.of(StepFailed)
    assert failed.step == 4 and failed.rejected and failed.retry_at is None
    assert failed.attempt == 1  # a rejection is never retried, whatever retries= says
    assert compensated_steps(sim) == [3, 2, 0]
    assert [e.step for e in sim.of(CompensationStarted)] == [3, 2, 0]
    assert state.reason == "step e failed: out of stock"
    assert sim.of(SagaCompensated)[0].reason == state.reason
    # a command compensation has a deadline (the step's timeout), a local one none
    starts = {e.step: e for e in sim.of(CompensationStarted)}
    assert starts[2].deadline is not None and starts[3].deadline is None


def test_first_step_rejected_nothing_to_compensate() -> None:
    sim = Sim(Saga("r0", [cmd("a"), cmd("b")]))
    state = sim.run([rejected()])
    assert state.status == "compensated"
    assert sim.names() == ["SagaStarted", "StepStarted", "StepFailed", "SagaCompensated"]


def test_command_compensation_of_a_local_step_gets_a_deadline() -> None:
    # local action (no timeout) compensated by a command: the compensation must not wait
    # for its reply forever
    defn = Saga("lc", [Step("a", action=noop, compensation="svc.undo_a"), cmd("b")])
    sim = Sim(defn)
    for move in (None, OK, None, rejected()):
        sim.step(move)
    [cs] = sim.step()
    assert isinstance(cs, CompensationStarted)
    assert cs.deadline == T0 + DEFAULT_COMMAND_TIMEOUT


# retries and backoff ---------------------------------------------------------------------
def test_retries_with_exponential_backoff_capped() -> None:
    defn = Saga("rt", [cmd("a", retries=4, backoff=0.5, max_backoff=1.5)])
    sim = Sim(defn)
    state = sim.run([error("e1"), TIMEOUT, error("e3"), error("e4"), OK])
    assert state.status == "completed"
    failed = sim.of(StepFailed)
    assert [f.attempt for f in failed] == [1, 2, 3, 4]
    # backoff 0.5, doubling, capped at 1.5; each retry starts exactly at its retry_at
    gaps = [0.5, 1.0, 1.5, 1.5]
    expected, t = [], T0
    for g in gaps:
        t += g
        expected.append(t)
    assert [f.retry_at for f in failed] == expected
    starts = sim.of(StepStarted)
    assert [s.attempt for s in starts] == [1, 2, 3, 4, 5]
    assert [s.deadline for s in starts] == [T0 + 30.0] + [x + 30.0 for x in expected]


def test_advance_returns_wait_until_retry_at() -> None:
    defn = Saga("w", [cmd("a", retries=1, backoff=2.0)])
    sim = Sim(defn)
    sim.step()
    [f] = sim.step(error())
    assert f.retry_at == T0 + 2.0
    assert advance(defn, sim.state, T0 + 1.999) == Wait(T0 + 2.0)
    [again] = advance(defn, sim.state, T0 + 2.0)
    assert isinstance(again, StepStarted) and again.attempt == 2


def test_delay_formula_and_no_overflow_for_endless_retries() -> None:
    s = Step("x", action=noop, backoff=0.1, max_backoff=60.0)
    assert [s.delay(a) for a in (0, 1, 2, 3, 4)] == [0.1, 0.1, 0.2, 0.4, 0.8]
    assert s.delay(11) == 60.0
    # a step after the pivot is retried forever: attempt numbers grow without bound
    assert s.delay(1025) == 60.0
    assert s.delay(10**6) == 60.0
    assert Step("z", action=noop, backoff=0.0).delay(5000) == 0.0


def test_error_after_retries_compensates_earlier_steps_only() -> None:
    defn = Saga("er", [local("a"), local("b", retries=2)])
    sim = Sim(defn)
    state = sim.run([OK, error(), error(), error("still broken"), OK])
    assert state.status == "compensated"
    final = sim.of(StepFailed)[-1]
    assert final.retry_at is None and not final.compensate_self
    assert compensated_steps(sim) == [0]  # the erroring local step made no change
    assert "still broken" in state.reason
    assert state.fence is None


def test_a_command_that_errored_over_messages_is_compensated_and_fenced() -> None:
    # The handler failed and stored nothing, but its delivery can come back (a crash
    # before the ack): the step is uncertain, so it is compensated, and its compensation
    # fences the command so that a late delivery changes nothing.
    defn = Saga("er2", [local("a"), cmd("b", retries=2)])
    sim = Sim(defn)
    state = sim.run([OK, error(), error(), error("still broken"), OK, OK])
    assert state.status == "compensated"
    final = sim.of(StepFailed)[-1]
    assert final.retry_at is None and final.compensate_self
    assert compensated_steps(sim) == [1, 0]
    assert state.fence == 1 and sim.replay().fence == 1


def test_inline_attempts_are_never_fenced() -> None:
    # an inline attempt commits with the saga's stream or not at all: nothing is left
    # in flight, so an error there is certain and a timeout stored nothing
    defn = Saga("er3", [local("a"), cmd("b", retries=1)])
    sim = Sim(defn)
    sim.step()  # a
    sim.step(OK)
    [started] = sim.step()
    sim.events[-1] = msgspec.structs.replace(started, inline=True)
    sim.state = sim.replay()
    sim.step(error())
    sim.step()  # backoff
    [again] = sim.step()
    assert isinstance(again, StepStarted)
    sim.events[-1] = msgspec.structs.replace(again, inline=True)
    sim.state = sim.replay()
    sim.step(error())
    state = sim.run([OK])
    assert state.status == "compensated"
    assert compensated_steps(sim) == [0] and state.fence is None


# timeouts ------------------------------------------------------------------------------------
def test_timeout_after_retries_compensates_the_timed_out_step_too() -> None:
    defn = Saga("to", [local("a"), cmd("b"), cmd("c", retries=2)])
    sim = Sim(defn)
    state = sim.run([OK, OK, TIMEOUT, TIMEOUT, TIMEOUT, OK, OK, OK])
    assert state.status == "compensated"
    final = sim.of(StepFailed)[-1]
    assert final.step == 2 and final.attempt == 3
    assert final.compensate_self and final.retry_at is None
    # the timed-out command may have taken effect: it is undone first
    assert compensated_steps(sim) == [2, 1, 0]


def test_an_earlier_timed_out_attempt_is_compensated_even_if_the_last_one_errored() -> None:
    # attempt 1 timed out (it may still commit); attempt 2 got an error reply:
    # the step's effect is uncertain, so it is compensated
    defn = Saga("to2", [local("a"), cmd("b", retries=1)])
    sim = Sim(defn)
    state = sim.run([OK, TIMEOUT, error(), OK, OK])
    assert state.status == "compensated"
    assert compensated_steps(sim) == [1, 0]


def test_timed_out_step_without_compensation_is_not_compensated() -> None:
    defn = Saga("to3", [local("a"), cmd("b", comp=False)])
    sim = Sim(defn)
    state = sim.run([OK, TIMEOUT, OK])
    assert state.status == "compensated"
    assert state.fence == 1  # (the coordinator fences it itself)
    assert compensated_steps(sim) == [0]


# compensation failures ----------------------------------------------------------------------
def test_compensation_failure_is_retried_then_stuck_then_resumed() -> None:
    defn = Saga("cf", [local("a"), cmd("b", compensation_retries=2, backoff=1.0),
                       local("c")])
    sim = Sim(defn)
    state = sim.run([OK, OK, rejected(),  # c rejected: compensate b then a
                     error("down"), TIMEOUT, error("still down")])
    assert state.status == "stuck"
    assert state.stuck_from == "compensating"
    fails = sim.of(CompensationFailed)
    assert [f.attempt for f in fails] == [1, 2, 3]
    t_reject = T0  # the sim's clock only moves on waits
    assert fails[0].retry_at == t_reject + 1.0
    assert fails[1].retry_at == t_reject + 1.0 + 2.0
    assert fails[2].retry_at is None
    [stuck] = sim.of(SagaStuck)
    assert stuck.error == state.error
    assert "compensation of step 'b' failed after 3 attempts: still down" == state.error
    assert advance(defn, state, sim.now + 1e9) is None  # stuck waits for a person

    sim.resume()
    assert state.status == "compensating" and state.error is None
    # attempts keep counting across the resume (a new attempt never reuses an old one's
    # number, so its message id and its replies stay distinct), with a fresh budget
    [cs] = sim.step()
    assert isinstance(cs, CompensationStarted) and cs.step == 1 and cs.attempt == 4
    sim.step(error("again"))
    sim.step()  # backoff restarts from the first delay
    assert sim.of(CompensationFailed)[-1].retry_at == sim.now
    sim.step()
    assert sim.state.pending is not None and sim.state.pending.attempt == 5
    state = sim.run([OK, OK])
    assert state.status == "compensated"
    assert compensated_steps(sim) == [1, 0]
    assert sim.names().count("SagaStuck") == 1


def test_resumed_compensation_gets_a_full_retry_budget_again() -> None:
    defn = Saga("cf2", [cmd("a", compensation_retries=1), local("b")])
    sim = Sim(defn)
    state = sim.run([OK, rejected(), error(), error()])
    assert state.status == "stuck"
    sim.resume()
    state = sim.run([error(), error()])
    assert state.status == "stuck"
    assert [f.attempt for f in sim.of(CompensationFailed)] == [1, 2, 3, 4]
    assert sim.names().count("SagaStuck") == 2


def test_a_rejected_compensation_is_retried_like_an_error() -> None:
    defn = Saga("cr", [cmd("a", compensation_retries=1), local("b")])
    sim = Sim(defn)
    state = sim.run([OK, rejected(), rejected("no"), OK])
    assert state.status == "compensated"
    assert len(sim.of(CompensationFailed)) == 1


# the pivot --------------------------------------------------------------------------------------
def pivot_saga(**kw: Any) -> Saga:
    return Saga("pv", [local("a"), cmd("b"), cmd("p", comp=False, retriable=True, **kw),
                       local("q", comp=False, retriable=True)])


def test_pivot_is_the_first_retriable_step() -> None:
    defn = pivot_saga()
    assert defn.pivot == 2
    assert [defn.forward_only(i) for i in range(4)] == [False, False, True, True]
    assert Saga("np", [local("a")]).pivot == 1


@pytest.mark.parametrize("failure", [error(), TIMEOUT])
def test_steps_after_the_pivot_are_retried_forever_and_never_compensated(
        failure: Outcome) -> None:
    defn = pivot_saga(backoff=0.25, max_backoff=4.0)
    sim = Sim(defn)
    outcomes = [OK, OK] + [failure] * 40 + [OK] + [failure] * 3 + [OK]
    state = sim.run(outcomes)
    assert state.status == "completed"
    fails = sim.of(StepFailed)
    assert len(fails) == 43
    assert all(f.retry_at is not None for f in fails)
    assert not sim.of(CompensationStarted)
    assert [f.attempt for f in fails if f.step == 2] == list(range(1, 41))
    delays = [b.retry_at - a.retry_at for a, b in zip(fails, fails[1:], strict=False) if a.step == b.step == 2]
    assert max(delays) == 4.0 and delays[0] == 0.5  # doubling, capped
    assert state.completed == [0, 1, 2, 3]


def test_rejected_after_the_pivot_is_stuck_then_resumed_forward() -> None:
    defn = pivot_saga()
    sim = Sim(defn)
    state = sim.run([OK, OK, OK, rejected("card expired")])
    assert state.status == "stuck" and state.stuck_from == "running"
    assert "after the pivot was rejected: card expired" in state.error
    assert "'q'" in state.error
    assert not sim.of(CompensationStarted)
    sim.resume()
    assert state.status == "running"
    state = sim.run([OK])
    assert state.status == "completed"
    assert [e.attempt for e in sim.of(StepStarted) if e.step == 3] == [1, 2]
    assert not sim.of(CompensationStarted)


# cancel ----------------------------------------------------------------------------------------
def test_cancel_between_steps_compensates_what_completed() -> None:
    defn = Saga("cx", [local("a"), cmd("b"), local("c"), local("d")])
    sim = Sim(defn)
    state = sim.run([OK, OK, OK, OK], cancel_at=2)
    assert state.status == "compensated"
    assert [e.step for e in sim.of(StepCompleted)] == [0, 1]
    [f] = sim.of(StepFailed)
    assert f.step == 2 and f.attempt == 0 and not f.compensate_self
    assert compensated_steps(sim) == [1, 0]
    assert "user cancelled" in state.reason
    assert not [e for e in sim.of(StepStarted) if e.step >= 2]


def test_cancel_before_the_first_step() -> None:
    sim = Sim(Saga("c0", [local("a")]))
    state = sim.run([], cancel_at=0)
    assert state.status == "compensated"
    assert not sim.of(StepStarted) and not sim.of(CompensationStarted)


def test_cancel_waits_for_the_attempt_in_flight() -> None:
    defn = Saga("cw", [local("a"), cmd("b"), local("c")])
    sim = Sim(defn)
    for move in (None, OK, None):  # b in flight
        sim.step(move)
    sim.record([SagaCancelRequested(reason="stop")])
    assert advance(defn, sim.state, sim.now) is None
    state = sim.run([OK, OK, OK])  # b completes, then the cancel takes effect
    assert state.status == "compensated"
    assert compensated_steps(sim) == [1, 0]


def test_cancel_during_backoff_does_not_wait_and_undoes_a_timed_out_attempt() -> None:
    defn = Saga("cb", [local("a"), cmd("b", retries=3, backoff=100.0)])
    sim = Sim(defn)
    for move in (None, OK, None):
        sim.step(move)
    sim.step(TIMEOUT)  # retry in 100 s
    assert isinstance(advance(defn, sim.state, sim.now), Wait)
    sim.record([SagaCancelRequested(reason="stop")])
    [f] = advance(defn, sim.state, sim.now)
    assert isinstance(f, StepFailed) and f.compensate_self
    sim.record([f])
    state = sim.run([OK, OK])
    assert state.status == "compensated"
    assert compensated_steps(sim) == [1, 0]
    assert sim.now == T0  # no backoff was waited for


def test_cancel_after_the_pivot_is_ignored() -> None:
    defn = pivot_saga()
    sim = Sim(defn)
    state = sim.run([OK, OK, OK, OK], cancel_at=3)
    assert state.status == "completed"
    assert state.cancel_requested
    assert not sim.of(CompensationStarted)


# evolve details ---------------------------------------------------------------------------------
def test_replay_of_the_events_gives_the_same_state() -> None:
    defn = Saga("rp", [local("a"), cmd("b", retries=1, compensation_retries=0), local("c")])
    sim = Sim(defn)
    sim.run([OK, TIMEOUT, OK, rejected(), error()])
    assert sim.state.status == "stuck"
    again = sim.replay()
    for f in ("status", "step", "attempt", "base", "pending", "completed", "to_compensate",
              "retry_at", "reason", "error", "data", "stuck_from", "stream_version"):
        assert getattr(again, f) == getattr(sim.state, f), f


def test_reply_ignored_changes_nothing_but_history() -> None:
    defn = Saga("ri", [cmd("a")])
    sim = Sim(defn)
    sim.step()
    before = (sim.state.pending, sim.state.status, sim.state.attempt)
    sim.record([ReplyIgnored(step=0, kind="action", attempt=7, reason="stale")])
    assert (sim.state.pending, sim.state.status, sim.state.attempt) == before
    assert sim.state.history[-1]["event"] == "ReplyIgnored"
    assert sim.state.history[-1]["reason"] == "stale"


def test_evolve_without_a_definition_still_folds() -> None:
    # a coordinator that lacks the saga's version can still show it
    st_ = SagaState(id="x")
    for ev in [SagaStarted(saga="n", version=9, data={"k": 1}),
               StepStarted(step=0, attempt=1),
               StepFailed(step=0, attempt=1, error="boom")]:
        evolve(None, st_, ev, 5.0)
    assert st_.version == 9 and st_.status == "compensating" and st_.to_compensate == []


def test_saga_resumed_on_a_running_saga_keeps_it_running() -> None:
    sim = Sim(Saga("rr", [local("a")]))
    sim.record([SagaResumed()])
    assert sim.state.status == "running"
    assert sim.run([OK]).status == "completed"


# definition validation -----------------------------------------------------------------------------
def sync_fn(data: dict[str, Any]) -> None:
    return None


class AsyncCallable:
    async def __call__(self, data: dict[str, Any]) -> None:
        return None


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Step("bad name", action=noop), "must be letters, digits"),
    (lambda: Step("", action=noop), "must be letters, digits"),
    (lambda: Step("a"), "exactly one of action="),
    (lambda: Step("a", action=noop, command="x.y"), "exactly one of action="),
    (lambda: Step("a", command="bad topic"), "not a valid command name"),
    (lambda: Step("a", command="x..y"), "not a valid command name"),
    (lambda: Step("a", action=noop, compensation="x.*"), "not a valid command name"),
    (lambda: Step("a", command="x.y", timeout=0), "timeout must be > 0"),
    (lambda: Step("a", action=noop, timeout=-1.0), "timeout must be > 0"),
    (lambda: Step("a", action=noop, retries=-1), "retries must be >= 0"),
    (lambda: Step("a", action=noop, compensation_retries=-1), "retries must be >= 0"),
    (lambda: Step("a", action=noop, backoff=-0.1), "backoff"),
    (lambda: Step("a", action=noop, compensation=noop, retriable=True),
     "retriable (after the pivot: never undone)"),
    (lambda: Step("a", action=sync_fn), "must be an async function"),
    (lambda: Step("a", command="x.y", compensation=sync_fn), "must be an async function"),
    (lambda: Step("a", action=noop, compensation=42), "must be an async function"),
    (lambda: Saga("bad name", [local("a")]), "saga name 'bad name'"),
    (lambda: Saga("s", []), "needs at least one step"),
    (lambda: Saga("s", [local("a"), local("a")]), "duplicate step names"),
    (lambda: Saga("s", [local("a")], version=0), "version must be an int >= 1"),
    (lambda: Saga("s", [local("a")], version="2"), "version must be an int >= 1"),
    (lambda: Saga("s", ["a"]), "steps must be tidings Step objects"),
    (lambda: Saga("s", [local("a", comp=False, retriable=True), local("b")]),
     "comes after the pivot 'a'"),
])
def test_definition_validation(make: Any, message: str) -> None:
    with pytest.raises(tidings.InvalidArgument, match=None) as info:
        make()
    assert message in str(info.value)
    assert isinstance(info.value, tidings.TidingsError)


def test_valid_definitions() -> None:
    s = Step("a", command="customer.reserve_credit", compensation="customer.release_credit")
    assert s.timeout == DEFAULT_COMMAND_TIMEOUT
    assert Step("b", action=AsyncCallable()).action is not None
    assert Step("c", action=functools.partial(noop)).action is not None
    defn = Saga("s-1_x", [s, Step("b", action=noop, retriable=True)], version=3)
    assert defn.version == 3 and defn.pivot == 1
    assert "s-1_x" in repr(defn) and "version=3" in repr(defn)
    assert tidings.Saga is Saga and tidings.Step is Step


# the property ------------------------------------------------------------------------------------
OUTCOMES = st.sampled_from(["ok", "ok", "rejected", "error", "timeout"])


@st.composite
def sagas(draw: st.DrawFn) -> Saga:
    n = draw(st.integers(1, 6))
    pivot = draw(st.integers(0, n))  # n: no retriable step
    steps = []
    for i in range(n):
        retriable = i >= pivot
        kind = draw(st.sampled_from(["local", "command"]))
        has_comp = not retriable and draw(st.booleans())
        kw = dict(retries=draw(st.integers(0, 2)), compensation_retries=draw(st.integers(0, 2)),
                  backoff=draw(st.sampled_from([0.0, 0.1, 1.0])), max_backoff=5.0,
                  retriable=retriable)
        steps.append((cmd if kind == "command" else local)(f"s{i}", comp=has_comp, **kw))
    return Saga("prop", steps)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(defn=sagas(), data=st.data(), cancel=st.one_of(st.none(), st.integers(0, 6)))
def test_property_saga_ends_consistently(defn: Saga, data: st.DataObject,
                                         cancel: int | None) -> None:
    drawn: list[str] = []

    def next_outcome() -> Outcome:
        # after a while only successes, so a saga retried forever terminates
        kind = data.draw(OUTCOMES) if len(drawn) < 40 else "ok"
        drawn.append(kind)
        return Outcome(kind, error=f"{kind}-{len(drawn)}")  # type: ignore[arg-type]

    sim = Sim(defn)
    resumes = 0
    while True:
        state = sim.run(next_outcome, cancel_at=cancel, limit=2000)
        if state.status != "stuck" or resumes >= 2 or not data.draw(st.booleans()):
            break
        sim.resume()
        resumes += 1

    events = sim.events
    assert state.status in ("completed", "compensated", "stuck")
    pivot = defn.pivot

    # stuck only when a compensation ran out of retries or a step after the pivot was rejected
    stuck_events = sim.of(SagaStuck)
    if state.status == "stuck":
        assert stuck_events
    for i, ev in enumerate(events):
        if isinstance(ev, SagaStuck):
            prev = events[i - 1]
            assert ((isinstance(prev, CompensationFailed) and prev.retry_at is None)
                    or (isinstance(prev, StepFailed) and prev.rejected and prev.step >= pivot))

    # no step at or after the pivot is ever compensated, and none fails for good
    assert all(e.step < pivot for e in sim.of(CompensationStarted))
    for f in sim.of(StepFailed):
        if f.step >= pivot:
            assert f.retry_at is not None or f.rejected

    completed = [e.step for e in sim.of(StepCompleted)]
    assert completed == sorted(completed) and len(set(completed)) == len(completed)
    assert completed == list(range(len(completed)))  # in order, none skipped

    comps = compensated_steps(sim)
    if state.status == "completed":
        assert completed == list(range(len(defn.steps)))
        assert not sim.of(CompensationStarted)
    else:
        final = [f for f in sim.of(StepFailed) if f.retry_at is None]
        if sim.of(CompensationStarted) or state.status == "compensated":
            # the saga turned back at exactly one step, before the pivot
            [turn] = [f for f in final if f.step < pivot]
            failed_step = turn.step
            timed_out = any(f.step == failed_step and f.compensate_self
                            for f in sim.of(StepFailed))
            done = completed + ([failed_step] if timed_out else [])
            expected = [i for i in reversed(done) if defn.steps[i].compensation is not None]
            if state.status == "compensated":
                assert comps == expected  # exact reverse order of completed compensatables
            else:
                assert comps == expected[:len(comps)]  # stuck part-way, in order
            assert all(i < pivot for i in expected)

    # attempts of one step or compensation never repeat a number (resumes included)
    seen: set[tuple[str, int, int]] = set()
    for e in events:
        if isinstance(e, (StepStarted, CompensationStarted)):
            key = (type(e).__name__, e.step, e.attempt)
            assert key not in seen
            seen.add(key)

    # every retry waits exactly its backoff: delay(n) after the failure, n = the attempt
    # (counted from the last resume)
    for ev, t in zip(events, sim.times, strict=True):
        if isinstance(ev, (StepFailed, CompensationFailed)) and ev.retry_at is not None:
            step = defn.steps[ev.step]
            waits = {step.delay(k) for k in range(1, ev.attempt + 1)}
            if resumes == 0:
                assert ev.retry_at == t + step.delay(ev.attempt)
            else:
                assert any(abs(ev.retry_at - t - w) < 1e-9 for w in waits)

    # replaying the stream gives the same decision state
    again = sim.replay()
    assert (again.status, again.completed, again.to_compensate, again.step) == \
        (state.status, state.completed, state.to_compensate, state.step)
