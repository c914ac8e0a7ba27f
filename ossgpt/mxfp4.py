"""MXFP4 (OCP Microscaling, FP4 E2M1 elements with E8M0 block scales), as gpt-oss stores its
expert weights.

A weight row of K input features is stored as K/32 blocks: `blocks` uint8 [..., K/32, 16] holds
32 E2M1 values per block, two per byte, low nibble first (the even element); `scales` uint8
[..., K/32] holds one shared exponent per block, value = fp4 * 2**(scale - 127).
"""

from __future__ import annotations

import torch

# E2M1 by nibble 0..15; bit 3 is the sign.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 2): the two E2M1 values (low nibble, high nibble) of every byte."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    b = torch.arange(256, device=device)
    return torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1)


def _scale_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256,): 2**(s - 127) for every E8M0 byte, exact in float32 and bfloat16 (2**-127 is a
    subnormal in both, 2**127 the largest power of two); 0xFF is NaN per the OCP MX spec."""
    t = torch.ldexp(torch.ones(256, dtype=torch.float64, device=device),
                    torch.arange(256, device=device) - 127).to(dtype)
    t[255] = float("nan")
    return t


_TABLES: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if (device, dtype) not in _TABLES:
        _TABLES[device, dtype] = (_byte_table(device, dtype), _scale_table(device, dtype))
    return _TABLES[device, dtype]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> dtype [..., G * 32].

    Exact: every E2M1 value times a power of two is representable in float32 and bf16 unless it
    overflows (then ±inf, as float64 → float32 rounding gives). So bf16 is computed in bf16
    (half float32's transient memory: a GPU dequantizes routed experts on the fly); other
    dtypes, whose range is narrower, through float32."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, "
                         f"scales {tuple(scales.shape)}")
    work = dtype if dtype == torch.bfloat16 else torch.float32
    byte_table, scale_table = _tables(blocks.device, work)
    values = byte_table[blocks.long()]                        # (..., G, 16, 2) low nibble first
    values = values.flatten(-2) * scale_table[scales.long()].unsqueeze(-1)  # (..., G, 32)
    return values.flatten(-2).to(dtype)                       # (..., G * 32)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., K] -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]).

    Each block takes the smallest scale whose range holds its largest magnitude (so values
    round to the nearest E2M1 step and never clip); values already on the MXFP4 grid round-trip
    exactly."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {BLOCK}")
    w = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)     # (..., G, 32)
    amax = w.abs().amax(dim=-1)                                            # (..., G)
    # smallest e with amax <= 6 * 2**e; all-zero blocks get the smallest exponent
    e = torch.ceil(torch.log2(amax.clamp_min(2.0 ** -140) / 6.0))
    e = e.clamp(-127, 127)
    scales = (e + 127).to(torch.uint8)
    scaled = w / torch.ldexp(torch.ones_like(amax), e.int()).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8], device=w.device)
    codes = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # nearest magnitude
    codes = codes | (torch.signbit(scaled).long() << 3)                     # sign bit, -0 kept
    codes = codes.to(torch.uint8).reshape(*codes.shape[:-1], BLOCK // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks.contiguous(), scales.contiguous()


def unpack_nibbles(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16] -> uint8 codes [..., 32] (low nibble first)."""
    return torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 32] -> uint8 [..., 16]; the inverse of `unpack_nibbles`."""
    codes = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return codes[..., 0] | (codes[..., 1] << 4)
