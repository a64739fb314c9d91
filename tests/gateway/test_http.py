"""JSON bodies: how deep they nest is measured without recursion, and a scan of bytes that
are not JSON stays linear."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.gateway.http import MAX_DEPTH, ApiError, decode_body, json_depth, too_deep

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9'),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(alphabet='[]{}"\\k'), inner, max_size=3),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@given(JSON)
def test_depth_of_any_json(value: Any) -> None:
    raw = msgspec.json.encode(value)
    assert json_depth(raw) == depth(value)
    assert too_deep(raw) == (depth(value) > MAX_DEPTH)


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1, 5000])
def test_decode_body_refuses_past_the_limit(depth: int) -> None:
    raw = b"[" * depth + b"]" * depth
    if depth <= MAX_DEPTH:
        assert decode_body(raw) is not None
        return
    with pytest.raises(ApiError) as refused:
        decode_body(raw)
    assert refused.value.status == 422 and refused.value.error == "too_deep"


@pytest.mark.parametrize("raw", [b'"' + b'\\"' * 200_000, b'"\\' * 200_000,
                                 b'"' + b"\\" * 400_000, (b'"a[' * 100_000)])
def test_bytes_that_are_not_json_are_scanned_once(raw: bytes) -> None:
    json_depth(raw)  # linear: a quadratic scan of these would not finish within the test timeout
