"""Topic names and subscription patterns: validation and matching (pure).

A topic is one or more dot-separated tokens of letters, digits, `_`, `-`
(and `$` reserved for tidings' own topics such as dead letters). A pattern may
use `*` for exactly one token and `>` (last token only) for one or more.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .errors import InvalidTopic

__all__ = ["MAX_TOPIC_LENGTH", "matcher", "matches", "validate_pattern", "validate_topic"]

MAX_TOPIC_LENGTH = 255
# \Z, not $: `$` would also accept a trailing newline ("orders\n").
_TOKEN = re.compile(r"[A-Za-z0-9_\-$]+\Z")
_RULE = (
    "a topic is dot-separated tokens of letters, digits, '_' or '-' "
    "(e.g. 'orders.created'), at most 255 characters, with no empty token"
)
_PATTERN_RULE = _RULE + "; patterns may use '*' for one token and '>' as the last token"


def _check(name: object, what: str, rule: str) -> str:
    if not isinstance(name, str):
        raise InvalidTopic(f"{what} must be a str, got {type(name).__name__}; {rule}")
    if not name or len(name) > MAX_TOPIC_LENGTH:
        raise InvalidTopic(f"invalid {what} {name[:60]!r}: {rule}")
    return name


def validate_topic(name: str) -> str:
    """Return `name` if it is a valid concrete topic, else raise `InvalidTopic`."""
    _check(name, "topic", _RULE)
    return _validate_topic(name)


@lru_cache(maxsize=4096)
def _validate_topic(name: str) -> str:
    for token in name.split("."):
        if not _TOKEN.match(token):
            wildcard = token in ("*", ">")
            hint = " (wildcards are for subscriptions, not publishing)" if wildcard else ""
            raise InvalidTopic(f"invalid topic {name!r}{hint}: {_RULE}")
    return name


def validate_pattern(pattern: str) -> str:
    """Return `pattern` if it is a valid subscription pattern, else raise `InvalidTopic`."""
    _check(pattern, "pattern", _PATTERN_RULE)
    return _validate_pattern(pattern)


@lru_cache(maxsize=4096)
def _validate_pattern(pattern: str) -> str:
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == "*":
            continue
        if token == ">":
            if i != len(tokens) - 1:
                raise InvalidTopic(f"invalid pattern {pattern!r}: '>' may only be the last token")
            continue
        if not _TOKEN.match(token):
            raise InvalidTopic(f"invalid pattern {pattern!r}: {_PATTERN_RULE}")
    return pattern


@lru_cache(maxsize=4096)
def matcher(pattern: str) -> re.Pattern[str]:
    """A compiled regular expression that matches exactly the topics of `pattern`."""
    validate_pattern(pattern)
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(token))
    body = r"\.".join(parts) + r"\Z"
    if pattern[0] in "*>":
        # As in NATS, a leading wildcard does not match system topics ('$dlq.…').
        body = r"(?!\$)" + body
    return re.compile(body)


def matches(pattern: str, topic: str) -> bool:
    """True when `topic` is matched by `pattern` (`*` one token, `>` the rest)."""
    return matcher(pattern).match(topic) is not None


def is_token(name: str) -> bool:
    """True when `name` is one topic token (letters, digits, '_' and '-')."""
    return bool(_TOKEN.match(name)) and "$" not in name
