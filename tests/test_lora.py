"""LoRA adapters: exact start from the base, the PEFT format (transformers + peft load it and
agree with ossgpt), save/load round trip, and merging with MXFP4 re-quantization."""

from __future__ import annotations

import json

import pytest
import torch

import ossgpt
from ossgpt.errors import OssgptError
from ossgpt.lora import LoraConfig, add_lora, load_adapter, merge, save_adapter

ALL = ("attention", "experts", "router")


def _randomize(params: list[torch.nn.Parameter], seed: int = 0) -> None:
    """Non-zero B factors, so the adapter changes the output (a fresh one does not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def tokens(tiny_config) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, tiny_config.vocab_size, (2, 150), generator=g)  # > the 128 window


def test_fresh_adapter_starts_at_the_base(tiny_original, tokens) -> None:
    model = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    before = model(tokens)
    params = add_lora(model, LoraConfig(rank=4, targets=ALL))
    assert all(p.requires_grad for p in params) and params
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n
                   and "mlp1_A" not in n and "mlp1_B" not in n and "mlp2_A" not in n
                   and "mlp2_B" not in n)
    assert torch.equal(model(tokens), before)
    model(tokens).sum().backward()
    assert all(p.grad is not None for p in params)


def test_adapter_loads_into_transformers_peft_with_the_same_logits(tiny_original, tiny_hf,
                                                                   tokens, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    params = add_lora(model, LoraConfig(rank=4, alpha=8, targets=ALL))
    _randomize(params)
    save_adapter(model, LoraConfig(rank=4, alpha=8, targets=ALL), tmp_path / "adapter")
    ours = model(tokens)

    hf = GptOssForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32, attn_implementation="eager",
                                           quantization_config=Mxfp4Config(dequantize=True)).eval()
    base_logits = hf(tokens).logits
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(tokens).logits
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    moved = ((base_logits - theirs).norm() / theirs.norm()).item()
    print(f"\nossgpt vs transformers+peft with the adapter: rel err {rel:.2e} "
          f"(the adapter moves the logits by {moved:.2e})")
    assert moved > 1e-2
    assert rel < 1e-5


def test_save_load_round_trip_and_errors(tiny_original, tokens, tmp_path) -> None:
    model = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    cfg = LoraConfig(rank=2, alpha=4, targets=("attention", "experts"))
    _randomize(add_lora(model, cfg), seed=1)
    save_adapter(model, cfg, tmp_path)
    again = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    assert load_adapter(again, tmp_path).targets == cfg.targets
    assert torch.equal(again(tokens), model(tokens))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(OssgptError, match="rank-3"):
        load_adapter(ossgpt.load(tiny_original, dtype=torch.float32, progress=False), tmp_path)


def test_merge_requantizes_experts(tiny_original, tokens) -> None:
    model = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    params = add_lora(model, LoraConfig(rank=4, targets=ALL))
    _randomize(params, seed=2)
    adapted = model(tokens)
    report = merge(model)
    merged = model(tokens)
    assert model.blocks[0].mlp.experts.packed            # still MXFP4
    assert not any(p.requires_grad for p in model.parameters())
    rel = ((merged - adapted).norm() / adapted.norm()).item()
    print(f"\nmerge: requantization error {report['requantization_error']:.3f}, "
          f"logits moved {rel:.3f} by it")
    assert 0 < report["requantization_error"] < 0.2
    assert rel < 0.2
