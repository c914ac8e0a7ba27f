"""The accelerators' mixture of experts (ossgpt/kernels/grouped_moe.py) against the plain
MoE.grouped it replaces, on the CPU (it is device-agnostic PyTorch): MXFP4 experts pair by pair
(decode) and expert by expert (prefill), dense experts through grouped GEMMs and their
fallback; whole models run through it; dense experts at load. The last test runs on a GPU only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import ossgpt
from ossgpt import kernels, model
from ossgpt.checkpoint import CheckpointError, load
from ossgpt.kernels import grouped_moe
from ossgpt.model import MoE


@pytest.fixture(scope="module")
def odd_config(tiny_config):
    # 5 experts with 3 routed; 3 and 5 blocks a row
    return dataclasses.replace(tiny_config, hidden_size=96, intermediate_size=160, num_experts=5,
                               experts_per_token=3)


def _random_moe(config, dtype: torch.dtype, dense: bool = False, seed: int = 0) -> MoE:
    g = torch.Generator().manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.endswith("blocks"):
                p.copy_(torch.randint(0, 256, p.shape, generator=g, dtype=torch.uint8))
            elif p.dtype == torch.uint8:   # scales near 2**-4, as trained weights have
                p.copy_(torch.randint(121, 126, p.shape, generator=g, dtype=torch.uint8))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    moe = moe.to(dtype)
    if dense:
        moe.experts = moe.experts.dequantized()
    return moe


def _routed(moe: MoE, tokens: int):
    x = torch.randn(tokens, moe.norm.weight.shape[0], generator=torch.Generator().manual_seed(tokens))
    t = moe.norm(x.to(moe.router.weight.dtype))
    top = torch.topk(moe.router(t), moe.k, dim=-1, sorted=True)
    return t, top.indices, torch.softmax(top.values.float(), dim=-1)


# 1, 3 and 10 tokens (3 to 30 pairs) take the MXFP4 pair-by-pair path, 40 the expert-by-expert one
@pytest.mark.parametrize("tokens", [1, 3, 10, 40])
@pytest.mark.parametrize("dense", [False, True])
@torch.inference_mode()
def test_grouped_moe_equals_plain_float32(odd_config, tokens, dense):
    moe = _random_moe(odd_config, torch.float32, dense)
    t, idx, gates = _routed(moe, tokens)
    out = grouped_moe.moe(t, idx, gates, moe.experts, moe.limit)
    plain = moe.grouped(t, idx, gates)
    assert out.dtype == torch.float32 and out.shape == plain.shape
    assert (out - plain).abs().max() <= 1e-5 * plain.abs().max()


@pytest.mark.parametrize("tokens", [1, 10, 40])
@pytest.mark.parametrize("dense", [False, True])
@torch.inference_mode()
def test_grouped_moe_bf16_within_the_plain_paths_error(odd_config, tokens, dense):
    """bf16: no further from the float32 result than the plain bf16 path (its rounding of the
    bias-added products differs: a grouped GEMM rounds before the bias)."""
    f32 = _random_moe(odd_config, torch.float32)
    bf16 = _random_moe(odd_config, torch.bfloat16, dense)
    t, idx, gates = _routed(bf16, tokens)
    truth = f32.grouped(t.float(), idx, gates)
    out = grouped_moe.moe(t, idx, gates, bf16.experts, bf16.limit)
    plain = bf16.grouped(t, idx, gates)
    err = ((out - truth).norm() / truth.norm()).item()
    err_plain = ((plain - truth).norm() / truth.norm()).item()
    assert err <= max(1.5 * err_plain, 1e-3), (err, err_plain)


@torch.inference_mode()
def test_grouped_gemm_fallback_loop(odd_config, monkeypatch):
    """Where torch's grouped GEMM raises (an older torch, a GPU before sm80), a loop over the
    used experts gives the same result; the failure is remembered."""
    moe = _random_moe(odd_config, torch.float32, dense=True)
    t, idx, gates = _routed(moe, 12)
    expected = grouped_moe.moe(t, idx, gates, moe.experts, moe.limit)

    def unsupported(*args, **kwargs):
        raise RuntimeError("grouped gemm is not supported here")

    monkeypatch.setattr(F, "grouped_mm", unsupported)
    monkeypatch.setattr(grouped_moe, "_grouped_mm_fails", set())
    out = grouped_moe.moe(t, idx, gates, moe.experts, moe.limit)
    assert grouped_moe._grouped_mm_fails == {("cpu", torch.float32)}
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_moe_dispatch(odd_config):
    """kernels.moe: packed experts on the CPU take the C++ kernel (None without one), dense ones
    the plain path; wrapped experts and gradients the plain path on every device."""
    packed, dense = _random_moe(odd_config, torch.float32), _random_moe(odd_config, torch.float32, True)
    t, idx, gates = _routed(dense, 4)
    with torch.inference_mode():
        assert kernels.moe(t, idx, gates, dense.experts, dense.limit) is None
        out = kernels.moe(t, idx, gates, packed.experts, packed.limit)
        assert (out is not None) == (kernels.cpu_kernels() is not None)
    wrapped = torch.nn.Module()
    wrapped.packed = True
    assert kernels.moe(t, idx, gates, wrapped, dense.limit) is None


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_model_through_grouped_moe_equals_plain(tiny_original, tiny_config, unequal_prompts, decode_logits,
                                                monkeypatch, experts):
    """A whole float32 model with every MoE layer through grouped_moe, as on a GPU (prefill of 6
    unequal prompts takes the expert-by-expert or grouped GEMM path, decode the pairwise one)."""
    net = ossgpt.load(tiny_original, dtype=torch.float32, progress=False, experts=experts)
    assert net.blocks[0].mlp.experts.packed == (experts == "mxfp4")
    prompts = unequal_prompts
    calls = []

    def through_grouped(x, indices, gates, ex, limit, alpha=1.702):
        calls.append(len(x))
        return grouped_moe.moe(x, indices, gates, ex, limit, alpha)

    monkeypatch.setattr(kernels, "moe", through_grouped)
    grouped = decode_logits(net, prompts)
    monkeypatch.setattr(model, "USE_KERNELS", False)
    plain = decode_logits(net, prompts)
    assert len(calls) == 7 * tiny_config.num_hidden_layers and max(calls) > 100 and min(calls) == 6
    assert ((grouped - plain).norm() / plain.norm()).item() <= 1e-5


def test_dense_experts_at_load(tiny_original, tiny_hf):
    """experts="dense" holds the same values as MXFP4 dequantized (float32: the same logits);
    "auto" keeps MXFP4 on the CPU; anything else is an error that names the choices."""
    tokens = torch.tensor([[1, 200006, 77, 9000, 12]])
    with torch.inference_mode():
        packed = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
        dense = ossgpt.load(tiny_hf, dtype=torch.float32, progress=False, experts="dense")
        assert packed.blocks[0].mlp.experts.packed and not dense.blocks[0].mlp.experts.packed
        e = packed.blocks[1].mlp.experts
        assert torch.equal(dense.blocks[1].mlp.experts.mlp2_weight[3], e.weights(3, torch.float32)[1])
        a, b = packed(tokens), dense(tokens)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    with pytest.raises(CheckpointError, match="mxfp4, dense"):
        load(tiny_original, experts="bf16", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_cuda_model_equals_cpu(tiny_original, unequal_prompts, decode_logits, experts):
    """On a GPU, float32 logits equal the CPU's (TF32 is off by default); bf16 stays within
    twice the CPU bf16 model's distance from float32 (on a GPU the plain attention multiplies
    in bf16, as transformers' eager attention does; the CPU's in float32)."""
    prompts = unequal_prompts
    cpu = decode_logits(ossgpt.load(tiny_original, device="cpu", dtype=torch.float32, progress=False), prompts)
    gpu = decode_logits(ossgpt.load(tiny_original, device="cuda", dtype=torch.float32, progress=False,
                                    experts=experts), prompts)
    assert ((gpu - cpu).norm() / cpu.norm()).item() <= 1e-5
    cpu16 = decode_logits(ossgpt.load(tiny_original, device="cpu", dtype=torch.bfloat16, progress=False), prompts)
    gpu16 = decode_logits(ossgpt.load(tiny_original, device="cuda", dtype=torch.bfloat16, progress=False,
                                      experts=experts), prompts)

    def median_error(out: torch.Tensor) -> float:
        return ((out - cpu).norm(dim=-1) / cpu.norm(dim=-1)).median().item()

    assert median_error(gpu16) <= 2 * median_error(cpu16), (median_error(gpu16), median_error(cpu16))
