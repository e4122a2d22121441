"""Bit packing of b-bit codes into uint32 words, as MLX stores them.

Each row of K codes is one little-endian, least-significant-bit-first bit stream: code j occupies stream bits
[j*b, (j+1)*b), and stream bit i is bit i % 32 of word i // 32. Codes of 3, 5 and 6 bits straddle word
boundaries. Because the stream is little-endian, its bytes are the bytes of the words in memory order, so we
pack and unpack through "packs": the smallest run of codes that fills whole bytes (8 codes of 3 bits = 3 bytes,
4 codes of 6 bits = 3 bytes, 2 codes of 4 bits = 1 byte, ...).
"""

from __future__ import annotations

import math
import sys

import torch

if sys.byteorder != "little":  # the byte view below equals MLX's layout only on little-endian hosts
    raise ImportError("lowbit's packing assumes a little-endian host")


def _pack_geometry(bits: int) -> tuple[int, int]:
    """(codes per pack, bytes per pack) for b-bit codes."""
    pack_bits = math.lcm(8, bits)
    return pack_bits // bits, pack_bits // 8


def packed_words(k: int, bits: int) -> int:
    """Number of uint32 words that hold k codes of `bits` bits (k * bits must be a multiple of 32)."""
    return k * bits // 32


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (..., K) with values in [0, 2**bits) -> uint32 words (..., K * bits / 32)."""
    *lead, k = codes.shape
    if (k * bits) % 32:
        raise ValueError(f"pack_bits: {k} codes of {bits} bits do not fill whole 32-bit words")
    per_pack, pack_bytes = _pack_geometry(bits)
    c = codes.reshape(*lead, k // per_pack, per_pack).to(torch.int64)
    shifts = torch.arange(per_pack, device=codes.device, dtype=torch.int64) * bits
    packs = (c << shifts).sum(-1, keepdim=True)  # each pack as one integer of pack_bytes * 8 bits
    byte_shifts = torch.arange(pack_bytes, device=codes.device, dtype=torch.int64) * 8
    stream = ((packs >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, k * bits // 8)
    return stream.view(torch.uint32)


def unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 words (..., W) -> codes (..., W * 32 / bits) as uint8."""
    *lead, w = words.shape
    per_pack, pack_bytes = _pack_geometry(bits)
    if not words.is_contiguous() or (w == 1 and words.stride(-1) != 1):
        # (torch calls a size-1 last dim contiguous whatever its stride, but a dtype view needs stride 1)
        words = torch.empty(words.shape, dtype=words.dtype, device=words.device).copy_(words)
    if pack_bytes == 1:  # 1/2/4/8 bits: whole codes per byte, shifted out of the bytes themselves (no widening)
        stream = words.view(torch.uint8)
        if per_pack == 1:
            return stream.reshape(*lead, w * 4)
        mask = (1 << bits) - 1
        codes = torch.stack([(stream >> (i * bits)) & mask for i in range(per_pack)], dim=-1)
        return codes.reshape(*lead, w * 32 // bits)
    stream = words.view(torch.uint8).reshape(*lead, w * 4 // pack_bytes, pack_bytes)
    byte_shifts = torch.arange(pack_bytes, device=words.device, dtype=torch.int64) * 8
    packs = (stream.to(torch.int64) << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(per_pack, device=words.device, dtype=packs.dtype) * bits
    codes = (packs >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, w * 32 // bits)
