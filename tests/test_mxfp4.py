"""MXFP4 (OCP Microscaling: FP4 E2M1 elements, E8M0 block scales), exhaustively.

The expectation is defined independently of ossgpt.mxfp4: float64 arithmetic
`2**(scale - 127) * fp4_value`, then rounded to the output dtype (which is exact, or overflows to
±inf). Scale byte 0xFF is NaN per the OCP MX v1.0 spec (E8M0 has no infinity).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from ossgpt import mxfp4

# E2M1 by nibble: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa.
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
DTYPES = [torch.float32, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def e2m1(code: int) -> float:
    """Decode an E2M1 nibble from its bits (a second derivation of the FP4 table)."""
    sign = -1.0 if code & 8 else 1.0
    exp, man = (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else (1 + man * 0.5) * 2.0 ** (exp - 1)
    return math.copysign(mag, sign)


def test_fp4_table():
    assert [e2m1(c) for c in range(16)] == FP4
    assert [math.copysign(1, e2m1(c)) for c in range(16)] == [math.copysign(1, v) for v in FP4]
    assert list(mxfp4.FP4_VALUES) == FP4
    assert [math.copysign(1, v) for v in mxfp4.FP4_VALUES] == [math.copysign(1, v) for v in FP4]


def expected_values(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 reference: blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G*32]."""
    lut = torch.tensor(FP4, dtype=torch.float64)
    b = blocks.long()
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)              # low nibble first
    scale = torch.tensor([2.0 ** (s - 127) for s in range(256)], dtype=torch.float64)[scales.long()]
    vals = lut[codes] * scale.unsqueeze(-1)
    vals[scales == 255] = float("nan")
    return vals.flatten(-2)


def assert_bit_exact(got: torch.Tensor, want64: torch.Tensor) -> None:
    want = want64.to(got.dtype)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN positions differ"
    bits = BITS[got.dtype]
    mismatch = (got.view(bits) != want.view(bits)) & ~nan
    if mismatch.any():
        i = tuple(mismatch.nonzero()[0].tolist())
        raise AssertionError(f"{mismatch.sum().item()} values differ, first at {i}: "
                             f"got {got[i].item()!r}, want {want[i].item()!r}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_every_byte_and_every_scale(dtype):
    """All 256 bytes in every block position x all 256 scale bytes."""
    every_byte = torch.arange(256, dtype=torch.uint8).view(16, 16)          # 16 blocks of 16 bytes
    blocks = every_byte.expand(256, 16, 16).contiguous()                     # [scale, G, 16]
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    got = mxfp4.dequantize(blocks, scales, dtype)
    assert got.dtype == dtype and got.shape == (256, 16 * 32)
    want = expected_values(blocks, scales)
    assert_bit_exact(got, want)
    # corner cases spelled out; got[scale][2*b] is byte b's low nibble, [2*b + 1] its high one
    one = got[127]
    assert one[2 * 0x21].item() == 0.5 and one[2 * 0x21 + 1].item() == 1.0     # low nibble first
    assert one[2 * 0x80 + 1].item() == 0.0 and torch.signbit(one[2 * 0x80 + 1])  # nibble 8 is -0
    assert one[2 * 0xF7].item() == 6.0 and one[2 * 0xF7 + 1].item() == -6.0
    assert got[0][2 * 0x01].item() == 2.0 ** -128                           # subnormal, exact
    assert got[254][2 * 0x02].item() == 2.0 ** 127
    assert got[254][2 * 0x07].item() == math.inf                            # 6 * 2**127 overflows
    assert got[254][2 * 0x0F].item() == -math.inf
    assert got[255].isnan().all()                                           # E8M0 0xFF is NaN


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_random_blocks_batched(dtype):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 7, 5, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (3, 7, 5), generator=g, dtype=torch.uint8)
    got = mxfp4.dequantize(blocks, scales, dtype)
    assert got.shape == (3, 7, 160)
    assert_bit_exact(got, expected_values(blocks, scales))


def test_dequantize_rejects_bad_inputs():
    blocks = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(TypeError):
        mxfp4.dequantize(blocks.to(torch.int8), torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(TypeError):
        mxfp4.dequantize(blocks, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError):
        mxfp4.dequantize(blocks, torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        mxfp4.dequantize(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8))


# -- nibble packing ----------------------------------------------------------------------------

def test_nibbles_round_trip_every_byte():
    b = torch.arange(256, dtype=torch.uint8).view(16, 16)
    codes = mxfp4.unpack_nibbles(b)
    assert codes.shape == (16, 32) and codes.dtype == torch.uint8
    assert torch.equal(codes[:, 0::2], b & 0x0F)         # even element = low nibble
    assert torch.equal(codes[:, 1::2], b >> 4)
    assert torch.equal(mxfp4.pack_nibbles(codes), b)
    # and the other way: every pair of codes
    pairs = torch.cartesian_prod(torch.arange(16), torch.arange(16)).to(torch.uint8).reshape(8, 32, 2)
    flat = pairs.reshape(8, 64)
    assert torch.equal(mxfp4.unpack_nibbles(mxfp4.pack_nibbles(flat)), flat)


# -- quantize ----------------------------------------------------------------------------------

def _blocks_from_codes(codes: torch.Tensor) -> torch.Tensor:
    return mxfp4.pack_nibbles(codes)


# Scales 0..252: a block of scale 253 or 254 holding a 4 or a 6 overflows float32 (4 * 2**126 =
# 2**128) and 255 is NaN, so such blocks cannot be recovered from their values.
FINITE_SCALES = range(0, 253)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_inverts_dequantize_bytes_for_canonical_blocks(dtype):
    """A block is canonical when its largest magnitude is 4 or 6 (code 6 or 7, either sign).

    quantize picks the smallest exponent e with max|x| <= 6 * 2**e. With max = 6 * 2**k that is
    e = k; with max = 4 * 2**k, e = k too (e = k - 1 gives 3 * 2**k < 4 * 2**k). So a canonical
    block gets its own scale back, hence its own codes. A block whose largest magnitude is 3 or
    less is equally well written with scale - 1 and every code doubled (3 -> 6, 0.5 -> 1, ...),
    and quantize prefers that: same values, different bytes (see the next test)."""
    g = torch.Generator().manual_seed(1)
    n = len(FINITE_SCALES) * 8
    codes = torch.randint(0, 16, (n, 32), generator=g, dtype=torch.uint8)
    anchor = torch.randint(0, 32, (n,), generator=g)
    top = torch.randint(6, 8, (n,), generator=g, dtype=torch.uint8) | (
        torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8) << 3)
    codes[torch.arange(n), anchor] = top                  # at least one 4 or 6
    blocks = _blocks_from_codes(codes).view(-1, 1, 16)
    scales = torch.tensor(list(FINITE_SCALES), dtype=torch.uint8).repeat_interleave(8).view(-1, 1)
    w = mxfp4.dequantize(blocks, scales, dtype)
    assert w.isfinite().all()
    b2, s2 = mxfp4.quantize(w)
    assert torch.equal(s2, scales)
    assert torch.equal(b2, blocks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_keeps_values_of_any_block(dtype):
    """Any block (largest code anything from ±0 to ±6, including all-zero blocks and -0) comes
    back with bit-identical values, though not always the same bytes."""
    g = torch.Generator().manual_seed(2)
    n = len(FINITE_SCALES) * 16
    top = torch.randint(0, 8, (n, 1), generator=g)                         # largest magnitude code
    mags = (torch.rand(n, 32, generator=g) * (top + 1)).long().clamp(max=7)
    signs = torch.randint(0, 2, (n, 32), generator=g)
    codes = (mags | (signs << 3)).to(torch.uint8)
    blocks = _blocks_from_codes(codes).view(-1, 1, 16)
    scales = torch.tensor(list(FINITE_SCALES), dtype=torch.uint8).repeat_interleave(16).view(-1, 1)
    w = mxfp4.dequantize(blocks, scales, dtype)
    b2, s2 = mxfp4.quantize(w)
    w2 = mxfp4.dequantize(b2, s2, dtype)
    assert torch.equal(w2.view(BITS[dtype]), w.view(BITS[dtype])), "values (and signs of zero) must survive"
    canonical = (mags.max(dim=1).values >= 6).view(-1, 1)
    assert torch.equal(s2[canonical], scales[canonical])
    assert (s2[~canonical] <= scales[~canonical]).all()


def test_quantize_rounds_to_nearest_without_clipping():
    """Arbitrary floats: the scale is the smallest that holds the block's largest magnitude, and
    every value goes to a nearest point of that scale's grid."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 8 * 32, generator=g) * torch.logspace(-6, 3, 64).view(64, 1)
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (64, 8, 16) and scales.shape == (64, 8)
    q = mxfp4.dequantize(blocks, scales, torch.float32).double()
    wb = w.double().view(64, 8, 32)
    step = torch.tensor([2.0 ** (s - 127) for s in range(256)], dtype=torch.float64)[scales.long()]
    amax = wb.abs().amax(-1)
    assert (amax <= 6 * step).all(), "no clipping"
    assert (amax > 3 * step).all(), "the smallest such scale"
    grid = torch.tensor(FP4, dtype=torch.float64).view(1, 1, 1, 16) * step[..., None, None]
    nearest = (wb[..., None] - grid).abs().min(-1).values
    err = (wb - q.view(64, 8, 32)).abs()
    assert (err <= nearest * (1 + 1e-12) + 1e-300).all()
    assert torch.equal(torch.signbit(q.view(64, 8, 32)), torch.signbit(wb))


def test_quantize_all_zero_block():
    w = torch.zeros(2, 32)
    w[1] = -0.0
    blocks, scales = mxfp4.quantize(w)
    back = mxfp4.dequantize(blocks, scales, torch.float32)
    assert torch.equal(back.view(torch.int32), w.view(torch.int32))


def test_quantize_rejects_ragged_rows():
    with pytest.raises(ValueError):
        mxfp4.quantize(torch.zeros(3, 48))


# -- transformers ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_transformers_convert_moe_packed_tensors(dtype):
    """transformers.integrations.mxfp4.convert_moe_packed_tensors takes the same (E, out, G, 16)
    blocks and returns (E, in, out): the transpose of ossgpt's (E, out, in), ready for x @ W.
    Bit-identical for every finite scale 0..254 (255: ossgpt gives NaN per the spec, transformers
    2**128 = inf, which no real checkpoint contains)."""
    g = torch.Generator().manual_seed(4)
    E, R, G = 255, 6, 3
    blocks = torch.randint(0, 256, (E, R, G, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 255, (E, R, G), generator=g, dtype=torch.uint8)
    scales[:, 0, 0] = torch.arange(255, dtype=torch.uint8)                    # every scale appears
    ours = mxfp4.dequantize(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert theirs.shape == (E, G * 32, R) and ours.shape == (E, R, G * 32)
    o = ours.transpose(1, 2)
    assert torch.equal(o.isnan(), theirs.isnan())
    bits = BITS[dtype]
    assert torch.equal(o.view(bits)[~o.isnan()], theirs.view(bits)[~theirs.isnan()])
