"""The fast CPU kernels (ossgpt/kernels) against the plain PyTorch path they replace: the fused
MXFP4 mixture of experts against MoE.grouped, on odd shapes and whole models; the threaded
dequantizer bit for bit against mxfp4.dequantize."""

from __future__ import annotations

import dataclasses
import pytest
import torch
import torch.nn.functional as F

import ossgpt
from ossgpt import kernels, model, mxfp4, packed_bf16
from ossgpt.model import MoE

def _random_moe(config, dtype: torch.dtype, seed: int = 0) -> MoE:
    g = torch.Generator().manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if p.dtype == torch.uint8 and name.endswith("blocks"):
                p.copy_(torch.randint(0, 256, p.shape, generator=g, dtype=torch.uint8))
            elif p.dtype == torch.uint8:   # scales near 2**-4, as trained weights have
                p.copy_(torch.randint(121, 126, p.shape, generator=g, dtype=torch.uint8))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return moe.to(dtype)


@pytest.fixture(scope="module")
def odd_config(tiny_config):
    # 3 blocks per hidden row and 5 per intermediate row (odd: the bf16 kernel's tail path),
    # 5 experts with 3 routed, and row counts that are not multiples of the 4-row tiles.
    return dataclasses.replace(tiny_config, hidden_size=96, intermediate_size=160, num_experts=5,
                               experts_per_token=3)


def _routed(moe: MoE, x: torch.Tensor):
    t = moe.norm(x)
    top = torch.topk(moe.router(t), moe.k, dim=-1, sorted=True)
    return t, top.indices, torch.softmax(top.values.float(), dim=-1)


@pytest.mark.parametrize("tokens", [1, 3, 9, 40])
@torch.inference_mode()
def test_fused_moe_matches_plain_float32(isa, odd_config, tokens):
    moe = _random_moe(odd_config, torch.float32)
    x = torch.randn(tokens, odd_config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    t, idx, gates = _routed(moe, x)
    fused = kernels.moe(t, idx, gates, moe.experts, moe.limit)
    plain = moe.grouped(t, idx, gates)
    assert fused is not None and fused.dtype == torch.float32
    assert (fused - plain).abs().max() <= 1e-5 * plain.abs().max()


@pytest.mark.parametrize("tokens", [1, 6, 40, 100])
@torch.inference_mode()
def test_fused_moe_bf16_within_the_plain_paths_error(isa, odd_config, tokens):
    """bf16: the fused kernel's products are exact and its sums float32 (with 9-bit inputs on avx2
    and avx512), so its error against the float32 model is about the plain bf16 path's (its own
    bf16 band). 1 and 6 tokens take the in-register path, 40 and 100 (8 and 20 per expert) the
    dequantized panels."""
    f32 = _random_moe(odd_config, torch.float32)
    bf16 = _random_moe(odd_config, torch.bfloat16)
    x = torch.randn(tokens, odd_config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    t, idx, gates = _routed(bf16, x.bfloat16())
    truth = f32.grouped(t.float(), idx, gates)
    fused = kernels.moe(t, idx, gates, bf16.experts, bf16.limit)
    plain = bf16.grouped(t, idx, gates)
    err_fused = ((fused - truth).norm() / truth.norm()).item()
    err_plain = ((plain - truth).norm() / truth.norm()).item()
    # 9-bit inputs (avx2, avx512) add their rounding, 2**-9 of a block's largest, about what bf16's
    # own adds (measured 1.4-1.7x the plain path's error on this layer); the band that matters is
    # the whole model's (test_model_logits_fused_equal_plain, benchmarks/isa_logits.py)
    allowed = 2.0 if kernels.expert_decode_inputs(torch.bfloat16) == "int9" else 1.0
    assert err_fused <= allowed * max(err_plain, 1e-3), (err_fused, err_plain)


def _int9_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (float32) as the x86 kernels' 9-bit integers hold it (mxfp4_bytes.h, quantize_block):
    each block of 32 rounded to a multiple of d = max |x| / 255."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 255
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)) * d, 0.0)
    return q.reshape(x.shape)


@pytest.mark.parametrize("tokens", [1, 6, 100])
@pytest.mark.parametrize("blocks", [(3, 5), (19, 10)])
@torch.inference_mode()
def test_fused_moe_int9_inputs_equal_their_reference(isa, odd_config, tokens, blocks):
    """Where a bf16 model's experts take 9-bit inputs (avx2 and avx512: decode's byte products,
    and prefill's integer GEMM, gemm_i16.h), the kernel equals the plain float64 product of the
    same integers: the inputs of both products quantized per block, the weights exact, every sum
    exact or float32. 1 token: decode's byte products; 6: the same with several tokens an expert;
    100 (20 per expert): prefill's panels. Blocks a row (hidden, intermediate): (19, 10) takes the
    decode products' groups of 8 blocks, then a pair and a lone block, or one pair."""
    if kernels.expert_decode_inputs(torch.bfloat16) != "int9":
        pytest.skip(f"{isa} gives a bf16 model's experts exact inputs (or NEON's 16-bit integers)")
    assert kernels.expert_prefill_inputs(torch.bfloat16) == "int9"
    config = dataclasses.replace(odd_config, hidden_size=32 * blocks[0], intermediate_size=32 * blocks[1])
    moe = _random_moe(config, torch.bfloat16)
    x = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    t, idx, gates = _routed(moe, x.bfloat16())
    fused = kernels.moe(t, idx, gates, moe.experts, moe.limit)
    truth = _int9_reference(moe, t, idx, gates)
    err = ((fused.double() - truth).norm() / truth.norm()).item()
    assert err <= 1e-5, err   # a step is 2**-8 of a block's largest: one flipped rounding shows


def _int9_reference(moe: MoE, t: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The experts in float64 on the 9-bit integers the x86 kernels make of their inputs."""
    truth = torch.zeros(t.shape, dtype=torch.float64)
    for e in idx.unique().tolist():
        token, slot = torch.where(idx == e)
        w1, w2 = (w.double() for w in moe.experts.weights(e, torch.float32))
        h = F.linear(_int9_blocks(t[token].float()).double(), w1, moe.experts.mlp1_bias[e].double())
        h = _int9_blocks(model.swiglu(h.float(), moe.limit)).double()
        y = F.linear(h, w2, moe.experts.mlp2_bias[e].double())
        truth.index_add_(0, token, y * gates[token, slot, None].double())
    return truth


@pytest.mark.parametrize("tokens", [1, 6])
@torch.inference_mode()
def test_fused_moe_int9_rows_with_nan_and_subnormal_scales(isa, odd_config, tokens):
    """The byte products compute a row's scales without checking each group of 8 blocks where the
    row's scales are all normal (mxfp4_bytes.h, normal_scales); a row with a NaN scale (255) or
    subnormal ones (0, 1) still takes the checked path. Output channel 0 of expert 0 has a NaN
    scale: NaN for its tokens, as the plain path gives; channel 1 of every expert has only
    subnormal scales and no bias: tiny, finite and not zero; every other channel as before."""
    if kernels.expert_decode_inputs(torch.bfloat16) != "int9":
        pytest.skip(f"{isa} gives a bf16 model's experts exact inputs (or NEON's 16-bit integers)")
    config = dataclasses.replace(odd_config, hidden_size=32 * 35, intermediate_size=32 * 33)  # >= 32 blocks
    moe = _random_moe(config, torch.bfloat16)
    with torch.no_grad():
        moe.experts.mlp2_scales[0, 0, 7] = 255
        moe.experts.mlp2_scales[:, 1] = torch.tensor([0, 1]).repeat(17)[:33].to(torch.uint8)
        moe.experts.mlp2_bias[:, 1] = 0
    x = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    t, idx, gates = _routed(moe, x.bfloat16())
    fused = kernels.moe(t, idx, gates, moe.experts, moe.limit)
    truth = _int9_reference(moe, t, idx, gates)
    assert torch.equal(fused.isnan(), truth.isnan()) and fused[:, 0].isnan().any() == (idx == 0).any()
    tiny = fused[:, 1]
    assert torch.isfinite(tiny).all() and (tiny != 0).all() and (tiny.abs() < 1e-30).all()
    rest = (fused[:, 2:].double() - truth[:, 2:]).norm() / truth[:, 2:].norm()
    assert rest <= 1e-5, rest


@pytest.mark.parametrize("tokens", [40, 100])
@torch.inference_mode()
def test_fused_moe_prefill_agrees_with_decode(isa, odd_config, tokens):
    """Prefill's panels and decode's in-register products meet the same inputs the same way at
    every level (bf16: exact bf16 products, or the same 9-bit integers; float32: exact float
    products), so a prompt's experts give what its tokens one at a time give, up to float32 sums."""
    for dtype in (torch.float32, torch.bfloat16):
        moe = _random_moe(odd_config, dtype)
        x = torch.randn(tokens, odd_config.hidden_size, generator=torch.Generator().manual_seed(tokens))
        t, idx, gates = _routed(moe, x.to(dtype))
        together = kernels.moe(t, idx, gates, moe.experts, moe.limit)
        alone = torch.cat([kernels.moe(t[n:n + 1], idx[n:n + 1], gates[n:n + 1], moe.experts, moe.limit)
                           for n in range(tokens)])
        # with 9-bit inputs, a SwiGLU output that the two float32 sums put on either side of a
        # rounding boundary moves by one step (2**-8 of its block's largest) between the two
        steps = dtype == torch.bfloat16 and kernels.expert_decode_inputs(dtype) == "int9"
        assert ((together - alone).norm() / alone.norm()).item() <= (2e-4 if steps else 1e-5), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_logits_fused_equal_plain(isa, tiny_original, unequal_prompts, decode_logits, monkeypatch, dtype):
    net = ossgpt.load(tiny_original, dtype=dtype, progress=False)
    prompts = unequal_prompts
    monkeypatch.setattr(model, "USE_KERNELS", True)
    fused = decode_logits(net, prompts)
    monkeypatch.setattr(model, "USE_KERNELS", False)
    plain = decode_logits(net, prompts)
    rel = ((fused - plain).norm() / plain.norm()).item()
    if dtype == torch.float32:
        assert rel <= 1e-5
    else:
        # bf16: within the plain bf16 path's own distance from float32. Judged on the median
        # over rows and steps: on random weights a near-tied router choice can flip in one
        # row (either path), sending that row's logits far from float32.
        truth = decode_logits(ossgpt.load(tiny_original, dtype=torch.float32, progress=False), prompts)

        def median_error(out: torch.Tensor) -> float:
            return ((out - truth).norm(dim=-1) / truth.norm(dim=-1)).median().item()

        assert median_error(fused) <= 1.25 * median_error(plain), (median_error(fused), median_error(plain))


@pytest.mark.parametrize("copies", [1, 2])
def test_decode_layers_in_one_call_equal_their_modules(isa, tiny_original, unequal_prompts, decode_logits,
                                                       monkeypatch, copies):
    """Decode's MoE and attention output in one call each (kernels.moe_layer, .attention_output)
    against the same layers run module by module, which a forward hook forces (ossgpt.inspect's
    hooks must see every call): the same operations, so the same bits, batch of unequal prompts
    past the sliding window included. Twelve sequences (copies=2) are more than the one-call
    layers take on some levels: the modules run for them, and they still decode."""
    prompts = unequal_prompts * copies
    net = ossgpt.load(tiny_original, dtype=torch.bfloat16, progress=False)
    calls = {"moe_layer": 0, "attention_output": 0}
    for name in calls:
        def counted(*args, _f=getattr(kernels, name), _name=name):
            y = _f(*args)
            calls[_name] += y is not None
            return y
        monkeypatch.setattr(kernels, name, counted)
    one_call = decode_logits(net, prompts)
    steps = 6 * len(net.blocks)
    # moe_layer takes at most 8 tokens; attention_output more where o_proj's kernel does
    expected = {"moe_layer": steps if len(prompts) <= 8 else 0,
                "attention_output": steps if len(prompts) <= 8 or kernels.cpu_kernels().many_rows else 0}
    assert calls == expected
    handles = [m.register_forward_hook(lambda *_: None) for b in net.blocks for m in (b.mlp.router, b.attn.o_proj)]
    modules = decode_logits(net, prompts)
    for h in handles:
        h.remove()
    assert calls == expected
    assert torch.equal(one_call, modules)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 40])
@torch.inference_mode()
def test_linear_equals_exact_products_summed_in_float32(isa, rows):
    """The products: bf16 products are exact, so the kernel is x.float() @ w.float().T (summed in
    another order) rounded once to bf16. 37 outputs: not a multiple of any tile. Up to 8 rows at
    every level; more (prefill) where the level has no bf16 products (then oneDNN's emulates
    them), with dense and packed weights."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 128, generator=g).bfloat16()
    w, b = torch.randn(37, 128, generator=g).bfloat16(), torch.randn(37, generator=g).bfloat16()
    truth = x.float() @ w.float().T + b.float()
    for weight in (w, packed_bf16.pack(w)):
        y = kernels.linear(x, weight, b)
        if rows > 8 and not kernels.cpu_kernels().many_rows:
            assert y is None and isa == "avx512bf16"      # oneDNN's bf16 matmul
            continue
        assert y is not None and y.dtype == torch.bfloat16 and y.shape == (rows, 37)
        assert ((y.float() - truth).abs() <= truth.abs() * 2**-8 + 1e-5).all()


@torch.inference_mode()
def test_flash_attention_with_sinks_equals_plain():
    """Prefill attention through PyTorch's flash kernel against model.sdpa_with_sinks, float32:
    two prompts, one left-padded (its padding rows attend nothing), 150 tokens past a 128-token
    window and without one."""
    g = torch.Generator().manual_seed(0)
    B, T, H, K, D = 2, 150, 8, 2, 16
    q, k, v = (torch.randn(B, T, n, D, generator=g) for n in (H, K, K))
    sinks = torch.randn(H, generator=g)
    positions = torch.arange(T).expand(B, T).clone()
    positions[1, :30] = -1
    for window in (128, None):
        mask = model.attention_mask(positions, positions, window)
        fast = kernels.attention(q, k, v, sinks, mask, 0.25)
        plain = model.sdpa_with_sinks(q, k, v, sinks, mask, 0.25)
        assert fast is not None and torch.isfinite(fast).all()
        assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_training_attention_and_its_gradients_equal_plain():
    """Training's attention (gradients wanted: PyTorch's differentiable fused attention, the sink
    as an extra key) against model.sdpa_with_sinks, float32: the output and the gradients of q,
    k, v and the sinks, for two prompts, one left-padded, past a 128-token window and without."""
    g = torch.Generator().manual_seed(0)
    B, T, H, K, D = 2, 150, 8, 2, 16
    positions = torch.arange(T).expand(B, T).clone()
    positions[1, :30] = -1
    upstream = torch.randn(B, T, H, D, generator=g)
    for window in (128, None):
        mask = model.attention_mask(positions, positions, window)
        inputs = [torch.randn(B, T, n, D, generator=g) for n in (H, K, K)] + [torch.randn(H, generator=g)]
        results = []
        for attend in (kernels.attention, model.sdpa_with_sinks):
            leaves = [t.clone().requires_grad_() for t in inputs]
            out = attend(*leaves, mask, 0.25)
            (out * upstream).sum().backward()
            results.append([out.detach()] + [t.grad for t in leaves])
        for fast, plain in zip(*results):
            assert torch.isfinite(fast).all()
            assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()
        assert (results[0][0][1, :30] == 0).all()    # padding rows attend nothing


@pytest.mark.parametrize("D", [64, 16])
@torch.inference_mode()
def test_decode_attention_equals_plain(isa, D):
    """Decode attention (one new token per sequence) in bf16 against model.sdpa_with_sinks on
    the same bf16 inputs in float32: one rounding to bf16 apart. The keys are a cache's strided
    view; one row is left-padded, one has no key to attend (the sink takes all: output 0);
    150 keys, past a 128-token window and without one; 8 and 2 query heads per key head."""
    g = torch.Generator().manual_seed(D)
    B, S, K = 3, 150, 2
    storage = torch.randn(2, B, 256, K, D, generator=g).bfloat16()
    k, v = storage[0, :, :S], storage[1, :, :S]                     # strided, as KVCache gives
    positions = torch.arange(S).expand(B, S).clone()
    positions[1, :40] = -1
    positions[2] = -1
    q_pos = torch.full((B, 1), S)
    for H in (16, 4):
        q = torch.randn(B, 1, H, D, generator=g).bfloat16()
        sinks = torch.randn(H, generator=g)
        for window in (128, None):
            mask = model.attention_mask(q_pos, positions, window)
            fast = kernels.attention(q, k, v, sinks, mask, D**-0.5)
            truth = model.sdpa_with_sinks(q.float(), k.float(), v.float(), sinks, mask, D**-0.5)
            assert fast is not None and fast.dtype == torch.bfloat16 and fast.shape == q.shape
            assert ((fast.float() - truth).abs() <= truth.abs() * 2**-8 + 1e-6).all()
            assert (fast[2] == 0).all()


@pytest.mark.parametrize("batch", [1, 3, 7])
@torch.inference_mode()
def test_attention_inputs_equal_plain_modules(isa, tiny_config, batch):
    """Decode's fused norm, q/k/v products and rotary embedding against the plain modules, bf16:
    the same roundings, so equal but for a rare last-bit flip (a float32 sum in another order
    crossing a bf16 rounding boundary). Head dim 64; 1-4 and 5-8 token rows take two kernels."""
    config = dataclasses.replace(tiny_config, hidden_size=96, head_dim=64)
    g = torch.Generator().manual_seed(batch)
    attn = model.Attention(config, 0).bfloat16()
    for p in attn.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(batch, 1, 96, generator=g).bfloat16()
    positions = torch.randint(0, 5000, (batch, 1), generator=g)
    cos, sin = model.rope_cos_sin(positions, config)
    fused = kernels.attention_inputs(x, attn, cos, sin)
    h = attn.norm(x)
    plain = (model.apply_rope(F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(batch, 1, 4, 64), cos, sin),
             model.apply_rope(F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(batch, 1, 2, 64), cos, sin),
             F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(batch, 1, 2, 64))
    assert fused is not None
    for f, p in zip(fused, plain):
        assert f.shape == p.shape and f.dtype == torch.bfloat16
        close = (f.float() - p.float()).abs() <= p.float().abs() * 2**-7 + 1e-3
        assert close.float().mean() >= 0.99 and ((f.float() - p.float()).abs() <= p.float().abs() * 0.05 + 0.05).all()
    nine = torch.zeros(9, 1, 32)
    assert kernels.attention_inputs(torch.randn(9, 1, 96).bfloat16(), attn, nine, nine) is None  # > 8 rows


def test_dequantize_bf16_bit_exact_for_every_scale(isa):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (256, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 3).contiguous()
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float32, torch.int32)):
        # float32 through the model's _dequantize: the bf16 kernel, widened
        fast = model._dequantize(blocks, scales, dtype) if dtype == torch.float32 else \
            kernels.dequantize_bf16(blocks, scales)
        plain = mxfp4.dequantize(blocks, scales, dtype)
        nan = plain.isnan()
        assert fast.dtype == dtype and torch.equal(fast.isnan(), nan)
        assert torch.equal(fast[~nan].view(bits), plain[~nan].view(bits))


def test_grad_and_wrapped_experts_take_the_plain_path(isa, odd_config):
    moe = _random_moe(odd_config, torch.float32)
    x = torch.randn(4, odd_config.hidden_size, requires_grad=True)
    t, idx, gates = _routed(moe, x)
    assert kernels.moe(t, idx, gates, moe.experts, moe.limit) is None   # gradients wanted
    y = moe(x[None])
    y.sum().backward()
    assert moe.experts.mlp2_bias.grad is not None and x.grad is not None
