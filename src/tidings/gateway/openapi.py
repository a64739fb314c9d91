"""The OpenAPI 3.1 description of the gateway, written by hand to say exactly what it does.

A test runs schemathesis against it on a live server: every response must be
one the document lists, with the body it describes, and no input may cause a
server error.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ..inputs import input_schema
from . import cloudevents as _ce
from . import explore as _explore
from .http import MAX_DEPTH
from .params import ACK_ID, BEFORE_LAST, MAX_POSITION, POSITIVE
from .pubsub import MAX_GROUP

__all__ = ["openapi", "with_inputs"]

_TOKEN = r"[A-Za-z0-9_$-]+"
TOPIC = rf"^[A-Za-z0-9_-][A-Za-z0-9_$-]*(\.{_TOKEN})*$"
PATTERN = rf"^({_TOKEN}|\*)(\.({_TOKEN}|\*))*(\.>)?$|^>$"
GROUP = r"^[A-Za-z0-9_-]+$"
BIG = MAX_POSITION
#: Nesting, which JSON Schema cannot bound: said in words wherever a body takes any JSON.
_NESTING = (f"Arrays and objects may nest at most {MAX_DEPTH} levels deep, counting the "
            "request body's own object (deeper: 422).")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str,
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _json(_ref("Error"), description, headers)


_RETRY = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
ERRORS: dict[str, dict[str, Any]] = {
    "400": _error("malformed JSON or header"),
    "401": _error("missing or wrong bearer token",
                  {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    "404": _error("not found"),
    "408": _error("the request body did not arrive in time"),
    "409": _error("conflict (version, id or subscription settings)"),
    "413": _error("request body over the limit"),
    "422": _error("invalid topic, field or value"),
    "429": _error("too many requests in progress", _RETRY),
    "501": _error("the engine does not offer this"),
    "503": _error("the engine is unavailable", _RETRY),
}


def _errors(*codes: int) -> dict[str, Any]:
    # copies: every document, and every operation in it, has objects of its own to change
    return {str(c): copy.deepcopy(ERRORS[str(c)]) for c in codes}


def _path(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema}


def _query(name: str, schema: dict[str, Any], description: str,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": schema}


def _body(schema: dict[str, Any], example: Any) -> dict[str, Any]:
    return {"required": True,
            "content": {"application/json": {"schema": schema, "example": example}}}


def _links(response: dict[str, Any], **links: dict[str, Any]) -> dict[str, Any]:
    """`response` with OpenAPI links: what a client (or schemathesis) may call next with it."""
    response["links"] = links
    return response


def _events(*items: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """A Server-Sent Events response: each event (OpenAPI 3.1 describes one event, as
    schemathesis reads it) carries JSON in `data`."""
    one = [{"type": "object", "required": ["event", "data"],
            "properties": {"event": {"const": name}, "id": {"type": "string"},
                           "retry": {"type": "integer"},
                           "data": {"type": "string", "contentMediaType": "application/json",
                                    "contentSchema": schema}}}
           for name, schema in items]
    return {"description": "an endless event stream",
            "content": {"text/event-stream": {"schema": {"oneOf": one}}}}


_CLOUDEVENTS_IN = (
    "CloudEvents 1.0 are taken in structured mode (Content-Type application/cloudevents+json), "
    "batch mode (application/cloudevents-batch+json) and binary mode: the ce-specversion, "
    "ce-id, ce-source and ce-type headers (ce-time, ce-subject and extensions optional, "
    "percent-encoded) with the data as the body, its type as Content-Type. The CloudEvent's id "
    "is the message id (a repeat is not stored), partitionkey the key, datacontenttype the "
    "content-type header, every other attribute x the header ce-x. Other "
    "application/cloudevents formats get 415.")
_CLOUDEVENTS_OUT = (
    "With Accept: application/cloudevents+json the answer is one structured CloudEvent (max "
    "must be 1; 204 when none arrived), with application/cloudevents-batch+json a JSON array "
    "of them; tidingsackid is the ack id.")


def _cloudevents_in(body: dict[str, Any]) -> dict[str, Any]:
    """A publish request body that also takes CloudEvents (structured and batch mode)."""
    example = {"specversion": "1.0", "id": "evt-1", "source": "/shop/orders",
               "type": "com.example.order.created", "datacontenttype": "application/json",
               "data": {"order_id": "o-1", "total": 42}}
    body["content"][_ce.STRUCTURED] = {"schema": _ref("CloudEvent"), "example": example}
    body["content"][_ce.BATCH] = {"schema": _ref("CloudEventBatch"), "example": [example]}
    return body


def _cloudevents_out(response: dict[str, Any]) -> dict[str, Any]:
    """A pull's answer that may also be CloudEvents, by the request's Accept."""
    response["content"][_ce.STRUCTURED] = {"schema": _ref("CloudEventOut")}
    response["content"][_ce.BATCH] = {"schema": {"type": "array",
                                                 "items": _ref("CloudEventOut")}}
    return response


def openapi(*, max_body: int, max_wait: float, max_pull: int, auth: bool) -> dict[str, Any]:
    """The document for an app with these limits (and bearer auth when `auth`)."""
    topic = _path("topic", {"type": "string", "pattern": TOPIC, "maxLength": 255},
                  "a topic name (dot-separated tokens; not starting with '$', which is "
                  "tidings' own)")
    topic["example"] = "orders.created"
    pattern = _path("topic", {"type": "string", "pattern": PATTERN, "maxLength": 255},
                    "a topic or a pattern: '*' is one token, '>' the rest")
    pattern["example"] = "orders.*"
    group = _path("group", {"type": "string", "pattern": GROUP, "maxLength": MAX_GROUP},
                  f"the durable subscription's name (at most {MAX_GROUP} characters, so that "
                  "its dead-letter topic '$dlq.<group>' is a topic)")
    group["example"] = "billing"
    stream_id = _path("stream_id", {"type": "string", "minLength": 1, "maxLength": 255,
                                    "pattern": "^[^\\x00-\\x1f]+$"},
                      "the stream (aggregate) id; no control characters ('/' is fine)")
    stream_id["example"] = "order-1"
    new_stream_id = _path("stream_id", {"type": "string", "minLength": 1, "maxLength": 255,
                                        "pattern": "^[^$\\x00-\\x1f][^\\x00-\\x1f]*$"},
                          "the stream (aggregate) id; no control characters ('/' is fine), "
                          "not starting with '$' (tidings' own)")
    new_stream_id["example"] = "order-1"
    # 503 wherever the hub is touched: a closed or unreachable engine is "retry later".
    # 408 and 429 wherever a body is read: it must arrive in time, and the bytes of all
    # bodies being read at once are bounded.
    common = (400, 401, 408, 413, 429, 503) if auth else (400, 408, 413, 429, 503)
    reads = (401, 503) if auth else (503,)

    paths: dict[str, Any] = {
        "/v1/topics": {"get": {
            "operationId": "listTopics", "summary": "topics with counts, subscriptions with lag",
            "responses": {"200": _json(_ref("TopicList"), "the topics"), **_errors(*reads)},
        }},
        "/v1/topics/{topic}/messages": {"post": {
            "operationId": "publish",
            "summary": "publish one message, or a batch atomically",
            "description": f"{_NESTING} {_CLOUDEVENTS_IN}",
            "parameters": [topic],
            "requestBody": _cloudevents_in(_body(
                {"oneOf": [_ref("PublishMessage"), _ref("PublishBatch")]},
                {"data": {"order_id": "o-1", "total": 42}, "key": "o-1"})),
            "responses": {
                "201": _json({"oneOf": [_ref("Published"), _ref("PublishedBatch")]},
                             "stored (a batch: all of it)"),
                **_errors(*common, 422),
                "415": _error("a CloudEvents format other than JSON"),
            },
        }},
        "/v1/topics/{topic}/stream": {"get": {
            "operationId": "streamTopic",
            "summary": "live Server-Sent Events (event 'message', id = position)",
            "parameters": [
                pattern,
                _query("start", {"type": "string", "pattern": f"^(beginning|end|{POSITIVE})$"},
                       "where to start when not resuming: beginning, end (the default) or a "
                       "position"),
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": f"^({BEFORE_LAST})$"},
                 "description": "resume after this position"},
            ],
            "responses": {
                "200": _events(("message", _ref("Message")), ("error", _ref("Error"))),
                **_errors(*reads, 422, 429),
            },
        }},
        "/v1/subscriptions/{group}/messages": {"get": {
            "operationId": "pull",
            "summary": "claim up to max messages, waiting up to wait seconds for the first",
            "description": _CLOUDEVENTS_OUT,
            "parameters": [
                group,
                {**_query("topic", {"type": "string", "pattern": PATTERN, "maxLength": 255},
                          "the subscription's topic pattern", required=True),
                 "example": "orders.*"},
                {**_query("max", {"type": "integer", "minimum": 1, "maximum": max_pull},
                          "at most this many messages (default 10)"), "example": 10},
                _query("wait", {"type": "number", "minimum": 0, "maximum": max_wait},
                       "long-poll seconds (default 0); the pull ends at once when the client "
                       "disconnects, and claims nothing more"),
            ],
            "responses": {"200": _links(
                _cloudevents_out(_json(_ref("Pulled"), "the messages (maybe none)")),
                **{op: {"operationId": op, "parameters": {"path.group": "$request.path.group"},
                        "requestBody": {"ack_ids": ["$response.body#/messages/0/ack_id"]}}
                   for op in ("ack", "nack")}),
                          "204": {"description": "no message arrived (Accept: "
                                                 "application/cloudevents+json)"},
                          "409": _error("the pattern matches the group's own dead-letter "
                                        "topic"),
                          **_errors(*reads, 422, 429)},
        }},
        "/v1/subscriptions/{group}/ack": {"post": {
            "operationId": "ack", "summary": "settle messages as done",
            "parameters": [group],
            "requestBody": _body(_ref("AckIds"), {"ack_ids": ["billing:orders.*:1"]}),
            "responses": {"200": _json(_ref("Settled"), "settled"),
                          **_errors(*common, 404, 422)},
        }},
        "/v1/subscriptions/{group}/nack": {"post": {
            "operationId": "nack", "summary": "ask for redelivery after delay seconds",
            "parameters": [group],
            "requestBody": _body(_ref("NackIds"), {"ack_ids": ["billing:orders.*:1"],
                                                   "delay": 5}),
            "responses": {"200": _json(_ref("Settled"), "settled"),
                          **_errors(*common, 404, 422)},
        }},
        "/v1/streams/{stream_id}/events": {
            "post": {
                "operationId": "appendEvents",
                "summary": "append events if the stream is at expected_version",
                "description": _NESTING,
                "parameters": [new_stream_id],
                "requestBody": _body(_ref("Append"), {
                    "events": [{"type": "OrderPlaced", "data": {"total": 42}}],
                    "expected_version": "any"}),
                "responses": {"201": _links(
                    _json(_ref("Appended"), "stored"),
                    read={"operationId": "readEvents",
                          "parameters": {"path.stream_id": "$response.body#/stream_id"}}),
                              **_errors(*common, 404, 409, 422, 501)},
            },
            "get": {
                "operationId": "readEvents", "summary": "a range of a stream's events",
                "parameters": [
                    stream_id,
                    {**_query("from_version", {"type": "integer", "minimum": 1,
                                               "maximum": BIG}, "first version"),
                     "example": 1},
                    _query("to_version", {"type": "integer", "minimum": 0, "maximum": BIG},
                           "last version"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 10_000},
                           "at most this many events (default 1000)"),
                ],
                "responses": {"200": _json(_ref("StreamEvents"), "the events"),
                              **_errors(*reads, 404, 422, 501)},
            },
        },
        "/v1/commands/{saga}": {"post": {
            "operationId": "startCommand",
            "summary": "start a saga; 202 with the request id to poll",
            "parameters": [
                {**_path("saga", {"type": "string", "minLength": 1}, "the saga's name"),
                 "example": "create-order"},
                {"name": "Idempotency-Key", "in": "header", "required": False,
                 "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                 "description": "a repeat with the same key returns the same request id"},
            ],
            "description": _NESTING,
            "requestBody": _body({"type": "object"}, {"order_id": "o-1", "total": 42}),
            "responses": {
                "202": _links(
                    _json(_ref("Accepted"), "accepted; poll Location",
                          {"Location": {"schema": {"type": "string"}}}),
                    poll={"operationId": "getRequest",
                          "parameters": {"path.id": "$response.body#/request_id"}}),
                "409": _error("the Idempotency-Key was used with another body"),
                **_errors(*common, 404, 422),
            },
        }},
        "/v1/requests/{id}": {"get": {
            "operationId": "getRequest", "summary": "the outcome of a command",
            "parameters": [
                _path("id", {"type": "string", "minLength": 1}, "the request id"),
                _query("wait", {"type": "number", "minimum": 0, "maximum": max_wait},
                       "answer as soon as the request ends, or after this many seconds"),
            ],
            "responses": {"200": _json(_ref("RequestState"), "its state"),
                          **_errors(*reads, 404, 422, 429)},
        }},
        "/v1/sagas": {"get": {
            "operationId": "listSagas", "summary": "saga instances",
            "parameters": [_query("status", {"type": "string"}, "only this status")],
            "responses": {"200": _json(_ref("SagaList"), "instances"), **_errors(*reads)},
        }},
        "/v1/sagas/{id}": {"get": {
            "operationId": "getSaga", "summary": "one saga instance and its step history",
            "parameters": [_path("id", {"type": "string", "minLength": 1}, "the saga id")],
            "responses": {"200": _json({"type": "object", "required": ["saga"]}, "the saga"),
                          **_errors(*reads, 404)},
        }},
        "/v1/dlq/{group}": {"get": {
            "operationId": "listDeadLetters",
            "summary": "the group's dead letters not redriven yet, oldest first",
            "parameters": [
                group,
                _query("topic", {"type": "string", "pattern": PATTERN, "maxLength": 255},
                       "only those whose original topic matches this pattern"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                       "at most this many (default 100)"),
                _query("redriven", {"type": "boolean"}, "also those already redriven"),
                _query("dead_letter", {"type": "string", "pattern": TOPIC, "maxLength": 255},
                       "the subscription's own dead-letter topic, if it named one "
                       "(default $dlq.{group})"),
            ],
            "responses": {"200": _json(_ref("DeadLetters"), "the dead letters"),
                          **_errors(*reads, 404, 422)},
        }},
        "/v1/dlq/{group}/redrive": {"post": {
            "operationId": "redrive",
            "summary": "move dead letters back to their original topics, exactly once",
            "description": "Each comes back as a new message (attempts from 1, a "
            "tidings-redriven header) that only the group's subscription gets again. Asking "
            "again moves nothing twice: a lost answer is safe to retry.",
            "parameters": [group],
            "requestBody": _body(_ref("Redrive"), {"ids": ["m-1"]}),
            "responses": {"200": _json(_ref("Redriven"), "how many moved"),
                          **_errors(*common, 404, 422)},
        }},
        "/v1/dashboard": {"get": {
            "operationId": "dashboardSnapshot", "summary": "what the dashboard shows, now",
            "responses": {"200": _json(_ref("Snapshot"), "a snapshot"), **_errors(*reads)},
        }},
        "/v1/dashboard/stream": {"get": {
            "operationId": "dashboardStream",
            "summary": "a snapshot every second as Server-Sent Events (event 'snapshot')",
            "responses": {
                "200": _events(("snapshot", _ref("Snapshot"))),
                **_errors(*reads, 429),
            },
        }},
        "/v1/openapi.json": {"get": {
            "operationId": "openapi", "summary": "this document",
            "responses": {"200": _json({"type": "object"}, "the document"),
                          **_errors(*reads[:-1])},
        }},
        "/v1/asyncapi.json": {"get": {
            "operationId": "asyncapi",
            "summary": "the application's AsyncAPI 3.0 document: the topics it publishes "
                       "and subscribes to, its command handlers, its sagas' commands",
            "responses": {"200": _json({"type": "object"}, "the document"),
                          **_errors(*reads[:-1])},
        }},
        "/healthz": {"get": {
            "operationId": "health", "summary": "200 while the hub is open", "security": [],
            "responses": {"200": _json(_ref("Health"), "healthy"),
                          "503": _json(_ref("Health"), "the hub is closed", _RETRY)},
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus text format",
            "responses": {
                "200": {"description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_errors(*reads),
            },
        }},
    }

    paths.update(_explore.paths(errors=_errors, reads=reads, common=common, pattern=pattern,
                                stream_id=stream_id))
    headers = {"type": "object", "additionalProperties": {"type": "string"}}
    message_out: dict[str, Any] = {
        "type": "object",
        "required": ["id", "topic", "position", "time", "headers", "attempt"],
        "properties": {
            "id": {"type": "string"}, "topic": {"type": "string"},
            "key": {"type": ["string", "null"]}, "position": {"type": "integer"},
            "time": {"type": "string"}, "headers": headers, "attempt": {"type": "integer"},
            "data": {}, "data_b64": {"type": "string"},
            "ack_id": {"type": "string", "pattern": f"^{ACK_ID}$"},
        },
    }
    publish_one = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "data": {"description": "any JSON value; a string is stored as text/plain"},
            "data_b64": {"type": "string", "description": "binary data, base64",
                         "pattern": "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"},
            "key": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
            "headers": {"type": ["object", "null"],
                        "additionalProperties": {"type": "string"},
                        "propertyNames": {"minLength": 1}},
            "id": {"type": ["string", "null"], "minLength": 1, "maxLength": 255,
                   "pattern": "^[^$]",
                   "description": "a client id: a repeat within the dedup window is not stored"},
        },
        "oneOf": [{"required": ["data"], "not": {"required": ["data_b64"]}},
                  {"required": ["data_b64"], "not": {"required": ["data"]}}],
    }
    ack_ids = {"type": "array", "minItems": 1, "maxItems": 1000,
               "items": {"type": "string", "pattern": f"^{ACK_ID}$",
                         "description": "group:pattern:position, as a pull returned it"}}
    published = {"type": "object", "required": ["id", "position", "duplicate"],
                 "properties": {"id": {"type": "string"}, "position": {"type": "integer"},
                                "duplicate": {"type": "boolean"}}}
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error", "detail"],
                  "properties": {"error": {"type": "string"}, "detail": {"type": "string"},
                                 "field": {"type": "string", "description":
                                           "the JSON path of the field at fault, such as "
                                           "$.lines[0].quantity (with 422 invalid_field)"}}},
        "PublishMessage": publish_one,
        "PublishBatch": {"type": "object", "required": ["messages"],
                         "additionalProperties": False,
                         "properties": {"messages": {"type": "array", "minItems": 1,
                                                     "maxItems": 10_000,
                                                     "items": _ref("PublishMessage")}}},
        "Published": published,
        "PublishedBatch": {"type": "object", "required": ["positions", "messages"],
                           "properties": {"positions": {"type": "array",
                                                        "items": {"type": "integer"}},
                                          "messages": {"type": "array", "items": published}}},
        "TopicList": {"type": "object", "required": ["topics"], "properties": {"topics": {
            "type": "array", "items": {
                "type": "object",
                "required": ["topic", "messages", "bytes", "subscriptions"],
                "properties": {
                    "topic": {"type": "string"}, "messages": {"type": "integer"},
                    "bytes": {"type": "integer"},
                    "first_position": {"type": ["integer", "null"]},
                    "last_position": {"type": ["integer", "null"]},
                    "subscriptions": {"type": "array", "items": _ref("SubscriptionState")},
                }}}}},
        "SubscriptionState": {
            "type": "object", "required": ["group", "pattern", "lag", "pending", "in_flight"],
            "properties": {"group": {"type": "string"}, "pattern": {"type": "string"},
                           "lag": {"type": "integer"}, "pending": {"type": "integer"},
                           "in_flight": {"type": "integer"}}},
        "Pulled": {"type": "object", "required": ["messages"],
                   "properties": {"messages": {"type": "array", "items": message_out}}},
        "Message": message_out,
        **_ce.schemas(ACK_ID),
        "AckIds": {"type": "object", "required": ["ack_ids"], "additionalProperties": False,
                   "properties": {"ack_ids": ack_ids}},
        "NackIds": {"type": "object", "required": ["ack_ids"], "additionalProperties": False,
                    "properties": {"ack_ids": ack_ids,
                                   "delay": {"type": ["number", "null"], "minimum": 0,
                                             "maximum": 86_400}}},
        "DeadLetters": {"type": "object", "required": ["group", "dead_letters"],
                        "properties": {"group": {"type": "string"}, "dead_letters": {
                            "type": "array", "items": {**message_out, "properties": {
                                **message_out["properties"],
                                "original_topic": {"type": ["string", "null"]},
                                "original_id": {"type": ["string", "null"]},
                                "reason": {"type": ["string", "null"]},
                                "attempts": {"type": ["integer", "null"]},
                                "error": {"type": ["string", "null"]}}}}}},
        "Redrive": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "ids": {"type": "array", "minItems": 1, "maxItems": 10_000,
                        "items": {"type": "string", "minLength": 1, "maxLength": 255},
                        "description": "dead letters' ids, or their original messages' ids"},
                "all": {"const": True, "description": "every dead letter of the group"},
                "topic": {"type": "string", "pattern": PATTERN, "maxLength": 255},
                "limit": {"type": "integer", "minimum": 1, "maximum": BIG},
                "dead_letter": {"type": "string", "pattern": TOPIC, "maxLength": 255},
            },
            "oneOf": [{"required": ["ids"], "not": {"required": ["all"]}},
                      {"required": ["all"], "not": {"required": ["ids"]}}]},
        "Redriven": {"type": "object", "required": ["group", "moved"],
                     "properties": {"group": {"type": "string"},
                                    "moved": {"type": "integer"}}},
        "Settled": {"type": "object", "required": ["settled"],
                    "properties": {"settled": {"type": "integer"}}},
        "Append": {
            "type": "object", "required": ["events", "expected_version"],
            "additionalProperties": False,
            "properties": {
                "events": {"type": "array", "minItems": 1, "maxItems": 10_000, "items": {
                    "type": "object", "required": ["type", "data"], "additionalProperties": False,
                    "properties": {
                        "type": {"type": "string", "minLength": 1, "maxLength": 255},
                        "data": {"type": "object"},
                        "id": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
                        "headers": {"type": ["object", "null"],
                                    "additionalProperties": {"type": "string"},
                                    "propertyNames": {"minLength": 1}},
                    }}},
                "expected_version": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": BIG},
                                               {"const": "any"}],
                                     "description": "0: the stream must not exist yet"},
                "topic": {"type": ["string", "null"], "pattern": TOPIC, "maxLength": 255},
            }},
        "Appended": {"type": "object",
                     "required": ["stream_id", "version", "positions", "duplicate"],
                     "properties": {"stream_id": {"type": "string"},
                                    "version": {"type": "integer"},
                                    "positions": {"type": "array", "items": {"type": "integer"}},
                                    "duplicate": {"type": "boolean"}}},
        "StreamEvents": {
            "type": "object", "required": ["stream_id", "events", "next_from_version"],
            "properties": {
                "stream_id": {"type": "string"},
                "next_from_version": {"type": ["integer", "null"]},
                "events": {"type": "array", "items": {
                    "type": "object",
                    "required": ["stream_id", "version", "position", "id", "type", "time",
                                 "headers", "data"],
                    "properties": {"stream_id": {"type": "string"},
                                   "version": {"type": "integer"},
                                   "type_version": {"type": "integer"},
                                   "position": {"type": "integer"}, "id": {"type": "string"},
                                   "type": {"type": "string"}, "time": {"type": "string"},
                                   "headers": headers, "data": {}}}}}},
        "Accepted": {"type": "object", "required": ["request_id"],
                     "properties": {"request_id": {"type": "string"}}},
        "RequestState": {
            "type": "object", "required": ["request_id", "saga", "status"],
            "properties": {
                "request_id": {"type": "string"}, "saga": {"type": "string"},
                "status": {"enum": ["pending", "running", "completed", "compensated",
                                    "failed"]},
                "result": {}, "error": {}}},
        "SagaList": {"type": "object", "required": ["sagas"],
                     "properties": {"sagas": {"type": "array", "items": {"type": "object"}}}},
        "Snapshot": {"type": "object",
                     "required": ["time", "topics", "subscriptions", "dead_letters", "commands",
                                  "requests"],
                     "properties": {
                         "time": {"type": "number"},
                         "history": {"type": "array", "items": {"type": "object"},
                                     "description": "chart points {t, dt, published, "
                                     "delivered, lag, outcomes, latency?} of the last "
                                     "minutes (the stream: all in its first snapshot, then "
                                     "the new ones)"},
                         "latency_buckets": {"type": "array", "items": {"type": "number"}}}},
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"enum": ["ok", "unavailable"]},
                                  "detail": {"type": "string"}}},
    }
    schemas.update(_explore.schemas(message_out,
                                    schemas["StreamEvents"]["properties"]["events"]["items"]))
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "tidings gateway", "version": "1",
                 "description": "Pub/sub, event store and asynchronous request-reply over HTTP. "
                 "Every error is a JSON object {error, detail}. Request bodies over "
                 f"{max_body} bytes get 413."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        for route in ("/healthz",):
            doc["paths"][route]["get"]["security"] = []
    else:
        del doc["paths"]["/healthz"]["get"]["security"]
    return doc


def with_inputs(doc: dict[str, Any], inputs: Mapping[str, type[Any]]) -> dict[str, Any]:
    """`doc` with an operation of its own for each saga in `inputs` (name -> input
    type): `POST /v1/commands/<name>`, whose body is that type's JSON schema (the
    templated path describes the sagas without one). `doc` itself is not changed."""
    if not inputs:
        return doc
    paths = dict(doc["paths"])
    schemas = dict(doc["components"]["schemas"])
    generic = paths["/v1/commands/{saga}"]["post"]
    for name, tp in sorted(inputs.items()):
        # named schemas under the saga's name: no clash with the gateway's own ("Error")
        # or with another saga's type of the same name
        schema, named = input_schema(tp, f"{name}.")
        schemas.update(named)
        op = copy.deepcopy(generic)
        op.update(operationId=f"startCommand.{name}",
                  summary=f"start a {name} saga; 202 with the request id to poll",
                  parameters=[p for p in op["parameters"] if p["in"] != "path"],
                  requestBody={"required": True,
                               "content": {"application/json": {"schema": schema}}})
        del op["responses"]["404"]
        op["responses"]["422"] = _error(f"the body does not fit {tp.__name__} (`field` is the "
                                        "JSON path of the first field at fault), or a header "
                                        "is invalid")
        paths[f"/v1/commands/{name}"] = {"post": op}
    return {**doc, "paths": paths, "components": {**doc["components"], "schemas": schemas}}
