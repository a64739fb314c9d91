"""A walk through tidings' pub/sub, replay and backpressure, printing what happens.

Run it with `make demo`, `tidings demo walkthrough`, or
`python examples/walkthrough.py --url memory://`. The default engine is the
embedded `sqlite:///./tidings.db` (or $TIDINGS_URL).

It is safe to run again on the same database: subscriptions are durable, so
on a second run each group resumes after the messages it acked the first
time and sees only the new orders.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import tidings

ORDERS = "demo.orders.created"
PAYMENTS = "demo.orders.paid"
IDLE = 0.3  # a consumer that waits this long for a message decides the topic is drained


def say(text: str) -> None:
    print(text, flush=True)


def order_of(msg: tidings.Message) -> str:
    return str(msg.decode()["order"])


async def drain(sub: tidings.Subscription) -> list[str]:
    """Take and ack everything the subscription has for us; the orders, in delivery order."""
    seen = []
    while batch := await sub.fetch(max=100, wait=IDLE):
        for msg in batch:
            seen.append(order_of(msg))
            await msg.ack()
    return seen


async def walkthrough(url: str | None = None) -> None:
    async with await tidings.connect(url) as hub:
        say(f"tidings walkthrough on {hub.url}\n")

        # 1. Publish. Every message gets a position in the log; the key orders it.
        say("1. publish four orders")
        first = 0
        for order, total in [("o-1", 30), ("o-2", 120), ("o-3", 45), ("o-4", -1)]:
            p = await hub.publish(ORDERS, {"order": order, "total": total}, key=order)
            first = first or p.position
            say(f"   {ORDERS} {order} (total {total}) -> position {p.position}")
        payment_id = f"pay-{uuid.uuid4().hex[:8]}"
        a = await hub.publish(PAYMENTS, {"order": "o-1"}, id=payment_id)
        b = await hub.publish(PAYMENTS, {"order": "o-1"}, id=payment_id)
        say(f"   a payment published twice with id {payment_id}: stored once at position "
            f"{a.position}; the retry reported duplicate={b.duplicate}\n")

        # 2. Fan-out: every subscription (group) gets every message.
        # `start` applies only when a group is new; an existing group resumes where it acked.
        say("2. fan-out: the billing and analytics groups each get every order")
        billing = await hub.subscribe(ORDERS, group="billing", start=first)
        analytics = await hub.subscribe(ORDERS, group="analytics", start=first)
        got_billing, got_analytics = await asyncio.gather(drain(billing), drain(analytics))
        say(f"   billing   got {', '.join(got_billing)}")
        say(f"   analytics got {', '.join(got_analytics)}\n")
        await billing.close()
        await analytics.close()

        # 3. Competing consumers: two consumers of one group share its messages.
        say("3. competing consumers: two warehouse workers share one subscription")
        took: dict[str, list[str]] = {"worker-1": [], "worker-2": []}

        async def worker(name: str) -> None:
            async with await hub.subscribe(ORDERS, group="warehouse", start=first,
                                           batch=1) as sub:
                while batch := await sub.fetch(max=1, wait=IDLE):
                    for msg in batch:
                        await asyncio.sleep(0.05)  # packing the parcel
                        took[name].append(order_of(msg))
                        await msg.ack()

        await asyncio.gather(worker("worker-1"), worker("worker-2"))
        for name, orders in took.items():
            say(f"   {name} packed {', '.join(orders) or 'nothing'}")
        say("   (each order was packed once, by one of them)\n")

        # 4. At-least-once: a nack brings a message back; too many attempts dead-letter it.
        say("4. redelivery and dead letters: shipping nacks o-2 once and o-4 every time")
        async with await hub.subscribe(ORDERS, group="shipping", start=first,
                                       max_deliver=3) as shipping:
            while batch := await shipping.fetch(max=10, wait=IDLE):
                for msg in batch:
                    order, total = order_of(msg), msg.decode()["total"]
                    if total < 0:
                        say(f"   {order} attempt {msg.attempt}: invalid total, nack")
                        await msg.nack()
                    elif order == "o-2" and msg.attempt == 1:
                        say(f"   {order} attempt 1: courier busy, nack(delay=0.1)")
                        await msg.nack(delay=0.1)
                    else:
                        say(f"   {order} attempt {msg.attempt}: shipped, ack")
                        await msg.ack()
        async for dead in hub.read("$dlq.shipping", start=first):
            h = dead.headers
            say(f"   dead letter on $dlq.shipping: {order_of(dead)} from "
                f"{h['tidings-original-topic']}, reason {h['tidings-reason']}, "
                f"after {h['tidings-attempts']} attempts")
        say("")

        # 5. Replay: the log can be read again from any position, without a subscription.
        say(f"5. replay demo.orders.> from position {first} (read-only; no group moves)")
        async for msg in hub.read("demo.orders.>", start=first):
            say(f"   #{msg.position} {msg.topic} {msg.decode()}")
        for t in await hub.topics():
            if t["topic"] == ORDERS:
                lags = ", ".join(f"{s['group']} {s['lag']}" for s in t["subscriptions"])
                say(f"   lag per group on {ORDERS}: {lags}")
        say("")

        # 6. Backpressure: a bounded buffer with an explicit overflow policy counts its drops.
        say("6. backpressure: 10 price ticks into a Buffer(capacity=3, DROP_OLDEST)")
        buf: tidings.Buffer[int] = tidings.Buffer(capacity=3,
                                                  overflow=tidings.Overflow.DROP_OLDEST)
        for tick in range(1, 11):
            await buf.put(tick)
        kept = [buf.get_nowait() for _ in range(len(buf))]
        say(f"   the slow consumer gets {kept}; dropped (and counted): {buf.dropped}")
        say("\ndone.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None,
                        help="engine URL (default: $TIDINGS_URL or sqlite:///./tidings.db)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(walkthrough(args.url))
    except tidings.TidingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, tidings.InvalidArgument) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
