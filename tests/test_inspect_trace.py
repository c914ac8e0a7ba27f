"""ossgpt.inspect's Trace against transformers' own recorded outputs (output_hidden_states,
output_router_logits, output_attentions with eager attention), in float32, on a random
checkpoint with gpt-oss-20b's widths (hidden 2880, 64 query / 8 key-value heads of 64,
intermediate 2880, a 128-token window on the first layer, the second full), 2 layers; 8 experts
(4 active) and a 4096-token vocabulary keep transformers' float32 copy small. Our batch is
left-padded, prompts of unequal lengths past the window; transformers runs each prompt alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from transformers import GptOssForCausalLM, Mxfp4Config

import ossgpt
from ossgpt.checkpoint.save import write_random
from ossgpt.config import ModelConfig
from ossgpt.inspect import InspectError, Trace, run
from ossgpt.inspect.lens import lens_logits, logit_lens

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

LENGTHS = (300, 131, 7)
TOL = 1e-5          # relative to the largest magnitude of the tensor compared


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def wide_config() -> ModelConfig:
    c = ModelConfig.preset("20b")
    return dataclasses.replace(c, num_hidden_layers=2, layer_types=c.layer_types[:2],
                               num_experts=8, vocab_size=4096)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, wide_config):
    return write_random(tmp_path_factory.mktemp("wide") / "hf", wide_config, fmt="hf", seed=5, progress=False)


@pytest.fixture(scope="module")
def ours(wide_checkpoint):
    return ossgpt.load(wide_checkpoint, device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def prompts(wide_config) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, wide_config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def theirs(wide_checkpoint, prompts):
    # pad/eos ids of the real vocabulary do not exist in this small one; nothing here pads.
    hf = GptOssForCausalLM.from_pretrained(wide_checkpoint, dtype=torch.float32, attn_implementation="eager",
                                           pad_token_id=None, eos_token_id=None,
                                           quantization_config=Mxfp4Config(dequantize=True)).eval()
    out = []
    for p in prompts:
        # The attention's output (o_proj's) is not among transformers' outputs: hooked.
        attn_out = []
        hooks = [layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: attn_out.append(o))
                 for layer in hf.model.layers]
        with torch.no_grad():
            out.append(hf(torch.tensor([p]), output_hidden_states=True, output_router_logits=True,
                          output_attentions=True))
        out[-1].attn_out = attn_out
        for h in hooks:
            h.remove()
    del hf
    return out


@pytest.fixture(scope="module")
def traced(ours, prompts):
    with Trace(ours, record=("embeddings", "residual", "attn_out", "attn_probs", "router", "logits")) as trace:
        logits, positions = run(ours, prompts)
    return trace, logits, positions


def test_trace_equals_transformers(traced, theirs, ours, prompts, wide_config):
    trace, logits, positions = traced
    L, T = wide_config.num_hidden_layers, positions.shape[1]
    worst = {}
    for b, (p, ref) in enumerate(zip(prompts, theirs)):
        n = len(p)
        real = slice(T - n, T)                  # our row b's tokens sit at the end (left padding)
        assert (positions[b, real] == torch.arange(n)).all() and (positions[b, :T - n] < 0).all()
        # transformers: (embeddings, after block 0, ..., final norm of the last block's output).
        checks = {"embeddings": (trace["embeddings"][b, real], ref.hidden_states[0][0])}
        for layer in range(L):
            ours_h = trace["residual", layer][b, real]
            want = ref.hidden_states[layer + 1][0]
            checks[f"residual {layer}"] = (ours.norm(ours_h) if layer == L - 1 else ours_h, want)
            checks[f"router {layer}"] = (trace["router", layer][b, real], ref.router_logits[layer])
            checks[f"attention output {layer}"] = (trace["attn_out", layer][b, real], ref.attn_out[layer][0])
            probs = trace["attn_probs", layer][b, :, real, real]                # (H, n, n)
            checks[f"attention {layer}"] = (probs, ref.attentions[layer][0])
            checks[f"sink {layer}"] = (trace["sink", layer][b, :, real], 1 - ref.attentions[layer][0].sum(-1))
            # Padding keys get nothing.
            assert (trace["attn_probs", layer][b, :, real, :T - n] == 0).all()
        checks["logits"] = (trace["logits"][b, real], ref.logits[0])
        for what, (got, want) in checks.items():
            assert got.shape == want.shape, what
            worst[what] = max(worst.get(what, 0.0), rel(got, want))
    print("\nworst relative error against transformers:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) < TOL, worst


def test_router_choices_and_gates_are_the_models(traced, ours, wide_config):
    trace, _, _ = traced
    for layer in range(wide_config.num_hidden_layers):
        top = torch.topk(trace["router", layer], wide_config.experts_per_token, dim=-1)
        assert torch.equal(trace["experts", layer], top.indices)
        assert torch.allclose(trace["gates", layer], torch.softmax(top.values, -1), atol=1e-6)
        assert torch.allclose(trace["gates", layer].sum(-1), torch.ones(()), atol=1e-5)


def test_lens_at_the_last_layer_is_the_model(traced, ours, prompts, wide_config):
    trace, logits, _ = traced
    last = wide_config.num_hidden_layers - 1
    assert torch.equal(lens_logits(ours, trace["residual", last]), logits)
    lens = logit_lens(ours, prompts, top=3)
    assert lens.top_ids.shape == (2, len(prompts), max(LENGTHS), 3)
    assert torch.equal(lens.top_ids[last], torch.topk(logits, 3, dim=-1).indices)


def test_tracing_changes_nothing_and_leaves_no_hooks(ours, prompts, traced):
    _, traced_logits, _ = traced
    plain, _ = run(ours, prompts)
    assert torch.equal(plain, traced_logits)
    for module in ours.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert getattr(module, "observer", None) is None


def test_calls_append_over_a_prefill_and_decode_steps(ours, prompts):
    from ossgpt.generate import decode_step, prefill
    cache = ours.make_cache()
    with Trace(ours, layers=[1], record=("residual", "router", "sink")) as trace, torch.inference_mode():
        prefill(ours, prompts, cache)
        next_pos = torch.tensor([len(p) for p in prompts])
        for i in range(3):
            decode_step(ours, torch.tensor([1, 2, 3]), next_pos + i, cache)
    assert len(trace.calls("residual", 1)) == 4
    assert trace["residual", 1].shape[:2] == (3, max(LENGTHS) + 3)
    assert trace["sink", 1].shape == (3, 64, max(LENGTHS) + 3)
    assert trace["experts", 1].shape == (3, max(LENGTHS) + 3, 4)


def test_bad_requests_name_what_is_wrong(ours):
    with pytest.raises(InspectError, match="layer 2 does not exist: the model has layers 0..1"):
        Trace(ours, layers=[2])
    with pytest.raises(InspectError, match="cannot record 'hidden'"):
        Trace(ours, record=("hidden",))
    with Trace(ours, layers=[0], record=("router",)) as trace:
        run(ours, [[1, 2, 3]])
    with pytest.raises(InspectError, match="nothing recorded for 'residual' at layer 0"):
        trace["residual", 0]
