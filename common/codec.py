"""Wire encodings of a site's adapter delta: fp32 (as is), fp16 or int8 with per-tensor scales.

`federation.update_encoding` picks one. The site encodes the delta after computing (and, with
client-side site-level DP, clipping) it; the server decodes each reply back to float32 before
aggregation (server/strategy/delta.py). The shapes are not sent: the server knows them from its
own global adapter.

Encoded layout (fp16 and int8), two arrays whatever the number of tensors, so that the ~128-byte
header Flower's serialisation adds per array is paid twice, not once per LoRA tensor:

    [codes: 1-D int8 or float16, every tensor flattened and concatenated in adapter order,
     scales: 1-D float32, one per tensor]

    tensor_k = codes[offset_k : offset_k + size_k].astype(float32) * scales[k]

- int8: scale = max|x| / 127, codes = round(x / scale) in [-127, 127]: 4x smaller than fp32.
- fp16: scale = a power of two that puts max|x| near 2**15, so small deltas do not fall into
  float16's subnormal range (below 6e-5, where its relative precision collapses): 2x smaller.

Both keep every tensor's L2 norm at or below the original's (the scale is shrunk when rounding
up would exceed it), so a delta clipped at the site for site-level DP stays within its bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Encoding = Literal["fp32", "fp16", "int8"]
ENCODINGS: tuple[str, ...] = ("fp32", "fp16", "int8")
METRIC_KEY = "update_encoding"  # fit-reply metric naming the encoding of the reply's arrays

_CODE_DTYPE = {"fp16": np.float16, "int8": np.int8}
_INT8_MAX = 127.0
_FP16_TARGET_EXP = 15  # max|x| scaled into [2**14, 2**15]: far from float16's max (65504)


class CodecError(ValueError):
    """An encoded update does not fit the adapter it claims to update."""


def _scale_for(x: np.ndarray, encoding: str) -> float:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0 or not np.isfinite(peak):
        return 1.0 if peak == 0.0 else peak  # non-finite: left to the server's validation
    if encoding == "int8":
        return peak / _INT8_MAX
    return float(2.0 ** (np.ceil(np.log2(peak)) - _FP16_TARGET_EXP))


def _quantize(x: np.ndarray, scale: float, encoding: str) -> np.ndarray:
    y = x / np.float32(scale)
    if encoding == "int8":
        return np.clip(np.rint(y), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return y.astype(np.float16)


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(a, dtype=np.float64))))


def _encode_tensor(x: np.ndarray, encoding: str) -> tuple[np.ndarray, np.float32]:
    flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
    scale = np.float32(_scale_for(flat, encoding))
    codes = _quantize(flat, float(scale), encoding)
    target = _norm(flat)
    # Rounding may push the norm above the original's: shrink the scale until it does not.
    for _ in range(8):
        got = _norm(codes.astype(np.float32) * scale)
        if got <= target or got == 0.0:
            break
        scale = np.nextafter(np.float32(scale * (target / got)), np.float32(0))
    return codes, np.float32(scale)


def encode(arrays: Sequence[np.ndarray], encoding: str) -> list[np.ndarray]:
    """The arrays a site sends for `arrays` (its float32 delta) under `encoding`."""
    if encoding == "fp32":
        return [np.asarray(a, dtype=np.float32) for a in arrays]
    if encoding not in _CODE_DTYPE:
        raise ValueError(f"unknown update encoding {encoding!r}; choose one of {ENCODINGS}")
    parts, scales = [], []
    for a in arrays:
        codes, scale = _encode_tensor(np.asarray(a), encoding)
        parts.append(codes)
        scales.append(scale)
    codes = (np.concatenate(parts) if parts
             else np.zeros(0, dtype=_CODE_DTYPE[encoding]))
    return [codes, np.asarray(scales, dtype=np.float32)]


def decode(arrays: Sequence[np.ndarray], encoding: str,
           shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Float32 tensors of `shapes` from a reply encoded with `encoding`."""
    if encoding == "fp32":
        if len(arrays) != len(shapes):
            raise CodecError(f"update has {len(arrays)} tensors, the adapter {len(shapes)}")
        return [np.asarray(a, dtype=np.float32) for a in arrays]
    if encoding not in _CODE_DTYPE:
        raise CodecError(f"unknown update encoding {encoding!r}; expected one of {ENCODINGS}")
    if len(arrays) != 2:
        raise CodecError(f"a {encoding} update has 2 arrays (codes, scales), got {len(arrays)}")
    codes, scales = np.asarray(arrays[0]), np.asarray(arrays[1], dtype=np.float32)
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    if codes.dtype != _CODE_DTYPE[encoding] or codes.ndim != 1 or codes.size != sum(sizes):
        raise CodecError(
            f"{encoding} update: codes {codes.dtype}[{codes.size}] do not fit the adapter "
            f"({sum(sizes)} values)"
        )
    if scales.shape != (len(shapes),):
        raise CodecError(f"{encoding} update: {scales.size} scales for {len(shapes)} tensors")
    out, offset = [], 0
    for shape, size, scale in zip(shapes, sizes, scales, strict=True):
        chunk = codes[offset : offset + size].astype(np.float32)
        chunk *= scale
        out.append(chunk.reshape(shape))
        offset += size
    return out


def fp32_bytes(arrays: Sequence[np.ndarray]) -> int:
    """Raw float32 size of the tensors (no serialisation header)."""
    return sum(int(np.asarray(a).size) * 4 for a in arrays)
