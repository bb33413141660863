"""What leaves a site: size and SHA-256 of an update, as Flower serializes it. Never the data."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.common import ndarray_to_bytes


@dataclass(frozen=True)
class PayloadDigest:
    bytes: int  # total size of the serialized tensors
    sha256: str  # over the tensors' serializations, in order
    tensors: int


def payload_digest(arrays: Sequence[np.ndarray]) -> PayloadDigest:
    """Digest of the tensors exactly as `ndarrays_to_parameters` serializes them.

    The server can recompute it from the `Parameters` it received (without SecAgg+), and a
    compliance officer can match it against the site's ledger.
    """
    h = hashlib.sha256()
    size = 0
    for a in arrays:
        raw = ndarray_to_bytes(np.asarray(a))
        h.update(raw)
        size += len(raw)
    return PayloadDigest(size, h.hexdigest(), len(arrays))


def received_sha256(tensors: Sequence[bytes]) -> str:
    """The server's SHA-256 of a reply's serialized tensors (`Parameters.tensors`): equal to the
    site's `payload_digest(...).sha256` of the same update."""
    h = hashlib.sha256()
    for raw in tensors:
        h.update(raw)
    return h.hexdigest()
