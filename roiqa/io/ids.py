"""Stable image identifiers derived from URIs (never from row order)."""

from __future__ import annotations

import hashlib

import numpy as np


def image_id(uri: str) -> int:
    """A positive int64 id from the URI: the first 8 bytes of BLAKE2b, top bit cleared (faiss ids are signed)."""
    digest = hashlib.blake2b(uri.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def image_ids(uris: list[str] | np.ndarray) -> np.ndarray:
    """`image_id` of each URI, as an int64 array."""
    return np.fromiter((image_id(str(u)) for u in uris), dtype=np.int64, count=len(uris))
