"""The bundled nano model: small, quick to load, and actually trained (held-out accuracy per
task family, greedy)."""

import time

import pytest
import torch

import ossgpt
from ossgpt import nano

# The first 100 held-out prompts of each family (refusal has 50): 100 s alone on a 2-core Zen 1
# (all 200: 334 s in the suite, beside another worker). Every one is measured by
# `ossgpt eval-nano --n 200` (the figures below); on these 100: addition 96%, subtraction 97%,
# capitals 97%, strings 88%, tools 90% (right tool 100%), refusal 100%, small talk 90%.
N_PER_FAMILY = 100


@pytest.fixture(scope="module")
def nano_model():
    t = time.perf_counter()
    model = ossgpt.load("nano", device="cpu", dtype=torch.bfloat16, progress=False)
    print(f"\nnano loaded in {time.perf_counter() - t:.2f} s")
    return model


def test_bundled_checkpoint_is_small_and_real_architecture(nano_model):
    size = sum(f.stat().st_size for f in nano.bundled_path().iterdir())
    print(f"bundled nano: {size / 1e6:.2f} MB")
    assert size <= 15e6
    cfg = nano_model.config
    assert cfg.vocab_size == 201088 and cfg.num_experts >= 4 and cfg.experts_per_token >= 2
    assert cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[1] == "full_attention"
    assert nano_model.blocks[0].mlp.experts.packed          # experts stay MXFP4
    assert cfg.rope_scaling_factor == 32.0                   # YaRN


@pytest.mark.slow
def test_held_out_accuracy(nano_model):
    results = nano.evaluate(nano_model, n_per_family=N_PER_FAMILY, progress=False)
    for family, r in results.items():
        print(f"{family:<12} n={r['n']:<4} accuracy={r['accuracy']:.1%} well-formed={r['well_formed']:.1%}"
              + (f" right tool={r['right_tool']:.1%}" if "right_tool" in r else ""))
    total = sum(r["n"] for r in results.values())
    well_formed = sum(r["well_formed"] * r["n"] for r in results.values()) / total
    assert well_formed >= 0.99
    # Issue 3's targets, measured with `ossgpt eval-nano --n 200` on the committed model (the
    # one that learned the built-in tools): well-formed 99.9%, right tool with JSON arguments
    # 99.4%, capitals 96.9%, addition 98.0%. Here at n=100: 97% and 99%.
    assert results["tools"]["right_tool"] >= 0.95
    assert results["capitals"]["accuracy"] >= 0.95
    assert results["addition"]["accuracy"] >= 0.90
    # Regression floors a few points under the other measured figures (subtraction 97.0%,
    # strings 94.0%, tools with exact arguments 81.5%, refusal 98%, small talk 93.5%; before the
    # built-in tools: 96.0, 93.0, 87.5, 100, 90.0). Here at n=100: 98, 90, 87, 98, 93.
    assert results["subtraction"]["accuracy"] >= 0.90
    assert results["strings"]["accuracy"] >= 0.85
    assert results["tools"]["accuracy"] >= 0.80
    assert results["refusal"]["accuracy"] >= 0.95
    assert results["smalltalk"]["accuracy"] >= 0.80


def test_bundle_writes_the_bundled_file_back_byte_for_byte(nano_model, tmp_path):
    """nano.bundle (how a fine-tuned, merged nano becomes the bundled one) finds the compact
    vocabulary from the full tables: given the bundled model, it writes the same file."""
    nano.bundle(nano_model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == (nano.bundled_path() / "model.safetensors").read_bytes()
