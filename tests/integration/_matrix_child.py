"""Child processes for the crash matrix (tests/soak): `python -m tests.integration._matrix_child
ROLE URL ...`. Each prints one line per operation once its `await` returned (acknowledged),
and runs until it is SIGKILLed.

- `publisher URL MODE TAG`: MODE `single` prints 'ID POSITION'; `batch` publishes batches of
  10 (key = the batch's tag) and prints the tag; `tasks` runs 4 tasks of single publishes.
- `appender URL TAG TASKS STREAMS`: TASKS tasks save 1 to 3 events at a time to one of
  STREAMS `SoakCounter` streams (snapshots every 4 versions), retrying on conflicts;
  prints 'ok STREAM FIRST LAST WRITER SEQ' per save, 'conflict' per conflict.
- `consumer URL`: settles every message of 'soak.c' (group 'g') with `wait=True`; prints
  'got POSITION GOOD' before settling, then 'acked|termed|nacked POSITION' once it is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
from typing import Any

from tests.integration._child import payload

import tidings

BATCH = 10
TASKS = 4
SNAPSHOT_EVERY = 4
CONSUMED = "soak.c"


def intact(data: bytes) -> bool:
    """True when a `payload()` still matches the checksum it starts with."""
    digest, _, body = data.partition(b":")
    return hashlib.sha256(body).hexdigest().encode() == digest


# publishing -----------------------------------------------------------------------------------
async def publisher(url: str, mode: str, tag: str) -> None:
    async with await tidings.connect(url) as hub:

        async def singles(prefix: str) -> None:
            i = 0
            while True:
                p = await hub.publish("soak.single", payload(i), id=f"{prefix}-{i}")
                print(f"{p.id} {p.position}", flush=True)
                i += 1

        if mode == "single":
            await singles(tag)
        elif mode == "tasks":
            await asyncio.gather(*(singles(f"{tag}.{t}") for t in range(TASKS)))
        else:
            i = 0
            while True:
                batch = f"{tag}.{i}"
                await hub.publish_many("soak.batch", [
                    tidings.envelope(payload(j), key=batch, id=f"{batch}-{j}")
                    for j in range(BATCH)])
                print(batch, flush=True)
                i += 1


# event sourcing -------------------------------------------------------------------------------
class SoakTicked(tidings.Event):
    """One event of a save: part `part` of `parts`, with a checksum of its body."""

    writer: str
    seq: int
    part: int
    parts: int
    body: str
    digest: str


class SoakCounter(tidings.Aggregate):
    """How many events it has seen, and a hash chain over their checksums (order matters)."""

    count: int = 0
    chain: str = ""

    def apply(self, event: Any) -> None:
        if isinstance(event, SoakTicked):
            self.count += 1
            self.chain = fold(self.chain, event.digest)


def fold(chain: str, digest: str) -> str:
    return hashlib.sha256(f"{chain}{digest}".encode()).hexdigest()[:16]


def ticked(writer: str, seq: int, part: int, parts: int) -> SoakTicked:
    body = f"{writer}/{seq}/{part}/" + "x" * (seq % 50)
    return SoakTicked(writer=writer, seq=seq, part=part, parts=parts, body=body,
                      digest=hashlib.sha256(body.encode()).hexdigest())


async def appender(url: str, tag: str, tasks: int, streams: int) -> None:
    async with await tidings.connect(url) as hub:
        repo = hub.repository(SoakCounter, snapshot_every=SNAPSHOT_EVERY)

        async def task(t: int) -> None:
            rng = random.Random(f"{tag}{t}")
            writer = f"{tag}.{t}"
            seq = 0
            while True:
                sid = f"soak-{rng.randrange(streams)}"
                try:
                    agg = await repo.get(sid)
                except tidings.NotFound:
                    agg = SoakCounter(sid)
                first = agg.version + 1
                parts = rng.randint(1, 3)
                for part in range(parts):
                    agg.record(ticked(writer, seq, part, parts))
                try:
                    await repo.save(agg)
                except tidings.ConcurrencyError:
                    print("conflict", flush=True)
                    continue
                print(f"ok {sid} {first} {agg.version} {writer} {seq}", flush=True)
                seq += 1

        await asyncio.gather(*(task(t) for t in range(tasks)))


# consuming ------------------------------------------------------------------------------------
async def consumer(url: str) -> None:
    async with await tidings.connect(url) as hub:
        sub = await hub.subscribe(CONSUMED, group="g", ack_wait=1.0, max_in_flight=100,
                                  max_deliver=1000)
        async for msg in sub:
            print(f"got {msg.position} {int(intact(msg.data))}", flush=True)
            how = settle_by(msg.position, msg.attempt)
            if how == "nacked":
                await msg.nack(0.1, wait=True)
            elif how == "termed":
                await msg.term(wait=True)
            else:
                await msg.ack(wait=True)
            print(f"{how} {msg.position}", flush=True)


def settle_by(position: int, attempt: int) -> str:
    """Most messages are acked; some are terminated; some are nacked once, then acked."""
    if position % 10 == 7:
        return "termed"
    if position % 10 == 3 and attempt <= 1:
        return "nacked"
    return "acked"


if __name__ == "__main__":
    role, url, *rest = sys.argv[1:]
    if role == "publisher":
        asyncio.run(publisher(url, rest[0], rest[1]))
    elif role == "appender":
        asyncio.run(appender(url, rest[0], int(rest[1]), int(rest[2])))
    elif role == "consumer":
        asyncio.run(consumer(url))
    else:
        raise SystemExit(f"unknown role {role!r}")
