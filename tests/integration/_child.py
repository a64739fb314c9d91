"""Child processes for the crash and multi-process tests (run with `python -m`)."""

from __future__ import annotations

import asyncio
import hashlib
import sys

import tidings


def payload(i: int) -> bytes:
    body = f"message-{i}-".encode() * (1 + i % 7)
    return hashlib.sha256(body).hexdigest().encode() + b":" + body


async def publisher(url: str, mode: str) -> None:
    """Publish forever; print each acknowledged id (single) or batch tag (batch)."""
    async with await tidings.connect(url) as hub:
        i = 0
        while True:
            if mode == "batch":
                items = [tidings.envelope(payload(i * 10 + j), key=f"b{i}") for j in range(10)]
                await hub.publish_many("crash.batch", items)
                print(f"b{i}", flush=True)
            else:
                p = await hub.publish("crash.single", payload(i), id=f"m-{i}")
                print(f"{p.id} {p.position}", flush=True)
            i += 1


async def consumer(url: str, group: str, count: int) -> None:
    """Consume `count` messages from 'mp.>' in `group`, printing 'position data' per message."""
    async with await tidings.connect(url) as hub:
        sub = await hub.subscribe("mp.>", group=group, ack_wait=60.0, max_in_flight=50)
        print("ready", flush=True)
        n = 0
        async for msg in sub:
            print(f"{msg.position} {msg.data.decode()}", flush=True)
            await msg.ack()
            n += 1
            if n >= count:
                break
        await sub.close()


async def acker(url: str, wait: bool) -> None:
    """Ack every message of 'acks.t' (group 'g'), printing each position once its ack returned."""
    async with await tidings.connect(url) as hub:
        sub = await hub.subscribe("acks.t", group="g", ack_wait=1.0, max_in_flight=100)
        async for msg in sub:
            await msg.ack(wait=wait)
            print(msg.position, flush=True)


async def produce(url: str, count: int) -> None:
    async with await tidings.connect(url) as hub:
        for i in range(count):
            await hub.publish("mp.items", f"item-{i}", key=f"k{i % 5}")
        print("done", flush=True)


if __name__ == "__main__":
    role, url, *rest = sys.argv[1:]
    if role == "publisher":
        asyncio.run(publisher(url, rest[0]))
    elif role == "consumer":
        asyncio.run(consumer(url, rest[0], int(rest[1])))
    elif role == "acker":
        asyncio.run(acker(url, rest[0] == "wait"))
    elif role == "produce":
        asyncio.run(produce(url, int(rest[0])))
