"""Topic names and subscription patterns: validation and matching (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tidings
from tidings.topics import MAX_TOPIC_LENGTH, is_token, matches, validate_pattern, validate_topic

VALID_TOPICS = ["a", "orders", "orders.created", "A-b_c.9", "a.b.c.d.e.f", "$dlq.billing",
                "x" * MAX_TOPIC_LENGTH, ".".join(["t"] * 128)]
INVALID_TOPICS = ["", ".", "..", "a.", ".a", "a..b", "a b", "a\tb", "a\n", "\na", "a.b\n",
                  "ä", "a/b", "a:b", "a,b", "a.*", "*", ">", "a.>", "a*", "x" * (MAX_TOPIC_LENGTH + 1)]
VALID_PATTERNS = ["a", "a.b", "*", ">", "a.*", "a.>", "*.b", "*.*", "*.b.>", "a.*.c", "$dlq.>"]
INVALID_PATTERNS = ["", "a..b", ".a", "a.", "a.>.b", ">.a", "> ", "a.b*", "a.*x", "**", ">>",
                    "a b", "a\n", "x" * (MAX_TOPIC_LENGTH + 1)]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize("topic", INVALID_TOPICS, ids=repr)
def test_invalid_topics_name_the_rule(topic: str) -> None:
    with pytest.raises(tidings.InvalidTopic) as info:
        validate_topic(topic)
    message = str(info.value)
    assert "dot-separated tokens" in message and "255" in message


@pytest.mark.parametrize("value", [None, 1, b"a.b", ["a"]], ids=repr)
def test_non_strings_are_invalid_topics_and_patterns(value: object) -> None:
    with pytest.raises(tidings.InvalidTopic, match="must be a str"):
        validate_topic(value)  # type: ignore[arg-type]
    with pytest.raises(tidings.InvalidTopic, match="must be a str"):
        validate_pattern(value)  # type: ignore[arg-type]


def test_wildcards_in_a_topic_get_a_hint() -> None:
    with pytest.raises(tidings.InvalidTopic, match="wildcards are for subscriptions"):
        validate_topic("orders.*")
    with pytest.raises(tidings.InvalidTopic) as info:
        validate_topic("a..b")  # an empty token is not a wildcard
    assert "wildcards" not in str(info.value)


def test_invalid_topic_is_an_invalid_argument() -> None:
    assert issubclass(tidings.InvalidTopic, tidings.InvalidArgument)
    assert issubclass(tidings.InvalidTopic, ValueError)


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", INVALID_PATTERNS, ids=repr)
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(tidings.InvalidTopic, match="pattern"):
        validate_pattern(pattern)


def test_greater_than_only_last() -> None:
    with pytest.raises(tidings.InvalidTopic, match="'>' may only be the last token"):
        validate_pattern("a.>.b")


@pytest.mark.parametrize(
    "pattern, topic, expected",
    [
        ("orders.created", "orders.created", True),
        ("orders.created", "orders.created.eu", False),
        ("orders.created", "orders", False),
        ("orders.*", "orders.created", True),
        ("orders.*", "orders", False),
        ("orders.*", "orders.created.eu", False),
        ("orders.>", "orders.created", True),
        ("orders.>", "orders.created.eu", True),
        ("orders.>", "orders", False),
        ("*.created", "orders.created", True),
        ("*.created", "orders.shipped", False),
        ("*", "orders", True),
        ("*", "orders.created", False),
        (">", "orders", True),
        (">", "a.b.c", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.b.c", False),
        ("*.*.>", "a.b", False),
        ("*.*.>", "a.b.c", True),
        ("orders.created", "orders-created", False),
        ("a.b", "aXb", False),  # '.' is literal, not a regex wildcard
        # system topics are only matched by patterns that name them
        (">", "$dlq.billing", False),
        ("*.billing", "$dlq.billing", False),
        ("$dlq.>", "$dlq.billing", True),
        ("$dlq.*", "$dlq.billing", True),
        ("$dlq.billing", "$dlq.billing", True),
    ],
)
def test_matching(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


def test_is_token() -> None:
    assert is_token("billing") and is_token("a-b_C9")
    for bad in ["", "a.b", "$dlq", "a b", "*", ">", "a\n"]:
        assert not is_token(bad), bad


# properties ----------------------------------------------------------------------------------

token = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=6)
topics = st.lists(token, min_size=1, max_size=5).map(".".join)
pattern_tokens = st.one_of(token, st.just("*"))


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(pattern_tokens, min_size=1, max_size=5))
    if draw(st.booleans()):
        tokens.append(">")
    return ".".join(tokens)


def reference_match(pattern: str, topic: str) -> bool:
    """Token by token, as NATS defines it."""
    p, t = pattern.split("."), topic.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or (tok != "*" and tok != t[i]):
            return False
    return len(p) == len(t)


@given(patterns(), topics)
def test_matching_agrees_with_the_token_rule(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    validate_topic(topic)
    assert matches(pattern, topic) == reference_match(pattern, topic)


@given(topics)
def test_a_topic_is_a_pattern_matching_itself(topic: str) -> None:
    assert validate_pattern(topic) == topic
    assert matches(topic, topic)
    assert matches(">", topic)
    assert matches(".".join("*" for _ in topic.split(".")), topic)


@given(topics, st.integers(0, 4))
def test_prefix_with_rest_matches_longer_topics_only(topic: str, cut: int) -> None:
    tokens = topic.split(".")
    cut = min(cut, len(tokens) - 1)
    prefix = ".".join(tokens[:cut] + [">"])
    assert matches(prefix, topic)
    assert not matches(".".join(tokens + [">"]), topic)


@given(st.text(max_size=20))
def test_validation_never_crashes_and_matches_only_valid_names(name: str) -> None:
    try:
        validate_topic(name)
    except tidings.InvalidTopic:
        return
    assert all(t and all(c.isascii() and (c.isalnum() or c in "_-$") for c in t)
               for t in name.split("."))
