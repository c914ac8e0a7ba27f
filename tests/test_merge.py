"""`ossgpt merge` end to end on random checkpoints and nano: exact where the maths says so
(weights (1, 0); an adapter at weight 1 is merge-adapter), loadable by transformers, and one
clear error, with nothing written, for bad configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ossgpt
from ossgpt.train import commands
from ossgpt.checkpoint import write_random
from ossgpt.lora import LoraConfig, add_lora, save_adapter
from ossgpt.merge.driver import REPORT, Merger, run


def load32(path) -> ossgpt.Transformer:
    return ossgpt.load(path, device="cpu", dtype=torch.float32, progress=False)


def logits(model, n: int = 40) -> torch.Tensor:
    tokens = torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def small(tiny_config) -> ossgpt.ModelConfig:
    """The tiny preset with a 4096-token vocabulary: merging its tables is quick, and merges
    never look at token ids."""
    return dataclasses.replace(tiny_config, vocab_size=4096)


def _random(tmp_path_factory, config, name: str, fmt: str, seed: int) -> Path:
    return write_random(tmp_path_factory.mktemp(name), config, fmt=fmt, seed=seed, progress=False)


@pytest.fixture(scope="module")
def model_a(tmp_path_factory, small) -> Path:
    return _random(tmp_path_factory, small, "a", "original", 0)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory, small) -> Path:
    """In the HF layout: merges mix layouts."""
    return _random(tmp_path_factory, small, "b", "hf", 1)


@pytest.fixture(scope="module")
def model_c(tmp_path_factory, small) -> Path:
    return _random(tmp_path_factory, small, "c", "original", 2)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, small) -> Path:
    return _random(tmp_path_factory, dataclasses.replace(small, hidden_size=32, layer_types=None),
                   "narrow", "original", 3)


def test_linear_one_zero_reproduces_the_first_model_exactly(model_a, model_b, tmp_path):
    config = write_config(tmp_path / "linear.yaml", f"""
merge_method: linear
models:
  - model: {model_a}
    parameters: {{weight: 1.0}}
  - model: {model_b}
    parameters: {{weight: 0.0}}
""")
    report = run(config, tmp_path / "out", progress=False)
    assert report["requantization_error_max"] == 0.0      # MXFP4 values re-quantize exactly
    assert torch.equal(logits(load32(tmp_path / "out")), logits(load32(model_a)))


def test_ties_merge_loads_in_transformers_and_ossgpt_alike(model_a, model_b, model_c, tmp_path):
    from transformers import GptOssForCausalLM, Mxfp4Config

    config = write_config(tmp_path / "ties.yaml", f"""
merge_method: ties
base_model: {model_a}
models:
  - model: {model_b}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {model_c}
    parameters: {{weight: 0.3, density: [0.2, 0.8]}}
parameters: {{lambda: 1.0}}
""")
    run(config, tmp_path / "out", layout="hf", progress=False)
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    errors = report["requantization_error"]
    assert set(errors) == {f"blocks.{i}.mlp.experts.mlp{m}_weight" for i in range(4) for m in (1, 2)}
    print(f"\nTIES merge: MXFP4 re-quantization error per tensor {min(errors.values()):.3f}"
          f"-{max(errors.values()):.3f} (relative)")
    assert 0 < max(errors.values()) < 0.2
    ours = logits(load32(tmp_path / "out"))
    assert not torch.allclose(ours, logits(load32(model_a)))
    hf = GptOssForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager", pad_token_id=None,
                                           quantization_config=Mxfp4Config(dequantize=True)).eval()
    tokens = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).logits
    print(f"ossgpt vs transformers on the merged checkpoint: max |difference| "
          f"{(ours - theirs).abs().max().item():.2e} (logits up to {theirs.abs().max().item():.1f})")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lora_adapter_at_weight_one_equals_merge_adapter(tmp_path):
    """nano plus a LoRA fine-tune of it (attention, experts and router), as a task vector at
    weight 1: the same checkpoint, tensor for tensor, as `ossgpt merge-adapter`."""
    net = ossgpt.load("nano", device="cpu", dtype=torch.float32, progress=False)
    lora = LoraConfig(rank=4, alpha=8, targets=("attention", "experts", "router"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in add_lora(net, lora):
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    save_adapter(net, lora, tmp_path / "adapter", base_model="nano")
    config = write_config(tmp_path / "adapter.yaml", f"""
merge_method: task_arithmetic
base_model: nano
models:
  - model: {tmp_path / "adapter"}
    parameters: {{weight: 1.0}}
""")
    run(config, tmp_path / "merged", progress=False)
    commands.merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "reference"), model="nano")
    ours, theirs = tensors(tmp_path / "merged"), tensors(tmp_path / "reference")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert not torch.equal(ours["block.0.attn.qkv.weight"], tensors(ossgpt.nano.bundled_path())["block.0.attn.qkv.weight"])


@pytest.mark.parametrize("method", ["slerp", "dare_ties", "dare_linear"])
def test_slerp_and_dare_run_and_are_reproducible(model_a, model_b, tmp_path, method):
    params = "parameters: {t: [0.2, 0.8]}" if method == "slerp" else "parameters: {lambda: 1.0}"
    model_params = "" if method == "slerp" else "\n    parameters: {weight: 1.0, density: 0.5}"
    config = write_config(tmp_path / "m.yaml", f"""
merge_method: {method}
base_model: {model_a}
models:
  - model: {model_b}{model_params}
{params}
""")
    run(config, tmp_path / "a", progress=False)
    run(config, tmp_path / "b", progress=False)
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.isfinite(logits(load32(tmp_path / "a"))).all()
    if method != "slerp":
        run(config, tmp_path / "c", seed=1, progress=False)
        assert not torch.equal(a["block.0.attn.qkv.weight"], tensors(tmp_path / "c")["block.0.attn.qkv.weight"])


def test_bf16_experts(model_a, model_b, tmp_path):
    config = write_config(tmp_path / "m.yaml", f"""
merge_method: linear
models: [{{model: {model_a}, parameters: {{weight: 1}}}}, {{model: {model_b}, parameters: {{weight: 1}}}}]
""")
    run(config, tmp_path / "out", layout="hf", experts_dtype="bf16", progress=False)
    model = load32(tmp_path / "out")
    assert not model.blocks[0].mlp.experts.packed
    a, b = load32(model_a), load32(model_b)
    want = (a.blocks[1].mlp.experts.weights(2, torch.float32)[0] + b.blocks[1].mlp.experts.weights(2, torch.float32)[0]) / 2
    torch.testing.assert_close(model.blocks[1].mlp.experts.mlp1_weight[2], want.bfloat16().float())


# -- errors: one line naming the problem, nothing written -----------------------------------------

@pytest.mark.parametrize("case", ["shapes", "method", "parameter", "base", "density", "yaml"])
def test_bad_configs_are_one_error_and_write_nothing(case, model_a, narrow, tmp_path, cli_error):
    models = {"shapes": f"[{{model: {model_a}, parameters: {{weight: 1}}}}, {{model: {narrow}, parameters: {{weight: 1}}}}]"}
    text = {
        "shapes": f"merge_method: linear\nmodels: {models['shapes']}\n",
        "method": f"merge_method: frankenmerge\nmodels: [{model_a}]\n",
        "parameter": f"merge_method: ties\nbase_model: {model_a}\nmodels:\n  - model: {narrow}\n    parameters: {{weight: 1}}\n",
        "base": f"merge_method: task_arithmetic\nmodels: [{{model: {model_a}, parameters: {{weight: 1}}}}]\n",
        "density": f"merge_method: dare_linear\nbase_model: {model_a}\nmodels: [{{model: {model_a}}}, {{model: {narrow}, parameters: {{weight: 1, density: 1.5}}}}]\n",
        "yaml": "merge_method: [linear\n",
    }[case]
    config = write_config(tmp_path / "bad.yaml", text)
    out = tmp_path / "out"
    err = cli_error("merge", str(config), "--output", str(out))
    expected = {"shapes": ["different shapes", "hidden_size 32", str(narrow)],
                "method": ["frankenmerge", "linear, task_arithmetic, ties"],
                "parameter": ["missing parameter 'density'", "models[0]"],
                "base": ["needs a base_model"], "density": ["density must be in (0, 1]", "models[1]"],
                "yaml": ["not valid YAML"]}[case]
    assert str(config) in err and all(e in err for e in expected), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_a_failed_merge_leaves_no_checkpoint(model_a, model_b, tmp_path, monkeypatch):
    """Killed or failing half way, the output path does not exist (the partial directory beside
    it, which has no config.json until the end, is removed when Python can)."""
    config = write_config(tmp_path / "m.yaml", f"merge_method: linear\nmodels: [{{model: {model_a}, "
                                               f"parameters: {{weight: 1}}}}, {{model: {model_b}, parameters: {{weight: 1}}}}]\n")
    calls = []
    real = Merger.get

    def failing(self, name):
        calls.append(name)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(Merger, "get", failing)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]


def test_merge_adapter_folds_into_the_base_its_config_names(tiny_original, tmp_path):
    """merge-adapter without --model takes the base the adapter records (an adapter of a model
    other than nano is not folded into nano); one without a recorded base is one clear error."""
    from ossgpt.errors import OssgptError

    net = ossgpt.load(tiny_original, device="cpu", dtype=torch.float32, progress=False)
    lora = LoraConfig(rank=2, alpha=4, targets=("attention",))
    with torch.no_grad():
        for p in add_lora(net, lora):
            p.fill_(0.01)
    save_adapter(net, lora, tmp_path / "adapter", base_model=str(tiny_original))
    commands.merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "default"))
    commands.merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "named"), model=str(tiny_original))
    assert tensors(tmp_path / "default").keys() == tensors(tmp_path / "named").keys()
    assert all(torch.equal(a, b) for a, b in zip(tensors(tmp_path / "default").values(),
                                                 tensors(tmp_path / "named").values()))
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace(str(tiny_original), ""))
    with pytest.raises(OssgptError, match="names no base_model_name_or_path: pass --model"):
        commands.merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "none"))
