"""Engine options: a typo or a bad value is a clear InvalidArgument, never a TypeError."""

from __future__ import annotations

from pathlib import Path

import pytest

import tidings


@pytest.mark.parametrize(("url", "options", "says"), [
    ("sqlite:///{d}/a.db", {"durablity": "full"}, "does not take durablity"),
    ("sqlite:///{d}/a.db?durability=sometimes", {}, "'full' or 'normal'"),
    ("sqlite:///{d}/a.db?dedup_window=soon", {}, "bad engine option"),
    ("sqlite:///{d}/a.db?dedup_window=nan", {}, "dedup_window must be"),
    ("sqlite:///{d}/a.db", {"poll_interval": -1}, "poll_interval must be"),
    ("sqlite:///{d}/a.db?max_batch=0", {}, "max_batch must be"),
    ("memory://", {"bogus": 1}, "does not take bogus"),
    ("memory://?dedup_window=x", {}, "bad engine option"),
    ("nosuch://x", {}, "unknown engine"),
    ("not a url", {}, "is not a URL"),
])
async def test_bad_options_are_invalid_argument(tmp_path: Path, url: str,
                                                options: dict[str, object], says: str) -> None:
    with pytest.raises(tidings.InvalidArgument, match=says):
        await tidings.connect(url.format(d=tmp_path), **options)
    assert not (tmp_path / "a.db").exists()  # nothing was created


async def test_good_options_are_used(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a.db?durability=normal&dedup_window=5"
    async with await tidings.connect(url) as hub:
        assert hub.engine.durability == "normal"  # type: ignore[attr-defined]
        assert hub.engine.dedup_window == 5.0


async def test_wrongly_typed_arguments_are_invalid_argument() -> None:
    async with await tidings.connect("memory://") as hub:
        for call in (lambda: hub.subscribe("a.b", group="g", ack_wait="30"),
                     lambda: hub.subscribe("a.b", group="g", ack_wait=float("nan")),
                     lambda: hub.set_retention("a.b", max_age="1"),
                     lambda: hub.set_retention("a.b", max_messages=float("inf"))):
            with pytest.raises(tidings.InvalidArgument):
                await call()
        with pytest.raises(tidings.InvalidArgument):
            hub.read("a.b", page="2")  # type: ignore[arg-type]
        with pytest.raises(tidings.InvalidArgument):
            hub.subscriber("a.b", group="g", concurrency="2")  # type: ignore[arg-type]
        with pytest.raises(tidings.InvalidArgument):
            hub.subscriber("a.b", group="g", retry_backoff=-1)
        assert await hub.topics() == []  # nothing was stored or created
