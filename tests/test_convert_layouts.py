"""`ossgpt convert --to original|hf`: every tensor keeps its bytes both ways, the converted
checkpoint loads with the same logits, bad input is one error with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ossgpt
from ossgpt.cli import main


def stored(directory: Path) -> dict[str, tuple[str, bytes]]:
    """Every tensor of a checkpoint: name -> (dtype, raw bytes)."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = (str(t.dtype), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def logits(path) -> torch.Tensor:
    model = ossgpt.load(path, device="cpu", dtype=torch.float32, progress=False)
    tokens = torch.randint(0, 201088, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("start,other", [("original", "hf"), ("hf", "original")])
def test_round_trip_is_byte_identical_for_every_tensor(request, tmp_path, start, other):
    source = request.getfixturevalue(f"tiny_{start}")
    main(["convert", str(source), "--to", other, "--output", str(tmp_path / "there")])
    main(["convert", str(tmp_path / "there"), "--to", start, "--output", str(tmp_path / "back")])
    before, after = stored(source), stored(tmp_path / "back")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name] == after[name], name
    assert torch.equal(logits(tmp_path / "there"), logits(source))


def test_nano_to_hf_loads_in_transformers_with_the_same_logits(tmp_path):
    """nano's compact vocabulary becomes the full tables, its float32 norms stay float32."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    main(["convert", "nano", "--to", "hf", "--output", str(tmp_path / "hf")])
    ours = logits(tmp_path / "hf")
    assert torch.equal(ours, logits("nano"))
    hf = GptOssForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager",
                                           quantization_config=Mxfp4Config(dequantize=True)).eval()
    tokens = torch.randint(0, 201088, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():   # float32 rounding: 1e-5 of the logits' scale (measured: 1.3e-6)
        torch.testing.assert_close(hf(tokens).logits, ours, rtol=1e-5,
                                   atol=1e-5 * ours.abs().max().item())


def test_bad_input_is_one_error_and_writes_nothing(tiny_original, tmp_path, cli_error):
    assert "--to must be one of original, hf, gguf" in cli_error(
        "convert", str(tiny_original), "--to", "onnx", "--output", str(tmp_path / "a"))
    assert "no such directory" in cli_error("convert", str(tmp_path / "missing"), "--to", "hf",
                                            "--output", str(tmp_path / "b"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert "already exists" in cli_error("convert", str(tiny_original), "--to", "hf",
                                         "--output", str(tmp_path / "taken"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
