"""Counter-based random numbers: a pure function of (key, element index), identical on every device.

torch's CPU and CUDA generators produce different streams, so a DARE mask drawn with them would depend on
where a candidate ran. Here each element's uniform number is a 32-bit integer hash (lowbias32) of its index
xor a 32-bit key, computed with int32 arithmetic that wraps the same way on CPU and GPU.
"""

from __future__ import annotations

import hashlib

import torch

# Tensors larger than this are processed in chunks, each with its own derived key (int32 indices).
CHUNK = 1 << 30

_C1 = 0x7FEB352D - (1 << 32) if 0x7FEB352D >= (1 << 31) else 0x7FEB352D
_C2 = 0x846CA68B - (1 << 32)


def derive_key(*parts: object) -> int:
    """A signed 32-bit key from any printable parts (seed, tensor name, source index, chunk)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little", signed=True)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors (logical shifts emulated with masks)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _C2
    x = x ^ ((x >> 16) & 0xFFFF)
    return x


def uniform_from_index(index: torch.Tensor, key: torch.Tensor | int) -> torch.Tensor:
    """Uniform float32 in [0, 1) with 24 bits, one per int32 index."""
    return ((mix32(index ^ key) >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / 16777216.0)


def chunk_keys(key: int, numel: int) -> list[tuple[int, int, int]]:
    """(start, stop, key) for each chunk of a flat tensor; the first chunk keeps the tensor's key."""
    return [
        (start, min(start + CHUNK, numel), key if start == 0 else derive_key(key, start // CHUNK))
        for start in range(0, max(numel, 1), CHUNK)
    ]


def chunks(keys: list[int], numel: int) -> list[tuple[int, int, list[int]]]:
    """(start, stop, each key's chunk key) for every chunk of a flat tensor drawn under several keys."""
    per_key = [chunk_keys(k, numel) for k in keys]
    return [(start, stop, [pk[c][2] for pk in per_key]) for c, (start, stop, _) in enumerate(per_key[0])]


def uniform_table(key: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The flat uniforms the hashed modes draw for a tensor of `numel` elements under `key`, chunk keys
    included: for a fixed key (TIES ties) they can be computed once instead of per candidate."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start, stop, chunk_key in chunk_keys(key, numel):
        index = torch.arange(stop - start, dtype=torch.int32, device=device)
        out[start:stop] = uniform_from_index(index, chunk_key)
    return out
