"""Dead letters over HTTP: list, redrive (exactly once however often asked), refusals."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import tidings

from .conftest import LiveServer


def _dead_letter(server: LiveServer, n: int) -> list[str]:
    """Publish n jobs and dead-letter them all from group 'workers'; their dead letters' ids."""

    async def go(hub: tidings.Hub) -> list[str]:
        await hub.publish_many("jobs.run", [{"n": i} for i in range(n)])
        sub = await hub.subscribe("jobs.run", group="workers", max_in_flight=n)
        got: list[tidings.Message] = []
        while len(got) < n:
            got += await sub.fetch(n - len(got), wait=1.0)
        for m in got:
            await m.term(reason="decode-error")
        await sub.flush()
        await sub.close()
        return [d.id for d in await hub.dead_letters("workers")]

    return server.call(go)


def test_list_and_redrive(server: LiveServer, client: httpx.Client) -> None:
    ids = _dead_letter(server, 3)
    listed = client.get("/v1/dlq/workers").json()
    assert [d["id"] for d in listed["dead_letters"]] == ids
    first = listed["dead_letters"][0]
    assert (first["original_topic"], first["reason"], first["attempts"], first["data"]) == (
        "jobs.run", "decode-error", 1, {"n": 0})
    assert client.get("/v1/dlq/workers", params={"limit": 1}).json()["dead_letters"][0][
        "id"] == ids[0]

    r = client.post("/v1/dlq/workers/redrive", json={"ids": [ids[0]]})
    assert r.status_code == 200 and r.json() == {"group": "workers", "moved": 1}
    again = client.post("/v1/dlq/workers/redrive", json={"ids": [ids[0]]})
    assert again.json()["moved"] == 0  # an answer lost and asked again: still once
    assert client.post("/v1/dlq/workers/redrive", json={"all": True}).json()["moved"] == 2
    assert client.get("/v1/dlq/workers").json()["dead_letters"] == []
    assert len(client.get("/v1/dlq/workers?redriven=true").json()["dead_letters"]) == 3

    async def back(hub: tidings.Hub) -> list[Any]:
        return [m.decode()["n"] async for m in hub.read("jobs.run")
                if "tidings-redriven" in m.headers]

    assert sorted(server.call(back)) == [0, 1, 2]


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/v1/dlq/workers/redrive", {}, 422, "all"),
    ("/v1/dlq/workers/redrive", {"ids": ["x"], "all": True}, 422, "together"),
    ("/v1/dlq/workers/redrive", {"ids": []}, 422, "ids"),
    ("/v1/dlq/workers/redrive", {"ids": "x"}, 422, "ids"),
    ("/v1/dlq/workers/redrive", {"ids": [1]}, 422, "ids"),
    ("/v1/dlq/workers/redrive", {"all": True, "limit": 0}, 422, "limit"),
    ("/v1/dlq/workers/redrive", {"all": True, "limit": 2**64}, 422, "limit"),
    ("/v1/dlq/workers/redrive", {"all": True, "bogus": 1}, 422, "bogus"),
    ("/v1/dlq/workers/redrive", {"all": True, "topic": "a..b"}, 422, "topic"),
    ("/v1/dlq/workers/redrive", {"ids": ["nope"]}, 404, "nope"),
    ("/v1/dlq/nobody/redrive", {"all": True}, 404, "nobody"),
    ("/v1/dlq/a%20b/redrive", {"all": True}, 422, "group"),
    ("/v1/dlq/workers/redrive", [1] * 3, 422, "object"),
    ("/v1/dlq/workers/redrive", {"ids": [[[[[[]]]]]]}, 422, "ids"),
])
def test_bad_redrives_say_what_to_do_and_move_nothing(
        server: LiveServer, client: httpx.Client, path: str, body: Any, status: int,
        says: str) -> None:
    _dead_letter(server, 1)
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"].lower() or says in r.text.lower()
    assert len(client.get("/v1/dlq/workers").json()["dead_letters"]) == 1


@pytest.mark.parametrize(("query", "says"), [
    ("limit=0", "limit"), ("limit=١", "limit"), ("redriven=maybe", "redriven"),
    ("topic=a..b", "topic"),
])
def test_bad_listings_are_422(server: LiveServer, client: httpx.Client, query: str,
                              says: str) -> None:
    _dead_letter(server, 1)
    r = client.get(f"/v1/dlq/workers?{query}")
    assert r.status_code == 422, r.text
    assert says in r.text.lower()


def test_unknown_group_is_404(client: httpx.Client) -> None:
    r = client.get("/v1/dlq/nobody")
    assert r.status_code == 404 and "nobody" in r.json()["detail"]
