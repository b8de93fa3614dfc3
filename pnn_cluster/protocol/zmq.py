"""The device server's wire format (``docs/wire_protocol.md``), shared by the server and its clients.

Every request and reply is a multipart message::

    [routing id]  (added/removed by ROUTER; a DEALER or REQ client never sees it)
    b""           empty delimiter frame (REQ-compatible envelope)
    header        UTF-8 JSON object: {"v": 1, "op": ..., "id": ..., "arrays": [...]}
    array 0..n-1  raw bytes of each array, described in header["arrays"] (dtype, shape)

Arrays are never pickled: a frame is the array's bytes, decoded with
``np.frombuffer`` on the received frame (no copy) and sent from the array's
own memory (``copy=False``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import zmq

__all__ = [
    "ALLOWED_DTYPES", "MAX_ARRAYS", "MAX_HEADER_BYTES", "MAX_NDIM", "OPS", "PROTOCOL_VERSION", "ProtocolError",
    "decode_arrays", "encode_arrays", "load_header", "short_repr",
]

PROTOCOL_VERSION = 1
OPS = ("health", "spec", "set_params", "forward")
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 256
MAX_NDIM = 8
#: dtypes accepted on the wire (numpy ``dtype.str``): little-endian IEEE 754 floats
ALLOWED_DTYPES = {"<f8": np.dtype("<f8"), "<f4": np.dtype("<f4")}


class ProtocolError(ValueError):
    """A message that does not follow the wire protocol; a server answers it with an error of kind ``protocol``."""

    def __init__(self, field: str, problem: str, value: Any = None, allowed: str = "") -> None:
        self.field, self.problem, self.value, self.allowed = field, problem, value, allowed
        msg = f"{field}: {problem}"
        if value is not None:
            msg += f" (got {value})"
        if allowed:
            msg += f"; allowed: {allowed}"
        super().__init__(msg)


def short_repr(v: Any) -> str:
    """``repr`` cut to 80 characters: what an error message quotes of a peer's bad value."""
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_header(frame: Any, max_bytes: int | None = MAX_HEADER_BYTES) -> dict[str, Any]:
    """A header frame as a JSON object; NaN, Infinity and anything but an object are refused."""
    n = len(frame)
    if max_bytes is not None and n > max_bytes:
        raise ProtocolError("header", "too large", f"{n} bytes", f"at most {max_bytes}")
    raw = frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("header", "not a UTF-8 JSON object", short_repr(raw[:40]), f"JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header", "must be a JSON object", type(header).__name__, "{\"v\": 1, \"op\": ...}")
    return header


def encode_arrays(arrays: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """``{field: array}`` -> (descriptors, frames). Frames are the arrays' own buffers where possible."""
    descs, frames = [], []
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.str not in ALLOWED_DTYPES:
            arr = arr.astype("<f8")
        arr = np.ascontiguousarray(arr)
        descs.append({"field": name, "dtype": arr.dtype.str, "shape": list(arr.shape)})
        frames.append(memoryview(arr).cast("B") if arr.size else b"")
    return descs, frames


def decode_arrays(descs: Any, frames: list[Any]) -> dict[str, np.ndarray]:
    """Check descriptors against the frames and view each frame as an array (no copy)."""
    if not isinstance(descs, list):
        raise ProtocolError("arrays", "must be a list", short_repr(descs), "a list of {field, dtype, shape}")
    if len(descs) != len(frames):
        raise ProtocolError("arrays", f"{len(descs)} descriptor(s) for {len(frames)} array frame(s)", None,
                            "one descriptor per frame after the header")
    out: dict[str, np.ndarray] = {}
    for i, (d, frame) in enumerate(zip(descs, frames)):
        where = f"arrays[{i}]"
        if not isinstance(d, dict):
            raise ProtocolError(where, "must be an object", short_repr(d), "{field, dtype, shape}")
        extra = set(d) - {"field", "dtype", "shape"}
        if extra:
            raise ProtocolError(f"{where}.{sorted(extra)[0]}", "unknown key", None, "field, dtype, shape")
        name = d.get("field")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ProtocolError(f"{where}.field", "must be a non-empty string", short_repr(name),
                                "x or params.<name>")
        if name in out:
            raise ProtocolError(f"{where}.field", "duplicate field", short_repr(name), "each field once")
        dtype = d.get("dtype")
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"{where}.dtype", "unsupported dtype", short_repr(dtype),
                                f"one of {list(ALLOWED_DTYPES)}")
        shape = d.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)):
            raise ProtocolError(f"{where}.shape", "must be a list of non-negative integers", short_repr(shape),
                                f"at most {MAX_NDIM} dimensions")
        dt = ALLOWED_DTYPES[dtype]
        nbytes = math.prod(shape) * dt.itemsize
        have = len(frame)
        if nbytes != have:
            raise ProtocolError(f"{where}", f"shape {shape} of {dtype} needs {nbytes} bytes, frame has {have}",
                                None, "frame length = product(shape) * itemsize")
        buf = frame.buffer if isinstance(frame, zmq.Frame) else frame
        arr = np.frombuffer(buf, dtype=dt).reshape(shape) if nbytes else np.empty(shape, dt)
        # libzmq may hand small frames out of a shared receive buffer at any offset
        out[name] = arr if arr.flags.aligned else arr.copy()
    return out
