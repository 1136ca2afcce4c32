"""The generic ways a file persres reads can be damaged, for table-driven damage tests.

Each function takes a file's good bytes and returns {kind: damaged bytes}: truncated, not UTF-8, not JSON,
a list for an object, wrong types, huge integers, NaN/inf, missing keys. A test writes each variant over
the file, runs every command that reads it, and checks: exit 2, one line naming the file, nothing written,
no traceback.
"""

from __future__ import annotations

import json
import struct
from typing import Any

HUGE_INT = "9" * 5000  # past Python's 4,300-digit int/str conversion limit


def text_damages(good: bytes) -> dict[str, bytes]:
    """Damage any text file: cut in half, not UTF-8, empty."""
    return {
        "truncated": good[: max(1, len(good) // 2)],
        "not utf-8": b"\xff\xfe\x80" + good[3:],
        "empty": b"",
    }


def json_damages(good: bytes) -> dict[str, bytes]:
    """Damage a JSON object file in every generic way, keeping its keys where the kind needs them; an
    object or a list of objects inside is damaged the same ways one level down (``config: wrong types``,
    ``rows[0]: nan and inf``)."""
    data = json.loads(good)
    assert isinstance(data, dict), "json_damages wants a JSON object file"
    damaged = {**text_damages(good), "not json": b"{this is not json", "a list": b"[1, 2, 3]"}
    damaged["a string"] = b'"text"'
    damaged["nested too deeply"] = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError
    if data:
        first = sorted(data)[0]
        damaged["missing keys"] = dumps({k: v for k, v in data.items() if k != first})
        damaged.update(value_damages(data, lambda changed: changed))
    for key, value in sorted(data.items()):
        if isinstance(value, dict) and value:
            damaged.update(value_damages(value, lambda changed, key=key: {**data, key: changed}, f"{key}: "))
        if isinstance(value, list) and value and isinstance(value[0], dict) and value[0]:
            inner = value[0]
            damaged.update(
                value_damages(
                    inner,
                    lambda changed, key=key, value=value: {**data, key: [changed, *value[1:]]},
                    f"{key}[0]: ",
                )
            )
    return damaged


PLACEHOLDER = "\u0000persres-damage\u0000"


def value_damages(values: dict[str, Any], whole: Any, prefix: str = "") -> dict[str, bytes]:
    """Every value of ``values`` replaced at once by another type, a huge integer, NaN or 1e999;
    ``whole(changed)`` puts the changed object back into the file's data."""

    def every(literal: str) -> bytes:
        text = json.dumps(whole({k: PLACEHOLDER for k in values}))
        return text.replace(json.dumps(PLACEHOLDER), literal).encode()

    return {
        f"{prefix}wrong types": dumps(whole({k: wrong_type(v) for k, v in values.items()})),
        f"{prefix}huge integers": every(HUGE_INT),
        f"{prefix}nan and inf": every("NaN"),
        f"{prefix}infinity": every("1e999"),
    }


def wrong_type(value: Any) -> Any:
    """Another JSON type than ``value``'s: a number for a string, a string for a number, and so on."""
    if isinstance(value, bool) or value is None:
        return "yes"
    if isinstance(value, (int, float)):
        return "twelve"
    if isinstance(value, str):
        return 12
    if isinstance(value, list):
        return {"a": 1}
    return [1, 2]


def csv_damages(good: bytes) -> dict[str, bytes]:
    """Damage a CSV file with a header row: text and huge/non-finite numbers in every cell, rows cut."""
    lines = good.decode("utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    width = len(header.split(","))
    damaged = {**text_damages(good), "no header": "\n".join(rows).encode() + b"\n"}
    damaged["short row"] = "\n".join([header, *rows, "1"]).encode() + b"\n"
    for kind, cell in (("text cells", "abc"), ("huge integers", HUGE_INT), ("nan", "nan"), ("inf", "1e999")):
        damaged[kind] = "\n".join([header, *rows, ",".join([cell] * width)]).encode() + b"\n"
    return damaged


def safetensors_damages(good: bytes) -> dict[str, bytes]:
    """Damage a safetensors file: cut, garbage, a header length past the end, a header that is not
    JSON, a header that is a list, and (a file with metadata) metadata values that are huge integers,
    not JSON or lists, or no metadata at all."""
    header, body = split_safetensors(good)
    metadata = dict(header.get("__metadata__") or {})
    damaged = {
        "truncated": good[: len(good) // 2],
        "garbage": b"not a safetensors file at all",
        "header length past the end": struct.pack("<Q", len(good) * 4) + good[8:],
        "header not json": struct.pack("<Q", 8) + b"{nojson}" + body,
        "header a list": rebuilt([1, 2, 3], body),
    }
    if metadata:  # without metadata these would leave a sound file
        for kind, value in (("huge integers", HUGE_INT), ("not json", "{not json"), ("lists", "[1, 2]")):
            damaged[f"metadata {kind}"] = rebuilt(
                {**header, "__metadata__": dict.fromkeys(metadata, value)}, body
            )
        damaged["metadata missing"] = rebuilt({k: v for k, v in header.items() if k != "__metadata__"}, body)
    return damaged


def metadata_damages(good: bytes, integers: tuple[str, ...], objects: tuple[str, ...]) -> dict[str, bytes]:
    """Damage one metadata field of a safetensors file at a time, the others kept: an integer field
    huge, NaN, negative or 1e999; a JSON-object field huge, NaN, a list, not JSON, and inside it every
    value of another type, huge, NaN or 1e999."""
    header, body = split_safetensors(good)
    metadata = dict(header["__metadata__"])

    def with_field(key: str, value: str) -> bytes:
        return rebuilt({**header, "__metadata__": {**metadata, key: value}}, body)

    damaged = {}
    for key in integers:
        for kind, value in (("huge", HUGE_INT), ("nan", "NaN"), ("negative", "-1"), ("infinity", "1e999")):
            damaged[f"{key} {kind}"] = with_field(key, value)
    for key in objects:
        for kind, value in (
            ("huge", HUGE_INT),
            ("nan", "NaN"),
            ("a list", "[1, 2]"),
            ("not json", "{nojson"),
        ):
            damaged[f"{key} {kind}"] = with_field(key, value)
        inner = json.loads(metadata[key])
        for kind, text in value_damages(inner, lambda changed: changed).items():
            damaged[f"{key}: {kind}"] = with_field(key, text.decode())
    return damaged


def split_safetensors(good: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", good[:8])
    return json.loads(good[8 : 8 + length]), good[8 + length :]


def rebuilt(header: Any, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def dumps(data: Any) -> bytes:
    return json.dumps(data).encode()
