"""Numbers, positions and ack ids from text: the parsers accept exactly what the document's
patterns describe (ASCII digits, at most 2**63 - 1), and nothing Python would also take."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.gateway.http import ApiError
from tidings.gateway.params import (
    ACK_ID,
    BEFORE_LAST,
    MAX_POSITION,
    POSITION,
    POSITIVE,
    _at_most,
    ack_id,
    parse_ack_id,
    parse_position,
)

DIGITS = st.text(st.sampled_from("0123456789"), min_size=1, max_size=25)
NEAR = st.integers(0, 2**64).map(str) | DIGITS | st.text(max_size=25)


@given(st.integers(1, 10**6), st.integers(0, 2 * 10**6))
def test_at_most_matches_exactly_one_to_n(n: int, x: int) -> None:
    assert bool(re.fullmatch(_at_most(n), str(x))) == (1 <= x <= n)


@given(NEAR)
def test_the_patterns_and_the_parser_agree(text: str) -> None:
    assert bool(re.fullmatch(POSITION, text)) == (parse_position(text) is not None)
    assert bool(re.fullmatch(POSITIVE, text)) == (parse_position(text, 1) is not None)
    assert bool(re.fullmatch(BEFORE_LAST, text)) == (
        parse_position(text, 0, MAX_POSITION - 1) is not None)


@pytest.mark.parametrize("text", ["²", "٣", "١٠", "1_0", "+1", "-1", " 1", "1 ", "0x1", "1.0",
                                  "", "1\n", str(2**63), "9" * 5000])
def test_only_ascii_digits_up_to_the_largest_position(text: str) -> None:
    assert parse_position(text) is None
    assert not re.fullmatch(POSITION, text)


def test_edges() -> None:
    assert parse_position(str(MAX_POSITION)) == MAX_POSITION
    assert parse_position("0" * 5000 + "7") == 7
    assert parse_position("0") == 0 and parse_position("0", 1) is None


@given(st.from_regex(rf"\A{ACK_ID}\Z"))
def test_every_ack_id_the_pattern_allows_parses(text: str) -> None:
    group, pattern, position = parse_ack_id(text)
    assert 0 <= position <= MAX_POSITION
    assert ack_id(group, pattern, position) == f"{group}:{pattern}:{position}"


@given(st.text(max_size=40))
def test_anything_else_is_a_422(text: str) -> None:
    if re.fullmatch(ACK_ID, text):
        return
    with pytest.raises(ApiError) as refused:
        parse_ack_id(text)
    assert refused.value.status == 422


@pytest.mark.parametrize("text", ["g:q.a:9223372036854775808", "g:q.a:²", "g:q.a:٣", "",
                                  "g::1", ":q:1", "g:q..a:1", "g:q.>.a:1", "g$:q:1", "g:q:1\n",
                                  "g:q:-1", "g:q:1:2"])
def test_bad_ack_ids(text: str) -> None:
    with pytest.raises(ApiError):
        parse_ack_id(text)
