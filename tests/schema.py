"""
Every answer of ``POST /multiplex`` that a test receives is checked against
the API's JSON Schema (:mod:`octoplex.schema`), the one the daemon serves.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator

from octoplex.schema import SCHEMA

Draft202012Validator.check_schema(SCHEMA)


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({**SCHEMA, "oneOf": [{"$ref": f"#/$defs/{name}"}]})


_ANSWER = _validator("Answer")
_ERROR = _validator("Error")
_BATCH = _validator("Batch")
_LINE = _validator("StreamLine")
_SUMMARY = _validator("Summary")


def check_answer(status: int, document: Any) -> None:
    """
    Fail unless ``document``, the JSON of a ``/multiplex`` answer with
    ``status``, is what the schema says such an answer is.
    """
    (_ANSWER if status == 200 else _ERROR).validate(document)


def check_batch(document: Any) -> None:
    """Fail unless ``document`` is a batch as the schema describes it."""
    _BATCH.validate(document)


def check_stream(lines: list[Any]) -> None:
    """
    Fail unless ``lines``, a streamed answer's JSON lines, are outcome lines
    and then one summary line, as the schema says.
    """
    assert lines, "no lines"
    *outcomes, last = lines
    for line in outcomes:
        _LINE.validate(line)
    _SUMMARY.validate(last)
