"""Checks an AsyncAPI 3.0 document: the official JSON schema (vendored, see
fixtures/asyncapi/README.md), every `$ref` resolving, each operation's messages its
channel's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs

SCHEMA = Path(__file__).parent / "fixtures" / "asyncapi" / "asyncapi-3.0.0.schema.json"
VALIDATOR = jsonschema_rs.Draft7Validator(json.loads(SCHEMA.read_text()))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert part in node, f"{ref} does not resolve ({part!r} missing)"
        node = node[part]
    return node


def check(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` is a valid AsyncAPI 3.0 document, every $ref resolves, and each operation's
    messages are its channel's (as AsyncAPI 3 requires)."""
    errors = [f"{e.instance_path}: {e.message[:300]}" for e in VALIDATOR.iter_errors(doc)]
    assert not errors, errors
    for ref in _refs(doc):
        resolve(doc, ref)
    for oid, op in doc["operations"].items():
        channel = op["channel"]["$ref"]
        for m in op.get("messages", []):
            assert m["$ref"].startswith(channel + "/messages/"), (oid, m)
        reply = op.get("reply")
        if reply:
            for m in reply["messages"]:
                assert m["$ref"].startswith(reply["channel"]["$ref"] + "/messages/"), (oid, m)
    for cid, ch in doc["channels"].items():
        if ch["address"] is not None:
            for name in ch.get("parameters", {}):
                assert "{" + name + "}" in ch["address"], cid
    return doc


def payload_of(doc: dict[str, Any], op_id: str, reply: bool = False) -> Any:
    """The payload schema (its $ref resolved) of the first message of an operation."""
    op = doc["operations"][op_id]
    ref = (op["reply"] if reply else op)["messages"][0]["$ref"]
    message = resolve(doc, resolve(doc, ref)["$ref"])
    payload = message["payload"]
    return resolve(doc, payload["$ref"]) if "$ref" in payload else payload
