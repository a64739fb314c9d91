"""Dead letters: list them, and move them back to their original topic (redrive).

A dead letter is a message in a subscription's dead-letter topic (`$dlq.<group>`
unless the subscription named another) carrying where it came from and why
(`tidings-original-topic`, `tidings-reason`, …; see engines/delivery.py).

Redrive moves a dead letter back to its original topic as a new message (its
attempts start again) with a `tidings-redriven` header naming the dead letter.
Exactly once, whatever happens to the process doing it:

- the moved message and a marker in `$rdv.<group>` are stored in one
  atomic append, so a dead letter is either moved and marked, or neither;
- a dead letter already marked is never moved again (a second run, or a run
  after one killed midway, reads the markers first);
- both carry ids derived from the dead letter's id, so two runs racing each
  other store one copy (the engine's id deduplication drops the other).

Only the subscription that dead-lettered a message gets it again: the moved
message carries `tidings-redrive-group`, and consumers of other subscriptions
of that topic, which handled it the first time, ack it without handing it out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import topics as _topics
from .errors import InvalidArgument, NotFound
from .messages import Message, OutMessage

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["REDRIVE_GROUP", "REDRIVEN", "dead_letter_topic", "dead_letters", "marker_topic", "redrive"]

#: On a moved message: the id of the dead letter it came from.
REDRIVEN = "tidings-redriven"
#: On a moved message: the only subscription (group) that gets it.
REDRIVE_GROUP = "tidings-redrive-group"
#: The headers a dead letter adds to the original's (removed again when it moves back).
_DEAD_LETTER_HEADERS = ("tidings-original-topic", "tidings-original-id",
                        "tidings-original-position", "tidings-group", "tidings-reason",
                        "tidings-attempts", "tidings-error")
#: Pairs (moved message + marker) per atomic append.
_CHUNK = 200
#: At most this many ids in one call (each is matched against every dead letter).
MAX_IDS = 10_000


def dead_letter_topic(group: str, dead_letter: str | None = None) -> str:
    """The topic holding `group`'s dead letters: `dead_letter`, or `$dlq.<group>`."""
    check_group(group)
    if dead_letter is None:
        return f"$dlq.{group}"
    _topics.validate_topic(dead_letter)
    return dead_letter


async def _source(hub: Hub, group: str, dead_letter: str | None) -> str:
    """The topic to read `group`'s dead letters from: `dead_letter` if given, else the one
    its subscriptions name (`$dlq.<group>` unless they chose another)."""
    if dead_letter is not None:
        return dead_letter_topic(group, dead_letter)
    check_group(group)
    named = {s.dead_letter for s in await hub.engine.subscriptions()
             if s.group == group and s.dead_letter is not None}
    if len(named) > 1:
        raise InvalidArgument(f"the subscriptions of {group!r} send dead letters to "
                              f"{', '.join(sorted(named))}; say which with dead_letter=")
    return named.pop() if named else dead_letter_topic(group)


def check_group(group: object) -> str:
    if not isinstance(group, str) or not _topics.is_token(group):
        raise InvalidArgument(f"group {group!r} must be one token of letters, digits, '_' "
                              "or '-'")
    return group


def marker_topic(group: str) -> str:
    # (as short a prefix as `$dlq.`: any group with a dead-letter topic has this one too)
    return f"$rdv.{group}"


async def _markers(hub: Hub, group: str, after: int = 0) -> tuple[set[str], int]:
    """The ids of `group`'s dead letters moved back, by the markers stored after position
    `after`; and the position read up to (to read only newer ones next time)."""
    done: set[str] = set()
    async for m in hub.read(marker_topic(group), start=after + 1):
        after = m.position
        dl = m.headers.get(REDRIVEN)
        if dl:
            done.add(dl)
    return done, after


def _selector(topic: str | None, ids: Iterable[str] | None
              ) -> tuple[str | None, frozenset[str] | None]:
    if topic is not None:
        _topics.validate_pattern(topic)
    if ids is None:
        return topic, None
    if isinstance(ids, (str, bytes)):
        raise InvalidArgument("ids is a list of dead-letter (or original message) ids, "
                              "not one string: ids=[...]")
    wanted = []
    for i in ids:
        if not isinstance(i, str) or not i or len(i) > 255:
            raise InvalidArgument(f"each id must be a non-empty str of at most 255 "
                                  f"characters, got {i!r}")
        wanted.append(i)
        if len(wanted) > MAX_IDS:
            raise InvalidArgument(f"at most {MAX_IDS} ids at a time; redrive in parts")
    return topic, frozenset(wanted)


def _check_limit(limit: object) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit < 2**63:
        raise InvalidArgument(f"limit must be an int from 1 to 2**63 - 1 (or None for all), "
                              f"got {limit!r}")
    return limit


async def dead_letters(hub: Hub, group: str, *, topic: str | None = None,
                       ids: Iterable[str] | None = None, limit: int | None = None,
                       dead_letter: str | None = None, redriven: bool = False
                       ) -> list[Message]:
    """`group`'s dead letters, oldest first: those not moved back yet (all with
    `redriven=True`), whose original topic matches `topic` and whose id or
    original id is in `ids`, at most `limit`.

    Raises NotFound for a group with neither a subscription nor dead letters, and
    for ids that name none of the group's dead letters (moved back or not).
    """
    chosen, _ = await _select(hub, group, topic, ids, limit, dead_letter, redriven)
    return chosen


async def _select(hub: Hub, group: str, topic: str | None, ids: Iterable[str] | None,
                  limit: int | None, dead_letter: str | None, redriven: bool
                  ) -> tuple[list[Message], int]:
    """`dead_letters`, and the position of the newest marker it read."""
    source = await _source(hub, group, dead_letter)
    pattern, wanted = _selector(topic, ids)
    limit = _check_limit(limit)
    done, seen = await _markers(hub, group)
    out: list[Message] = []
    seen_any = False
    matched: set[str] = set()
    async for m in hub.read(source):
        h = m.headers
        if h.get("tidings-group") != group:
            continue
        seen_any = True
        original = h.get("tidings-original-topic", "")
        if pattern is not None and not (original and _topics.matches(pattern, original)):
            continue
        if wanted is not None:
            hit = wanted.intersection((m.id, h.get("tidings-original-id", "")))
            if not hit:
                continue
            matched.update(hit)
        if m.id in done and not redriven:
            continue
        if limit is None or len(out) < limit:
            out.append(m)
        elif wanted is None:
            break  # (with ids, read on: every id must name a dead letter)
    if not seen_any and not any(s.group == group for s in await hub.engine.subscriptions()):
        raise NotFound(f"no subscription {group!r} and no dead letters of it; check the "
                       "group name ('tidings topics' lists the subscriptions)")
    if wanted is not None and (missing := wanted - matched):
        raise NotFound(f"no dead letter of {group!r} has the id {sorted(missing)[0]!r}"
                       f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                       f"'tidings dlq list {group}' shows them")
    return out, seen


def _moved(dl: Message, group: str) -> tuple[OutMessage, OutMessage] | None:
    original = dl.headers.get("tidings-original-topic", "")
    try:
        _topics.validate_topic(original)
    except InvalidArgument:
        return None  # not a dead letter tidings wrote: nowhere to send it
    headers = {k: v for k, v in dl.headers.items() if k not in _DEAD_LETTER_HEADERS}
    headers[REDRIVEN] = dl.id
    headers[REDRIVE_GROUP] = group
    moved = OutMessage(moved_id(dl.id), original, dl.key, dl.data, headers, True)
    marker = OutMessage(f"$rdv:{dl.id}", marker_topic(group), None, b"",
                        {REDRIVEN: dl.id, "tidings-original-topic": original}, True)
    return moved, marker


async def redrive(hub: Hub, group: str, *, topic: str | None = None,
                  ids: Iterable[str] | None = None, limit: int | None = None,
                  dead_letter: str | None = None) -> int:
    """Move `group`'s dead letters (those `dead_letters` selects) back to their original
    topics; returns how many this call moved (0 for those another run moved first)."""
    chosen, seen = await _select(hub, group, topic, ids, limit, dead_letter, False)
    pairs = [p for p in (_moved(dl, group) for dl in chosen) if p is not None]
    moved = 0
    for start in range(0, len(pairs), _CHUNK):
        # Markers another run stored since this one began: its copies are skipped here
        # even if they were stored longer ago than the engine's dedup window.
        done, seen = await _markers(hub, group, seen)
        batch: list[OutMessage] = []
        for m, marker in pairs[start:start + _CHUNK]:
            if m.headers is not None and m.headers[REDRIVEN] not in done:
                batch += (m, marker)
        if not batch:
            continue
        results = hub.counters.on_publish(batch, await hub.engine.append(batch))
        moved += sum(1 for r in results[::2] if not r.duplicate)
    return moved


def moved_id(dead_letter_id: str) -> str:
    """The id a dead letter moves back under: derived (racing runs store one copy) and in
    the `$` namespace clients may not use (nobody can take it first, or forge it)."""
    return f"$redriven:{dead_letter_id}"


def summary(dl: Message) -> dict[str, Any]:
    """A dead letter as JSON for the CLI and the gateway."""
    h = dl.headers
    out = dl.to_dict()
    out.update({
        "original_topic": h.get("tidings-original-topic"),
        "original_id": h.get("tidings-original-id"),
        "reason": h.get("tidings-reason"),
        "attempts": int(a) if (a := h.get("tidings-attempts", "")).isdigit() and a.isascii()
        else None,
        "error": h.get("tidings-error"),
    })
    return out
