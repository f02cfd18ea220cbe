"""
The machine-readable description of the API: one JSON Schema (draft
2020-12) for the ``POST /multiplex`` request, its ``200`` answer and its
error answers, served at ``GET /schema.json``.

The tests validate every answer they receive against it, so it cannot
drift from what the daemon sends.  It describes the shapes; the rules that
need the batch as a whole (ids unique, ``body`` or ``body_base64``) are
stated in descriptions and enforced by :mod:`octoplex.wire`.
"""

from __future__ import annotations

from typing import Any

from octoplex.errors import KINDS
from octoplex.timings import PHASES
from octoplex.wire import MAX_ID_LENGTH, MAX_RETRIES, encode

__all__ = ["PATH", "SCHEMA", "SCHEMA_BYTES"]

#: Where the daemon serves it.
PATH = "/schema.json"

_MSEC = {"type": "integer", "minimum": 0}
_HEADER_VALUE = {
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
}
_HEADERS = {
    "type": ["object", "null"],
    "additionalProperties": _HEADER_VALUE,
    "description": "a name to a value, or to a list of values sent as repeated headers",
}
_BODY = {"type": ["string", "null"], "description": "sent as UTF-8 bytes"}
_BODY_BASE64 = {
    "type": ["string", "null"],
    "contentEncoding": "base64",
    "description": "a binary body in standard base64; not with body",
}

_RETRY = {
    "type": ["object", "null"],
    "additionalProperties": False,
    "required": ["times"],
    "properties": {
        "times": {"type": "integer", "minimum": 1, "maximum": MAX_RETRIES},
        "statuses": {"type": "array", "items": {"type": "integer", "minimum": 400, "maximum": 599}},
        "connect_errors": {"type": "boolean"},
    },
    "description": "send the request again on these statuses or connect failures, after a "
    "jittered backoff or the upstream's Retry-After, while its deadline leaves room",
}
_HEDGE = {
    "type": ["object", "null"],
    "additionalProperties": False,
    "properties": {
        "after_msec": {"type": "integer", "minimum": 1},
        "after_percentile": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
    },
    "oneOf": [{"required": ["after_msec"]}, {"required": ["after_percentile"]}],
    "description": "send a second, identical attempt if the first has no response head "
    "after after_msec milliseconds, or after the after_percentile percentile of the "
    "upstream's recent times to a head; the first head wins (docs/hedging.md)",
}
_HEDGE_UNSAFE = {
    "type": ["boolean", "null"],
    "description": "let a method that is not idempotent be hedged (a second copy may act twice)",
}
_HEDGED = {"type": "boolean", "const": True, "description": "only when a hedge was sent"}
_HEDGE_WON = {
    "type": "boolean",
    "description": "whether the hedge's response head came first; only when hedged",
}
_ATTEMPTS = {"type": "integer", "minimum": 1, "description": "only for a request with retry"}
_PHASE = {"type": ["number", "null"], "minimum": 0}
_TIMINGS = {
    "type": "object",
    "additionalProperties": False,
    "required": [*PHASES, "total_msec", "reused"],
    "properties": {
        **{name: _PHASE for name in PHASES},
        "total_msec": {"type": "number", "minimum": 0},
        "reused": {"type": "boolean"},
    },
    "description": "where the request's (latest attempt's) time went, in milliseconds; "
    "null for a phase it did not go through",
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://octoplex.invalid/schema.json",
    "title": "Octoplex multiplexer API, version 1",
    "description": "POST /multiplex takes a Batch and answers 200 with an Answer, or with "
    "an Error for the batch as a whole.  With Accept: application/x-ndjson the 200 answer "
    "is one StreamLine per outcome, as each completes, then one Summary line.",
    "oneOf": [
        {"$ref": "#/$defs/Batch"},
        {"$ref": "#/$defs/Answer"},
        {"$ref": "#/$defs/Error"},
        {"$ref": "#/$defs/StreamLine"},
        {"$ref": "#/$defs/Summary"},
    ],
    "$defs": {
        "Batch": {
            "type": "object",
            "additionalProperties": False,
            "required": ["timeout_msec", "requests"],
            "properties": {
                "timeout_msec": {**_MSEC, "description": "the batch's deadline, from its arrival"},
                "requests": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"$ref": "#/$defs/Request"},
                },
                "content_base64": {"type": "boolean"},
                "header_list": {"type": "boolean"},
                "content_encoding": {"type": "boolean"},
                "timings": {"type": "boolean"},
                "max_parallel": {"type": "integer", "minimum": 1},
                "defaults": {"$ref": "#/$defs/Defaults"},
            },
        },
        "Request": {
            "type": "object",
            "additionalProperties": False,
            "required": ["uri"],
            "properties": {
                "id": {
                    "type": ["string", "null"],
                    "minLength": 1,
                    "maxLength": MAX_ID_LENGTH,
                    "description": "unique within the batch; echoed in the outcome",
                },
                "method": {"type": "string", "description": "default GET"},
                "uri": {"type": "string"},
                "headers": _HEADERS,
                "body": _BODY,
                "body_base64": _BODY_BASE64,
                "timeout_msec": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "description": "this request's own deadline; the batch's caps it",
                },
                "retry": _RETRY,
                "hedge": _HEDGE,
                "hedge_unsafe": _HEDGE_UNSAFE,
            },
        },
        "Defaults": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "method": {"type": ["string", "null"]},
                "headers": _HEADERS,
                "body": _BODY,
                "body_base64": _BODY_BASE64,
                "base_uri": {"type": ["string", "null"]},
                "retry": _RETRY,
                "hedge": _HEDGE,
                "hedge_unsafe": _HEDGE_UNSAFE,
            },
        },
        "Answer": {
            "type": "object",
            "additionalProperties": False,
            "required": ["responses"],
            "properties": {
                "responses": {"type": "array", "items": {"$ref": "#/$defs/Outcome"}},
            },
        },
        "Outcome": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "Success": {"$ref": "#/$defs/Success"},
                "Failure": {"$ref": "#/$defs/Failure"},
            },
            "additionalProperties": False,
        },
        "Success": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headers", "status", "duration_msec"],
            "oneOf": [{"required": ["content"]}, {"required": ["content_base64"]}],
            "properties": {
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "status": {"type": "integer", "minimum": 100, "maximum": 999},
                "content": {"type": "string"},
                "content_base64": {"type": "string", "contentEncoding": "base64"},
                "duration_msec": _MSEC,
                "header_list": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "prefixItems": [{"type": "string"}, {"type": "string"}],
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
                "content_encoding": {"enum": ["gzip"]},
                "attempts": _ATTEMPTS,
                "timings": _TIMINGS,
                "hedged": _HEDGED,
                "hedge_won": _HEDGE_WON,
                "id": {"type": "string"},
            },
        },
        "Failure": {
            "type": "object",
            "additionalProperties": False,
            "required": ["error", "kind", "duration_msec"],
            "properties": {
                "error": {"type": "string", "minLength": 1},
                "kind": {"enum": list(KINDS)},
                "duration_msec": _MSEC,
                "attempts": _ATTEMPTS,
                "timings": _TIMINGS,
                "hedged": _HEDGED,
                "hedge_won": _HEDGE_WON,
                "id": {"type": "string"},
            },
        },
        "StreamLine": {
            "type": "object",
            "required": ["index"],
            "minProperties": 2,
            "maxProperties": 3,
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "id": {"type": "string"},
                "Success": {"$ref": "#/$defs/Success"},
                "Failure": {"$ref": "#/$defs/Failure"},
            },
            "oneOf": [{"required": ["Success"]}, {"required": ["Failure"]}],
            "additionalProperties": False,
        },
        "Summary": {
            "type": "object",
            "additionalProperties": False,
            "required": ["summary"],
            "properties": {
                "summary": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["size", "succeeded", "failed", "timed_out", "duration_msec"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "succeeded": {"type": "integer", "minimum": 0},
                        "failed": {"type": "integer", "minimum": 0},
                        "timed_out": {"type": "integer", "minimum": 0},
                        "duration_msec": _MSEC,
                    },
                }
            },
        },
        "Error": {
            "type": "object",
            "additionalProperties": False,
            "required": ["error"],
            "properties": {"error": {"type": "string", "minLength": 1}},
        },
    },
}

#: The schema as served.
SCHEMA_BYTES = encode(SCHEMA)
