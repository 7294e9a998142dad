"""JSON-RPC 2.0 framing for the local API, pure (no sockets).

One message per line, UTF-8. BLOBs travel as ``{"$blob": "<base64>"}`` both
ways; ``from_wire``/``to_wire`` are the only converters. A malformed line
gives an error response and the connection stays usable; only a line longer
than the maximum breaks the framing (the server answers and closes).

Invariants:
- A decoded request holds only what the core can take: text that is valid
  Unicode (JSON's ``\\ud800`` escapes can spell lone surrogates, which no
  UTF-8 can carry and SQLite refuses), integers of at most 64 bits (SQLite's
  range), params nested at most ``MAX_PARAMS_DEPTH`` levels (so no recursive
  walk after this one can overflow the stack). Anything else is refused here,
  with the place named, before a handler runs.
- Encoding an answer can't fail: ``encode_error`` always yields a line, so
  every request with an id gets an answer.
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
from p2pstore.schema.sync_schema import SQLITE_INT_MAX, SQLITE_INT_MIN
from p2pstore.protocol.results import MAX_RESULT_BYTES

#: Default maximum request line, in bytes (config ``max_request_bytes``).
MAX_LINE_BYTES = 1 << 20
#: Maximum line the client accepts from the daemon: the largest result
#: (``max_result_bytes`` is at most MAX_RESULT_BYTES) plus room for the
#: envelope and the request's id.
MAX_RESPONSE_BYTES = MAX_RESULT_BYTES + (16 << 20)

#: Deepest nesting of objects and arrays in a request's params, ``params``
#: itself being level 1 (predicates need 16, sync_schema documents a handful).
MAX_PARAMS_DEPTH = 64

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
        msg = json.loads(line, parse_int=_parse_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: "[[[[..." nested deeper than the parser's stack.
        raise RequestError(None, ParseError(f"not valid JSON: {exc}")) from exc
    if not isinstance(msg, dict):
        raise RequestError(None, InvalidRequest("a request must be a JSON object (batches are not supported)"))
    rid = msg.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
        raise RequestError(None, InvalidRequest("id must be a string, an integer or absent"))
    if isinstance(rid, str) and not _is_unicode(rid):
        raise RequestError(None, InvalidRequest("id is not valid Unicode (it holds a lone surrogate such as \\ud800)"))
    for key in msg:
        if not _is_unicode(key):
            raise RequestError(rid, InvalidRequest(f"member name {_show(key)} is not valid Unicode (a lone surrogate)"))
    if msg.get("jsonrpc") != "2.0":
        raise RequestError(rid, InvalidRequest('"jsonrpc" must be "2.0"'))
    method = msg.get("method")
    if not isinstance(method, str) or not method:
        raise RequestError(rid, InvalidRequest('"method" must be a non-empty string'))
    if not _is_unicode(method):
        raise RequestError(rid, InvalidRequest(f'"method" {_show(method)} is not valid Unicode (a lone surrogate)'))
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError(rid, InvalidParams('"params" must be an object (named parameters)'))
    extra = set(msg) - {"jsonrpc", "id", "method", "params"}
    if extra:
        raise RequestError(rid, InvalidRequest(f"unknown member(s): {', '.join(sorted(extra))}"))
    problem = check_values(params)
    if problem is not None:
        raise RequestError(rid, problem)
    return Request(rid, method, params)


class _HugeInt:
    """An integer literal with more digits than Python converts (``sys.get_int_max_str_digits``)."""

    __slots__ = ()


def _parse_int(digits: str) -> int | _HugeInt:
    try:
        return int(digits)
    except ValueError:  # over the digit limit: out of every range this API takes
        return _HugeInt()


def check_values(params: dict[str, Any]) -> InvalidParams | None:
    """The first thing in ``params`` the core can't take, as an error naming its place.

    Iterative, so its own depth is no limit: it finds nesting deeper than
    ``MAX_PARAMS_DEPTH``, lone surrogates in keys and strings, and integers
    outside SQLite's 64 bits, with the same paths ``from_wire`` uses.
    """
    stack: list[tuple[Any, str, int]] = [(params, "params", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return InvalidParams(f"{path}: text is not valid Unicode (a lone surrogate such as \\ud800)",
                                     data={"param": path})
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            continue
        elif isinstance(value, (int, _HugeInt)):
            if isinstance(value, _HugeInt) or not SQLITE_INT_MIN <= value <= SQLITE_INT_MAX:
                return InvalidParams(f"{path}: the integer is outside SQLite's 64-bit range", data={"param": path})
        elif isinstance(value, (dict, list)):
            if depth > MAX_PARAMS_DEPTH:
                return InvalidParams(f"{path}: params are nested deeper than {MAX_PARAMS_DEPTH} levels",
                                     data={"param": path})
            if isinstance(value, dict):
                for key, item in value.items():
                    if not _is_unicode(key):
                        return InvalidParams(f"{path}: member name {_show(key)} is not valid Unicode (a lone surrogate)",
                                             data={"param": path})
                    stack.append((item, f"{path}.{key}", depth + 1))
            else:
                stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
    return None


def _is_unicode(text: str) -> bool:
    """False for text holding a lone surrogate (UTF-8 can't encode it)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(text: str, limit: int = 40) -> str:
    """``text`` for a message: short, with surrogates escaped."""
    shown = ascii(text[:limit])
    return shown + ("..." if len(text) > limit else "")


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
    """The error line for ``rid``; never raises, so every request gets its answer.

    If the error's details can't be encoded (a value JSON has no form for),
    the answer keeps code, name and message; if even that fails (the id
    itself), it goes out with id null, as JSON-RPC does for an unknown id.
    """
    try:
        return _line({"jsonrpc": "2.0", "id": rid, "error": to_wire(error.to_dict())})
    except (TypeError, ValueError, RecursionError):
        pass
    plain = {"code": error.code, "message": str(error.message), "data": {"name": error.name}}
    try:
        return _line({"jsonrpc": "2.0", "id": rid, "error": plain})
    except (TypeError, ValueError, RecursionError):
        return _line({"jsonrpc": "2.0", "id": None, "error": {**plain, "message": ascii(error.message)}})


def encode_notification(method: str, params: dict[str, Any]) -> bytes:
    return _line({"jsonrpc": "2.0", "method": method, "params": to_wire(params)})


def encode_request(rid: RequestId, method: str, params: dict[str, Any]) -> bytes:
    return _line({"jsonrpc": "2.0", "id": rid, "method": method, "params": to_wire(params)})
