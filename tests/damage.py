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
    """Damage a JSON object file in every generic way, keeping its keys where the kind needs them."""
    data = json.loads(good)
    assert isinstance(data, dict), "json_damages wants a JSON object file"
    damaged = {**text_damages(good), "not json": b"{this is not json", "a list": b"[1, 2, 3]"}
    damaged["a string"] = b'"text"'
    if data:
        first = sorted(data)[0]
        damaged["missing keys"] = dumps({k: v for k, v in data.items() if k != first})
        damaged["wrong types"] = dumps({k: wrong_type(v) for k, v in data.items()})
        damaged["huge integers"] = ("{" + ", ".join(f'"{k}": {HUGE_INT}' for k in data) + "}").encode()
        damaged["nan and inf"] = ("{" + ", ".join(f'"{k}": NaN' for k in data) + "}").encode()
        damaged["infinity"] = ("{" + ", ".join(f'"{k}": 1e999' for k in data) + "}").encode()
    return damaged


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
    JSON, a header that is a list, and metadata values that are huge integers."""
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + length])
    body = good[8 + length :]

    def rebuilt(new_header: Any) -> bytes:
        raw = json.dumps(new_header).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + body

    metadata = dict(header.get("__metadata__") or {})
    damaged = {
        "truncated": good[: len(good) // 2],
        "garbage": b"not a safetensors file at all",
        "header length past the end": struct.pack("<Q", len(good) * 4) + good[8:],
        "header not json": struct.pack("<Q", 8) + b"{nojson}" + body,
        "header a list": rebuilt([1, 2, 3]),
        "metadata huge integers": rebuilt({**header, "__metadata__": {k: HUGE_INT for k in metadata}}),
        "metadata not json": rebuilt({**header, "__metadata__": {k: "{not json" for k in metadata}}),
        "metadata lists": rebuilt({**header, "__metadata__": {k: "[1, 2]" for k in metadata}}),
        "metadata missing": rebuilt({k: v for k, v in header.items() if k != "__metadata__"}),
    }
    return damaged


def dumps(data: Any) -> bytes:
    return json.dumps(data).encode()
