"""JSON-RPC 2.0 framing for the local API, pure (no sockets).

One message per line, UTF-8. BLOBs travel as ``{"$blob": "<base64>"}`` both
ways; ``from_wire``/``to_wire`` are the only converters. A malformed line
gives an error response and the connection stays usable; only a line longer
than the maximum breaks the framing (the server answers and closes).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from p2pstore.errors import InvalidParams, InvalidRequest, P2PStoreError, ParseError

#: Default maximum request line, in bytes (config ``max_request_bytes``).
MAX_LINE_BYTES = 1 << 20
#: Maximum line the client accepts from the daemon (results can be large).
MAX_RESPONSE_BYTES = 256 << 20

RequestId = int | str | None


@dataclass(frozen=True, slots=True)
class Request:
    id: RequestId
    method: str
    params: dict[str, Any]

    @property
    def is_notification(self) -> bool:
        return self.id is None


class RequestError(Exception):
    """A request that could not be decoded, with the id to answer (if known)."""

    def __init__(self, id: RequestId, error: P2PStoreError) -> None:
        super().__init__(error.message)
        self.id = id
        self.error = error


def decode_request(line: bytes) -> Request:
    """Parse one line into a Request or raise RequestError."""
    try:
        msg = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: "[[[[..." nested deeper than the parser's stack.
        raise RequestError(None, ParseError(f"not valid JSON: {exc}")) from exc
    if not isinstance(msg, dict):
        raise RequestError(None, InvalidRequest("a request must be a JSON object (batches are not supported)"))
    rid = msg.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
        raise RequestError(None, InvalidRequest("id must be a string, an integer or absent"))
    if msg.get("jsonrpc") != "2.0":
        raise RequestError(rid, InvalidRequest('"jsonrpc" must be "2.0"'))
    method = msg.get("method")
    if not isinstance(method, str) or not method:
        raise RequestError(rid, InvalidRequest('"method" must be a non-empty string'))
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError(rid, InvalidParams('"params" must be an object (named parameters)'))
    extra = set(msg) - {"jsonrpc", "id", "method", "params"}
    if extra:
        raise RequestError(rid, InvalidRequest(f"unknown member(s): {', '.join(sorted(extra))}"))
    return Request(rid, method, params)


def from_wire(value: Any, path: str = "params") -> Any:
    """JSON value -> Python value with bytes for ``{"$blob": ...}``."""
    if isinstance(value, dict):
        if "$blob" in value:
            data = value["$blob"]
            if len(value) != 1 or not isinstance(data, str):
                raise InvalidParams(f"{path}: a blob is {{\"$blob\": \"<base64>\"}}", data={"param": path})
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidParams(f"{path}: invalid base64 in $blob", data={"param": path}) from exc
        return {k: from_wire(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [from_wire(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def to_wire(value: Any) -> Any:
    """Python value -> JSON-safe value (bytes as $blob, non-finite floats as strings)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$blob": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


#: A lone surrogate: what TEXT that is not valid UTF-8 reads as (one per bad byte).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _line(message: dict[str, Any]) -> bytes:
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        # TEXT a store holds that is not valid UTF-8 (read with surrogateescape,
        # store/changes.py TEXT_FACTORY): JSON can't carry it, each bad byte is U+FFFD.
        return _SURROGATE.sub("\ufffd", text).encode() + b"\n"


def encode_result(rid: RequestId, result: Any) -> bytes:
    return _line({"jsonrpc": "2.0", "id": rid, "result": to_wire(result)})


def encode_error(rid: RequestId, error: P2PStoreError) -> bytes:
    return _line({"jsonrpc": "2.0", "id": rid, "error": to_wire(error.to_dict())})


def encode_notification(method: str, params: dict[str, Any]) -> bytes:
    return _line({"jsonrpc": "2.0", "method": method, "params": to_wire(params)})


def encode_request(rid: RequestId, method: str, params: dict[str, Any]) -> bytes:
    return _line({"jsonrpc": "2.0", "id": rid, "method": method, "params": to_wire(params)})
