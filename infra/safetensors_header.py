"""Read safetensors files without torch: header parsing and a finite-values check.

Validation runs in `infra/`, which stays free of torch; the format is simple enough to read
directly (8-byte little-endian header length, a JSON header, then raw little-endian tensors).
Nothing here ever unpickles anything.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

# Header length above this is not a real safetensors file (the reference reader caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # reinterpreted as float32 below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class SafetensorsFormatError(ValueError):
    """The bytes are not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def parse_header(data: bytes) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Return (tensors by name, metadata, offset of the data section) or raise SafetensorsFormatError."""
    if len(data) < 8:
        raise SafetensorsFormatError("file is shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len == 0 or header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise SafetensorsFormatError("invalid safetensors header length (is this a pickle or another format?)")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        try:
            dtype, shape, (start, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"tensor {name!r}: malformed header entry") from None
        if dtype not in _DTYPES:
            raise SafetensorsFormatError(f"tensor {name!r}: unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if not (0 <= start <= end and base + end <= len(data) and end - start == expected):
            raise SafetensorsFormatError(f"tensor {name!r}: data offsets do not match its shape or the file size")
        tensors[name] = TensorInfo(name, dtype, shape, base + start, base + end)
    return tensors, metadata, base


def tensor_array(data: bytes, info: TensorInfo) -> np.ndarray:
    """One tensor as a numpy array (BF16 widened to float32), without copying where possible."""
    raw = np.frombuffer(data, dtype=_DTYPES[info.dtype], count=(info.end - info.start) // _DTYPES[info.dtype].itemsize,
                        offset=info.start)
    if info.dtype == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.reshape(info.shape)


def non_finite_tensors(data: bytes, tensors: dict[str, TensorInfo]) -> list[str]:
    """Names of floating-point tensors that hold NaN or Inf."""
    bad = []
    for name, info in tensors.items():
        if info.dtype in FLOAT_DTYPES and not np.isfinite(tensor_array(data, info)).all():
            bad.append(name)
    return bad
