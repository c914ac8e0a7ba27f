"""Interventions on nano, tested for their effect: each changes exactly what it says and nothing
when it should change nothing. The model runs its fast kernels (bf16, dense weights packed), as
`ossgpt chat` and `serve` run it."""

from __future__ import annotations

import pytest
import torch

import ossgpt
from ossgpt.generate import generate
from ossgpt.inspect import (InspectError, SteeringVector, Trace, ablate_experts, difference_of_means,
                            force_experts, patch, run, scale_sinks, steer, steering)
from ossgpt.inspect.steering import parse_spec
from ossgpt.sampling import SamplingParams
from ossgpt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def nano():
    return ossgpt.load("nano", device="cpu", dtype=torch.bfloat16, pack_dense=True, progress=False)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def prompt(tok) -> list[int]:
    return tok.encode("What is the capital of France?")


def greedy(model, prompt: list[int], n: int = 12) -> list[int]:
    return [e.token for e in generate(model, [prompt], max_tokens=n, sampling=SamplingParams(temperature=0))]


def test_ablating_unused_experts_changes_nothing_and_used_ones_change_the_logits(nano, prompt):
    with Trace(nano, record=("router",)) as trace:
        base, _ = run(nano, [prompt])
    E = nano.config.num_experts
    for layer in range(nano.config.num_hidden_layers):
        used = sorted(set(trace["experts", layer].flatten().tolist()))
        unused = [e for e in range(E) if e not in used]
        assert unused, f"a {len(prompt)}-token prompt should leave some of nano's {E} experts idle"
        with ablate_experts(nano, layer, unused):
            same, _ = run(nano, [prompt])
        assert torch.equal(same, base), f"layer {layer}: ablating unused experts changed the logits"
        with ablate_experts(nano, layer, used[:E - nano.config.experts_per_token]):
            with Trace(nano, layers=[layer], record=("router",)) as ablated:
                changed, _ = run(nano, [prompt])
        assert not set(ablated["experts", layer].flatten().tolist()) & set(used[:E - nano.config.experts_per_token])
        assert (changed - base).abs().max() > 1e-2, f"layer {layer}: ablating the routed experts did nothing"


def test_forced_routing_chooses_exactly_those_experts_gated_by_their_own_logits(nano, prompt):
    k = nano.config.experts_per_token
    forced = [5, 2][:k]
    with Trace(nano, layers=[1], record=("router",)) as plain:
        run(nano, [prompt])
    with force_experts(nano, 1, forced), Trace(nano, layers=[1], record=("router",)) as trace:
        run(nano, [prompt])
    assert (trace["experts", 1].sort(-1).values == torch.tensor(sorted(forced))).all()
    own = plain["router", 1][..., sorted(forced)]                  # the unmasked logits of those two
    want = torch.softmax(own, -1).sort(-1).values
    assert torch.allclose(trace["gates", 1].sort(-1).values, want, atol=1e-6)


def test_patching_a_runs_residual_stream_reproduces_its_logits(nano, tok):
    a = tok.encode("The quick brown fox jumps over")
    b = tok.encode("A slow green turtle walks under")
    assert len(a) == len(b)
    with Trace(nano, record=("residual",)) as source:
        want, _ = run(nano, [a])
    other, _ = run(nano, [b])
    assert not torch.equal(other, want)
    # After block 0 the stream carries everything the later blocks see: they reproduce run a.
    with patch(nano, {0: source["residual", 0]}):
        got, _ = run(nano, [b])
    assert torch.equal(got, want)
    with patch(nano, {layer: source["residual", layer] for layer in range(nano.config.num_hidden_layers)}):
        got, _ = run(nano, [b])
    assert torch.equal(got, want)
    with patch(nano, {0: source["residual", 0]}), pytest.raises(InspectError, match="patching layer 0"):
        run(nano, [b + b])


def test_steering_at_scale_zero_changes_nothing_and_large_scales_change_the_output(nano, tok, prompt, tmp_path):
    positive = [tok.encode(t) for t in ("I love this, it is wonderful!", "What a great and happy day.")]
    negative = [tok.encode(t) for t in ("I hate this, it is awful.", "What a terrible and sad day.")]
    vector = difference_of_means(nano, positive, negative, layer=2)
    assert vector.shape == (nano.config.hidden_size,) and vector.norm() > 0
    base_logits, _ = run(nano, [prompt])
    base = greedy(nano, prompt)
    with steer(nano, vector, layer=2, scale=0.0):
        zero_logits, _ = run(nano, [prompt])
        assert greedy(nano, prompt) == base
    assert torch.equal(zero_logits, base_logits)
    with steer(nano, vector, layer=2, scale=8.0):
        assert greedy(nano, prompt) != base
    # Saved, loaded and applied by spec, as `--steer FILE:LAYER:SCALE` does.
    path = tmp_path / "v.safetensors"
    SteeringVector(vector, 2, {"note": "test"}).save(path)
    loaded = SteeringVector.load(path)
    assert torch.equal(loaded.vector, vector) and loaded.layer == 2 and loaded.info == {"note": "test"}
    with steering(nano, [f"{path}::8"]) as steers:
        assert greedy(nano, prompt) != base
    assert [str(s) for s in steers] == ["steering: v.safetensors x 8 after block 2"]
    assert greedy(nano, prompt) == base                 # gone after the context


def test_sinks_scaled_by_one_change_nothing_removed_take_no_mass_and_come_back(nano, prompt):
    before = [b.attn.sinks.detach().clone() for b in nano.blocks]
    base, _ = run(nano, [prompt])
    with scale_sinks(nano, scale=1.0):
        same, _ = run(nano, [prompt])
    assert torch.equal(same, base)
    with scale_sinks(nano, layer=0, heads=[1, 3], scale=0.0), Trace(nano, layers=[0], record=("sink",)) as trace:
        changed, _ = run(nano, [prompt])
        decoded = greedy(nano, prompt, n=4)             # the decode kernel too, with a -inf sink
    assert (trace["sink", 0][:, [1, 3]] == 0).all() and (trace["sink", 0][:, [0, 2]] > 0).all()
    assert not torch.equal(changed, base) and changed.isfinite().all() and len(decoded) == 4
    for block, sinks in zip(nano.blocks, before):
        assert torch.equal(block.attn.sinks, sinks)


def test_bad_interventions_name_what_is_wrong(nano, tmp_path):
    C = nano.config.hidden_size
    with pytest.raises(InspectError, match="layer 9 does not exist"):
        with steer(nano, torch.zeros(C), layer=9):
            pass
    with pytest.raises(InspectError, match=rf"shape \(100,\).*width {C}"):
        with steer(nano, torch.zeros(100), layer=1):
            pass
    with pytest.raises(InspectError, match="expert 8 does not exist: the model has experts 0..7"):
        with ablate_experts(nano, 0, [8]):
            pass
    with pytest.raises(InspectError, match="cannot ablate 7 of 8 experts"):
        with ablate_experts(nano, 0, range(7)):
            pass
    with pytest.raises(InspectError, match="exactly 2 distinct experts"):
        with force_experts(nano, 0, [1]):
            pass
    with pytest.raises(InspectError, match="head 8 does not exist"):
        with scale_sinks(nano, 0, heads=[8]):
            pass
    with pytest.raises(InspectError, match="expected FILE:LAYER:SCALE"):
        parse_spec("v.safetensors:one:2")
    with pytest.raises(InspectError, match="no such steering vector file"):
        SteeringVector.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InspectError, match="junk.safetensors: not a safetensors steering vector"):
        SteeringVector.load(tmp_path / "junk.safetensors")
    assert all(not m._forward_hooks for m in nano.modules())
