"""ossgpt's Transformer against transformers' GptOssForCausalLM, the oracle.

Both load the same random tiny checkpoint (MXFP4 experts; see conftest.py). transformers on CPU
dequantizes MXFP4 into the parameter dtype; this is exact because every MXFP4 value lies on the
bf16 grid, which `test_transformers_dequantizes_experts_exactly` checks. ossgpt loads both the
original/ and the HF layout of those weights.

Prompts are longer than twice the sliding window (128), so sliding layers really drop keys, and
of different lengths, so the left-padded batch has real padding. transformers runs each prompt on
its own; ossgpt runs them both one by one and as a left-padded batch (negative positions).

Run with `-s` to see the measured errors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_oss import modeling_gpt_oss as hf_gpt_oss

import ossgpt
from ossgpt import ModelConfig, mxfp4
from ossgpt.model import (RMSNorm, apply_rope, attention_mask, rope_cos_sin, sdpa_with_sinks, swiglu,
                          yarn_inv_freq)

PROMPT_LENGTHS = (300, 270)          # both > 2 * sliding_window, and unequal
PAD_ID = 199999                      # <|endoftext|>; its value must not matter
LAYOUTS = ("original", "hf")

transformers.utils.logging.set_verbosity_error()   # "dequantizing MXFP4 on CPU" notices
transformers.utils.logging.disable_progress_bar()


# -- helpers -----------------------------------------------------------------------------------

def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ over all elements (accumulated in float64)."""
    diff = torch.linalg.vector_norm((ours.float() - ref.float()), dtype=torch.float64)
    return (diff / torch.linalg.vector_norm(ref.float(), dtype=torch.float64)).item()


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours − ref| / max |ref|."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def top1(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()


def left_pad(prompts: list[torch.Tensor], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens (B, T) and positions (B, T), -1 on the left padding."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    positions = torch.full((len(prompts), T), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = p
        positions[i, T - len(p):] = torch.arange(len(p))
    return tokens, positions


def ours_logits(model, prompts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """ossgpt's logits on each prompt's tokens: (one prompt at a time, from the padded batch)."""
    with torch.no_grad():
        single = [model(p[None])[0] for p in prompts]
        tokens, positions = left_pad(prompts)
        batch = model(tokens, positions=positions)
    T = tokens.shape[1]
    padded = [batch[i, T - len(p):] for i, p in enumerate(prompts)]
    assert batch.isfinite().all(), "padding rows must stay finite (a NaN would poison attention)"
    return single, padded


def load_hf(directory, dtype: torch.dtype) -> GptOssForCausalLM:
    # dequantize=True: transformers' MXFP4 kernels are Triton kernels from the hub (GPUs only,
    # and since 5.25 it fetches them whenever the `kernels` package is installed)
    model = GptOssForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager",
                                              quantization_config=Mxfp4Config(dequantize=True))
    return model.eval()


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts(tiny_config: ModelConfig) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, tiny_config.vocab_size, (n,), generator=g) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def hf_f32(tiny_hf) -> GptOssForCausalLM:
    return load_hf(tiny_hf, torch.float32)


@pytest.fixture(scope="module")
def hf_bf16(tiny_hf) -> GptOssForCausalLM:
    return load_hf(tiny_hf, torch.bfloat16)


@pytest.fixture(scope="module")
def truth(hf_f32, prompts) -> list[torch.Tensor]:
    """transformers, float32, each prompt on its own: the reference logits."""
    with torch.no_grad():
        return [hf_f32(p[None]).logits[0].float() for p in prompts]


@pytest.fixture(scope="module")
def theirs_bf16(hf_bf16, prompts) -> torch.Tensor:
    """transformers, bf16, each prompt on its own, concatenated."""
    with torch.no_grad():
        return torch.cat([hf_bf16(p[None]).logits[0].float() for p in prompts])


def ckpt(request, layout: str):
    return request.getfixturevalue({"original": "tiny_original", "hf": "tiny_hf"}[layout])


# -- the checkpoint as transformers sees it ----------------------------------------------------

def test_transformers_dequantizes_experts_exactly(tiny_original, hf_f32, hf_bf16):
    """transformers' CPU fallback turns MXFP4 into dense (E, in, out) weights; they must equal
    ossgpt's dequantization exactly, be on the bf16 grid, and be identical in its bf16 model."""
    ours = ossgpt.load(tiny_original, device="cpu", dtype=torch.float32, progress=False)
    for i, block in enumerate(ours.blocks):
        ex = block.mlp.experts
        theirs32 = hf_f32.model.layers[i].mlp.experts
        theirs16 = hf_bf16.model.layers[i].mlp.experts
        for ours_w, name in ((mxfp4.dequantize(ex.mlp1_blocks, ex.mlp1_scales, torch.float32), "gate_up_proj"),
                             (mxfp4.dequantize(ex.mlp2_blocks, ex.mlp2_scales, torch.float32), "down_proj")):
            w32, w16 = getattr(theirs32, name).detach(), getattr(theirs16, name).detach()
            assert w32.dtype == torch.float32 and w16.dtype == torch.bfloat16
            assert torch.equal(w32, ours_w.transpose(-1, -2)), f"layer {i} {name}"
            assert torch.equal(w32, w32.bfloat16().float()), "MXFP4 values must lie on the bf16 grid"
            assert torch.equal(w16.float(), w32)


# -- float32 parity ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_logits_match_transformers(request, layout, prompts, truth):
    model = ossgpt.load(ckpt(request, layout), device="cpu", dtype=torch.float32, progress=False)
    single, padded = ours_logits(model, prompts)
    ref = torch.cat(truth)
    for how, ours in (("one prompt at a time", torch.cat(single)), ("left-padded batch", torch.cat(padded))):
        rel, mrel, agree = rel_err(ours, ref), max_rel_err(ours, ref), top1(ours, ref)
        print(f"\n[float32 {layout}, {how}] rel err {rel:.3e}, max-abs rel err {mrel:.3e}, "
              f"top-1 agreement {agree:.2%} over {ref.shape[0]} positions")
        assert rel <= 1e-4
        assert mrel <= 1e-4
        assert agree == 1.0


def test_padding_token_is_ignored(tiny_original, prompts):
    """Left padding is masked by position, so the pad token's id cannot change real logits."""
    model = ossgpt.load(tiny_original, device="cpu", dtype=torch.float32, progress=False)
    with torch.no_grad():
        outs = []
        for pad in (0, PAD_ID, 12345):
            tokens, positions = left_pad(prompts, pad)
            outs.append(model(tokens, positions=positions))
    T = outs[0].shape[1]
    for other in outs[1:]:
        for i, p in enumerate(prompts):
            torch.testing.assert_close(other[i, T - len(p):], outs[0][i, T - len(p):], rtol=1e-6, atol=1e-6)


# -- bf16: no worse than transformers' own bf16 ------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_error_no_worse_than_transformers(request, layout, prompts, truth, theirs_bf16):
    ref, theirs = torch.cat(truth), theirs_bf16
    model = ossgpt.load(ckpt(request, layout), device="cpu", dtype=torch.bfloat16, progress=False)
    assert model.dtype == torch.bfloat16
    single, padded = ours_logits(model, prompts)
    err_theirs = rel_err(theirs, ref)
    for how, ours in (("one prompt at a time", torch.cat(single)), ("left-padded batch", torch.cat(padded))):
        err_ours = rel_err(ours, ref)
        print(f"\n[bf16 {layout}, {how}] vs transformers-float32: err_ours {err_ours:.4e}, "
              f"err_theirs (transformers-bf16) {err_theirs:.4e}, ratio {err_ours / err_theirs:.3f}; "
              f"top-1 ours {top1(ours, ref):.2%}, theirs {top1(theirs, ref):.2%}")
        assert err_ours <= 1.5 * err_theirs


# -- KV cache: decoding step by step equals the full forward -----------------------------------

KV_RTOL = 1e-5


@pytest.fixture(scope="module")
def f32_model(tiny_original):
    return ossgpt.load(tiny_original, device="cpu", dtype=torch.float32, progress=False)


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """Each position's logits within KV_RTOL (relative, over the vocabulary)."""
    num = torch.linalg.vector_norm(got - want, dim=-1)
    den = torch.linalg.vector_norm(want, dim=-1)
    worst = (num / den).max().item()
    assert worst <= KV_RTOL, f"{what}: worst per-position rel err {worst:.2e}"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), what
    return worst


def test_kv_decode_matches_full_forward(f32_model, tiny_config):
    """Prefill a few tokens, then one token per step to 300 > 2 * window."""
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(0, tiny_config.vocab_size, (1, 300), generator=g)
    with torch.no_grad():
        full = f32_model(seq)[0]
        cache = f32_model.make_cache()
        steps = [f32_model(seq[:, :5], cache)[0]]
        for t in range(5, seq.shape[1]):
            steps.append(f32_model(seq[:, t:t + 1], cache)[0])
    got = torch.cat(steps)
    assert cache.next_position == seq.shape[1]
    worst = assert_rows_close(got, full, "token-by-token decode")
    print(f"\n[kv decode 1x300] worst per-step rel err {worst:.2e}")


@pytest.mark.parametrize("chunks", [(100, 50, 40, 70, 1, 1, 38), (100, 150, 30, 1, 19), (127, 1, 1, 128, 43)],
                         ids=["small-chunks", "chunk-wider-than-window", "at-the-boundary"])
def test_kv_chunked_prefill(f32_model, tiny_config, chunks):
    """Prefill in chunks that straddle the sliding-window boundary (128) and 2x it."""
    assert sum(chunks) == 300
    g = torch.Generator().manual_seed(11)
    seq = torch.randint(0, tiny_config.vocab_size, (1, 300), generator=g)
    with torch.no_grad():
        full = f32_model(seq)[0]
        cache = f32_model.make_cache()
        out, start = [], 0
        for n in chunks:
            out.append(f32_model(seq[:, start:start + n], cache)[0])
            start += n
    worst = assert_rows_close(torch.cat(out), full, f"chunks {chunks}")
    print(f"\n[kv chunked prefill {chunks}] worst rel err {worst:.2e}")
    # sliding layers keep only the window
    for layer, kind in zip(cache.layers, tiny_config.layer_types):
        if kind == "sliding_attention":
            assert layer.k.shape[1] == tiny_config.sliding_window


def test_kv_batch_left_padding(f32_model, tiny_config):
    """Two prompts of unequal length (150, 90), left-padded, prefilled in two chunks (the first
    entirely padding for the short row), then decoded together with per-row positions for 170
    steps, past 2 * window for both rows; each row must equal its own unpadded full forward."""
    g = torch.Generator().manual_seed(13)
    V = tiny_config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (150, 90)]
    follow = torch.randint(0, V, (2, 170), generator=g)          # teacher-forced continuation
    tokens, positions = left_pad(prompts)
    with torch.no_grad():
        cache = f32_model.make_cache()
        pre = [f32_model(tokens[:, :60], cache, positions[:, :60]),
               f32_model(tokens[:, 60:], cache, positions[:, 60:])]
        prefill = torch.cat(pre, dim=1)
        assert prefill.isfinite().all()
        next_pos = positions[:, -1:] + 1
        steps = []
        for t in range(follow.shape[1]):
            steps.append(f32_model(follow[:, t:t + 1], cache, next_pos + t))
        decode = torch.cat(steps, dim=1)                           # (2, 170, V)
        worst = 0.0
        for i, p in enumerate(prompts):
            full = f32_model(torch.cat([p, follow[i]])[None])[0]
            got = torch.cat([prefill[i, tokens.shape[1] - len(p):], decode[i]])
            worst = max(worst, assert_rows_close(got, full, f"row {i} (prompt {len(p)})"))
    print(f"\n[kv left-padded batch 150/90 + 170 steps] worst rel err {worst:.2e}")


# -- the pure functions against transformers' own ----------------------------------------------

ROPE_CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    "20b": ModelConfig.preset("20b"),
    "other-yarn": ModelConfig(head_dim=128, rope_theta=10000.0, rope_scaling_factor=8.0, rope_ntk_beta=16.0,
                              rope_ntk_alpha=2.0, initial_context_length=2048),
}


def hf_config(cfg: ModelConfig) -> GptOssConfig:
    return GptOssConfig(**cfg.to_hf_dict())


@pytest.mark.parametrize("name", ROPE_CONFIGS)
def test_yarn_matches_transformers(name):
    cfg = ROPE_CONFIGS[name]
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config(cfg))
    ours, concentration = yarn_inv_freq(cfg)
    torch.testing.assert_close(ours, inv_freq, rtol=1e-7, atol=0)
    assert concentration == pytest.approx(factor, rel=1e-12)


def test_yarn_from_hf_checkpoint_config(tiny_hf, tiny_config):
    """The config.json that write_random puts in the HF layout gives transformers the same YaRN."""
    hc = transformers.AutoConfig.from_pretrained(tiny_hf)
    inv_freq, factor = ROPE_INIT_FUNCTIONS[hc.rope_parameters["rope_type"]](hc)
    ours, concentration = yarn_inv_freq(tiny_config)
    torch.testing.assert_close(ours, inv_freq, rtol=1e-7, atol=0)
    assert concentration == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("name", ["tiny", "20b"])
def test_rope_cos_sin_and_rotation_match_transformers(name):
    cfg = ROPE_CONFIGS[name]
    g = torch.Generator().manual_seed(3)
    positions = torch.stack([torch.arange(0, 40), torch.randint(0, cfg.context_length, (40,), generator=g)])
    rotary = hf_gpt_oss.GptOssRotaryEmbedding(hf_config(cfg))
    x = torch.randn(2, 40, cfg.num_attention_heads, cfg.head_dim, generator=g)
    cos_t, sin_t = rotary(x, positions)
    cos, sin = rope_cos_sin(positions, cfg)
    torch.testing.assert_close(cos, cos_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, sin_t, rtol=1e-6, atol=1e-6)
    q_t, _ = hf_gpt_oss.apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos_t, sin_t)
    torch.testing.assert_close(apply_rope(x, cos, sin), q_t.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_swiglu_matches_transformers():
    g = torch.Generator().manual_seed(5)
    x = 6 * torch.randn(64, 2 * 48, generator=g)             # plenty of values beyond ±7 (clamps)
    assert (x.abs() > 7).any()
    theirs = hf_gpt_oss.GptOssExperts._apply_gate(SimpleNamespace(limit=7.0, alpha=1.702), x)
    torch.testing.assert_close(swiglu(x, 7.0), theirs, rtol=0, atol=0)


def test_rmsnorm_matches_transformers():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 64, generator=g)
    ours, theirs = RMSNorm(64, 1e-5), hf_gpt_oss.GptOssRMSNorm(64, eps=1e-5)
    w = 1 + 0.1 * torch.randn(64, generator=g)
    with torch.no_grad():
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
        # bf16 activations are normalised in float32 and cast back
        torch.testing.assert_close(ours(x.bfloat16()), theirs(x.bfloat16()), rtol=0, atol=0)


def _sdpa_reference(q, k, v, sinks, mask, scale):
    """Plain loops in float64: softmax over [allowed scores..., sink], sink column dropped."""
    B, T, H, D = q.shape
    K = k.shape[2]
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                kh = h // (H // K)
                allowed = mask[b, t].nonzero().flatten()
                scores = (k[b, allowed, kh].double() @ q[b, t, h].double()) * scale
                logits = torch.cat([scores, sinks[h].double().view(1)])
                p = torch.softmax(logits, dim=0)[:-1]
                out[b, t, h] = p @ v[b, allowed, kh].double()
    return out


def test_sdpa_with_sinks_reference_and_fully_masked_rows():
    g = torch.Generator().manual_seed(8)
    B, T, S, H, K, D = 2, 6, 9, 4, 2, 16
    q, k, v = (torch.randn(B, T, H, D, generator=g), torch.randn(B, S, K, D, generator=g),
               torch.randn(B, S, K, D, generator=g))
    sinks = torch.randn(H, generator=g)
    mask = torch.rand(B, T, S, generator=g) < 0.6
    mask[0, 2] = False                      # fully masked rows: all mass on the sink -> exactly 0
    mask[1, 0] = False
    mask[1, 5] = True
    out = sdpa_with_sinks(q, k, v, sinks, mask, 0.25)
    ref = _sdpa_reference(q, k, v, sinks, mask, 0.25)
    assert out.isfinite().all()
    assert torch.equal(out[0, 2], torch.zeros(H, D)) and torch.equal(out[1, 0], torch.zeros(H, D))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # and transformers' eager attention with sinks, given an additive -inf mask
    module = SimpleNamespace(num_key_value_groups=H // K, sinks=sinks, training=False)
    additive = torch.zeros(B, 1, T, S).masked_fill(~mask[:, None], float("-inf"))
    theirs, _ = hf_gpt_oss.eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2),
                                                   v.transpose(1, 2), additive, scaling=0.25)
    torch.testing.assert_close(out, theirs, rtol=1e-5, atol=1e-6)


def test_attention_mask_semantics():
    """Causal, window counted like transformers' sliding mask (q − k < window), negative
    positions (padding / empty slots) never attended."""
    q_pos = torch.tensor([[-1, 0, 1, 2, 3, 4]])
    k_pos = torch.tensor([[-1, 0, 1, 2, 3, 4]])
    full = attention_mask(q_pos, k_pos, None)[0]
    win = attention_mask(q_pos, k_pos, 2)[0]
    for i, qp in enumerate(q_pos[0].tolist()):
        for j, kp in enumerate(k_pos[0].tolist()):
            assert full[i, j].item() == (kp >= 0 and kp <= qp)
            assert win[i, j].item() == (kp >= 0 and kp <= qp and qp - kp < 2)


def test_mxfp4_dequantize_matches_transformers_layout(tiny_original, tiny_config):
    """transformers' converter returns the (E, in, out) transpose of ossgpt's (E, out, in)."""
    from safetensors import safe_open
    with safe_open(str(tiny_original / "model.safetensors"), framework="pt") as f:
        blocks = f.get_tensor("block.0.mlp.mlp1_weight.blocks")
        scales = f.get_tensor("block.0.mlp.mlp1_weight.scales")
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    ours = mxfp4.dequantize(blocks, scales, torch.float32)
    E, I2, C = tiny_config.num_experts, 2 * tiny_config.intermediate_size, tiny_config.hidden_size
    assert ours.shape == (E, I2, C) and theirs.shape == (E, C, I2)
    assert torch.equal(ours.transpose(1, 2), theirs)



def test_nanos_shared_rows_unembedding_gives_the_full_products_logits():
    """The bundled nano's unused ids share one unembedding row: its logits come from its few
    thousand distinct rows (under 2% of them), gathered; the same as the full table's product,
    in the state dict as ever, and the full product again once the table is written in place
    (merging trained rows)."""
    from ossgpt.model import SharedRowsLinear

    model = ossgpt.load("nano", dtype=torch.float32, progress=False)
    table = model.unembedding
    assert isinstance(table, SharedRowsLinear) and len(table.distinct) * 50 < len(table.weight)
    assert [k for k in model.state_dict() if k.startswith("unembedding")] == ["unembedding.weight"]
    x = torch.randn(3, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = torch.nn.functional.linear(x, table.weight)
        torch.testing.assert_close(table(x), full, rtol=1e-5, atol=1e-5)
        table.weight[7] += 1.0
        assert torch.equal(table(x), torch.nn.functional.linear(x, table.weight))
