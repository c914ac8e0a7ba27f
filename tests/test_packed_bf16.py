"""The 12-bit packed bf16 weights (ossgpt/packed_bf16.py): lossless both ways, the threaded
kernels bit for bit against the plain reference, the decode products against the dense ones,
and whole models loaded packed against the same checkpoint loaded plain."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ossgpt
from ossgpt import kernels, model, packed_bf16
from ossgpt.packed_bf16 import PackedLinear, pack, pack_fast, unpack, unpack_fast

def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Normal rows of different scales, with every kind of value the format must list or keep:
    zeros of both signs, subnormals, values far outside a row's window, inf and nan."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    w *= torch.logspace(-3, 3, rows)[torch.randperm(rows, generator=g)][:, None]
    w = w.bfloat16()
    special = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 1e30, -1e-30, float("inf"), float("nan")])
    w[0, :8] = special.bfloat16()
    w[rows - 1, -8:] = special.flip(0).bfloat16()
    w[rows // 2] = torch.logspace(-30, 30, cols).bfloat16()      # a row mostly outside any window
    return w


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("shape", [(37, 64), (5, 128), (300, 2880)])
def test_pack_is_lossless_and_the_kernel_matches_the_reference(isa, shape):
    w = _weight(*shape)
    ref = pack(w)
    fast = pack_fast(w, rows_per_call=16)             # several calls, stitched together
    for name, a, b in zip("sm nib base ptr col val".split(), ref.parts(), fast.parts()):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.view(torch.int32) if name == "val" else a,
                           b.view(torch.int32) if name == "val" else b), name
    assert torch.equal(_bits(unpack(ref)), _bits(w))
    assert torch.equal(_bits(unpack_fast(ref)), _bits(w))
    assert ref.col.numel() >= 0.5 * shape[1]        # the spread row is listed, not lost


def test_normal_rows_pack_to_three_quarters():
    w = (torch.randn(512, 2880, generator=torch.Generator().manual_seed(3)) / math.sqrt(2880)).bfloat16()
    p = pack(w)
    assert p.col.numel() < 1e-3 * w.numel()
    assert 0.75 < p.nbytes / (w.numel() * 2) < 0.76
    assert packed_bf16.worth_it(p)
    spread = torch.logspace(-30, 30, 64 * 64)[torch.randperm(64 * 64, generator=torch.Generator().manual_seed(0))]
    assert not packed_bf16.worth_it(pack(spread.bfloat16().view(64, 64)))


def test_pack_rejects_what_it_cannot_hold(isa):
    with pytest.raises(ValueError, match="multiple of 64 columns"):
        pack(torch.zeros(4, 96, dtype=torch.bfloat16))
    assert pack_fast(torch.zeros(4, 96, dtype=torch.bfloat16)) is None
    assert pack_fast(torch.zeros(4, 64)) is None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(37, 64), (300, 2880)])
@torch.inference_mode()
def test_decode_products_equal_the_dense_ones(isa, rows, shape):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(*shape, generator=g) / math.sqrt(shape[1])).bfloat16()
    w[1, 3] = 1e-12                                   # a listed element that counts
    b = torch.randn(shape[0], generator=g).bfloat16()
    x = torch.randn(rows, shape[1], generator=g).bfloat16()
    dense = kernels.linear(x, w, b)
    packed = kernels.linear(x, pack_fast(w), b)
    exact = (x.double() @ w.double().T + b.double())
    # the same float32 sums but for the listed elements' order: at most one bf16 rounding apart
    assert ((packed.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    assert (packed == dense).float().mean() >= 0.99


@torch.inference_mode()
def test_packed_linear_module(isa):
    w, b = _weight(40, 128), torch.randn(40).bfloat16()
    w = torch.nan_to_num(w, posinf=1.0, neginf=-1.0, nan=0.0)
    lin = model.Linear(128, 40).to(torch.bfloat16)
    lin.weight.copy_(w)
    lin.bias.copy_(b)
    p = PackedLinear(pack_fast(w), lin.bias)
    assert (p.in_features, p.out_features) == (128, 40)
    assert torch.equal(_bits(p.weight), _bits(w))
    state = p.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(_bits(state["weight"]), _bits(w))
    x = torch.randn(2, 40, 128).bfloat16()
    assert torch.equal(p(x[:1, :3]), lin(x[:1, :3]))              # decode: the kernel, same sums
    if kernels.cpu_kernels().many_rows:
        # every row count through the kernel (no bf16 products here for oneDNN): the dense
        # weight's sums, for the 80 rows of a prefill and the 18 of a server's batch
        assert torch.equal(p(x), lin(x)) and torch.equal(p(x[0, :18]), lin(x[0, :18]))
        return
    assert torch.equal(p(x), F.linear(x, w, b))                   # 80 rows: F.linear on the unpacked
    # 18 rows: the kernel in 8-row calls (a server's batch), the same sums as the dense kernel
    dense = torch.cat([kernels.linear(r, w, b) for r in x[0, :18].split(8)])
    assert torch.equal(p(x[0, :18]), dense)


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_loaded_packed_gives_the_plain_models_logits(isa, tiny_original, tiny_hf, tiny_config, unequal_prompts,
                                                     decode_logits, layout):
    directory = tiny_original if layout == "original" else tiny_hf
    plain = ossgpt.load(directory, device="cpu", progress=False)
    packed = ossgpt.load(directory, device="cpu", progress=False, pack_dense=True)
    kinds = [type(m) for m in packed.modules()]
    assert kinds.count(PackedLinear) == 5 * tiny_config.num_hidden_layers + 1   # q k v o router, unembedding
    assert model.Linear not in kinds
    assert all(torch.equal(_bits(packed.state_dict()[k]), _bits(v)) for k, v in plain.state_dict().items()
               if v.dtype == torch.bfloat16)
    # 6 unequal prompts, the longest past the 128 window; prefill through unpacked weights,
    # decode through the packed products (batch 6)
    a, b = decode_logits(packed, unequal_prompts, 4), decode_logits(plain, unequal_prompts, 4)
    assert (a == b).float().mean() >= 0.99
    assert ((a - b).norm() / b.norm()).item() <= 1e-3


def test_pack_linears_on_a_loaded_model(isa, tiny_original, unequal_prompts, decode_logits):
    net = ossgpt.load(tiny_original, device="cpu", progress=False)
    prompts = unequal_prompts[2:4]
    before = decode_logits(net, prompts, steps=2)
    saved = packed_bf16.pack_linears(net)
    assert saved > 0.15 * net.unembedding.weight.numel() * 2       # 9 bytes a row of 64 elements on top
    assert isinstance(net.unembedding, PackedLinear)
    after = decode_logits(net, prompts, steps=2)
    assert (after == before).float().mean() >= 0.99


def test_float32_and_unpacked_loads_stay_plain(isa, tiny_original):
    net = ossgpt.load(tiny_original, device="cpu", dtype=torch.float32, progress=False, pack_dense=True)
    assert not any(isinstance(m, PackedLinear) for m in net.modules())
