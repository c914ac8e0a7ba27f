"""Checkpoint loading and saving: errors a user can act on, both layouts, round trips, memory.

Every loading error is a `CheckpointError` whose message is one line naming the file (or the
directory, for a tensor that is in no file) and the tensor or config key at fault.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ossgpt
from ossgpt import ModelConfig, Transformer, mxfp4
from ossgpt.checkpoint import CheckpointError, hugepages, save, write_random

SHARD_GLOB = "model-*-of-*.safetensors"


# -- helpers -----------------------------------------------------------------------------------

def load32(path) -> Transformer:
    return ossgpt.load(path, device="cpu", dtype=torch.float32, progress=False)


def logits(model: Transformer, seed: int = 0, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (2, n), generator=g)
    with torch.no_grad():
        return model(tokens)


def load_error(path) -> str:
    """Load `path`, expect a CheckpointError, return its message (checked to be one line)."""
    with pytest.raises(CheckpointError) as info:
        load32(path)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def weights_file(directory: Path) -> Path:
    """The original layout's model.safetensors, or the HF layout's (only) shard."""
    single = directory / "model.safetensors"
    return single if single.exists() else next(directory.glob(SHARD_GLOB))


def rewrite_tensors(file: Path, mutate) -> None:
    tensors = load_file(file)
    mutate(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(directory: Path, mutate) -> Path:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    mutate(config)
    path.write_text(json.dumps(config))
    return path


def src_dir(request, layout: str) -> Path:
    return request.getfixturevalue({"original": "tiny_original", "hf": "tiny_hf"}[layout])


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result


# -- tensors: missing, extra, mis-shaped, mis-typed --------------------------------------------

NAMES = {   # (layout) -> an expert bias, the fused/split qkv weight, the sinks, an MXFP4 block tensor
    "original": ("block.2.mlp.mlp2_bias", "block.1.attn.qkv.weight", "block.1.attn.sinks",
                 "block.0.mlp.mlp1_weight.blocks", "block.0.mlp.mlp1_weight.scales"),
    "hf": ("model.layers.2.mlp.experts.down_proj_bias", "model.layers.1.self_attn.q_proj.weight",
           "model.layers.1.self_attn.sinks", "model.layers.0.mlp.experts.gate_up_proj_blocks",
           "model.layers.0.mlp.experts.gate_up_proj_scales"),
}


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_missing_tensor(request, tmp_path, layout):
    d = copy_checkpoint(src_dir(request, layout), tmp_path / "ckpt")
    name = NAMES[layout][0]
    rewrite_tensors(weights_file(d), lambda t: t.pop(name))    # (the HF index still lists it)
    message = load_error(d)
    assert str(d) in message and name in message and "missing" in message


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_extra_tensor(request, tmp_path, layout):
    d = copy_checkpoint(src_dir(request, layout), tmp_path / "ckpt")
    name = {"original": "block.0.attn.rogue", "hf": "model.layers.0.self_attn.rogue"}[layout]
    rewrite_tensors(weights_file(d), lambda t: t.__setitem__(name, torch.zeros(3)))
    message = load_error(d)
    assert str(d) in message and name in message and "unexpected" in message


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("which", ["sinks", "qkv-short"])
def test_misshaped_tensor(request, tmp_path, layout, which):
    d = copy_checkpoint(src_dir(request, layout), tmp_path / "ckpt")
    file = weights_file(d)
    name = NAMES[layout][2] if which == "sinks" else NAMES[layout][1]
    rewrite_tensors(file, lambda t: t.__setitem__(name, t[name][:-2].clone()))
    message = load_error(d)
    assert str(file) in message and name in message and "shape" in message


@pytest.mark.parametrize("what", ["weight", "bias"])
def test_fused_qkv_with_extra_rows_is_rejected(tiny_original, tmp_path, what):
    """The original layout's qkv is q, k, v stacked on dim 0; rows beyond q + 2 kv are an error,
    not something to ignore."""
    d = copy_checkpoint(tiny_original, tmp_path / "ckpt")
    name = f"block.1.attn.qkv.{what}"
    rewrite_tensors(d / "model.safetensors", lambda t: t.__setitem__(name, torch.cat([t[name], t[name][:16]])))
    message = load_error(d)
    assert str(d / "model.safetensors") in message and name in message


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("part", ["blocks", "scales"])
def test_mxfp4_tensor_with_wrong_dtype_is_rejected(request, tmp_path, layout, part):
    """MXFP4 blocks/scales must be uint8; anything else is a corrupt checkpoint, to be reported
    at load time rather than as a TypeError in the first forward."""
    d = copy_checkpoint(src_dir(request, layout), tmp_path / "ckpt")
    file = weights_file(d)
    name = NAMES[layout][3] if part == "blocks" else NAMES[layout][4]
    rewrite_tensors(file, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    message = load_error(d)
    assert str(file) in message and name in message


# -- files: truncated, missing shard, no weights -----------------------------------------------

@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("keep", ["header-only", "half", "all-but-8-bytes"])
def test_truncated_safetensors(request, tmp_path, layout, keep):
    d = copy_checkpoint(src_dir(request, layout), tmp_path / "ckpt")
    file = weights_file(d)
    size = file.stat().st_size
    os.truncate(file, {"header-only": 100, "half": size // 2, "all-but-8-bytes": size - 8}[keep])
    message = load_error(d)
    assert str(file) in message and "truncated" in message


def test_index_lists_a_missing_shard(tiny_hf, tmp_path):
    d = copy_checkpoint(tiny_hf, tmp_path / "ckpt")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00001.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert (d / shard).exists()
    message = load_error(d)
    assert "model.safetensors.index.json" in message and "model-00001-of-00001.safetensors" in message


def test_config_without_weights(tiny_original, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tiny_original / "config.json", d)
    message = load_error(d)
    assert str(d) in message and "safetensors" in message


# -- config.json -------------------------------------------------------------------------------

def test_no_config_json(tiny_original, tmp_path):
    d = copy_checkpoint(tiny_original, tmp_path / "ckpt")
    (d / "config.json").unlink()
    message = load_error(d)
    assert str(d) in message and "config.json" in message


@pytest.mark.parametrize("text", ["{bad json", "", "[1, 2, 3]", '"a string"'],
                         ids=["invalid", "empty", "list", "string"])
def test_config_not_a_json_object(tiny_original, tmp_path, text):
    d = copy_checkpoint(tiny_original, tmp_path / "ckpt")
    (d / "config.json").write_text(text)
    message = load_error(d)
    assert str(d / "config.json") in message


# (layout, key, value, names acceptable in the message)
BAD_CONFIG_VALUES = [
    pytest.param("original", "num_experts", 0, ["num_experts"], id="orig-num_experts-0"),
    pytest.param("original", "head_dim", 15, ["head_dim"], id="orig-head_dim-odd"),
    pytest.param("original", "layer_types", "sliding_attention", ["layer_types"], id="orig-layer_types-str"),
    pytest.param("hf", "num_local_experts", "4", ["num_local_experts", "num_experts"], id="hf-experts-str"),
    pytest.param("hf", "rope_scaling", 5, ["rope_scaling"], id="hf-rope_scaling-int"),
    pytest.param("hf", "rope_scaling", {"rope_type": "linear", "factor": 2.0}, ["rope_type"], id="hf-rope-linear"),
    pytest.param("original", "num_hidden_layers", "4", ["num_hidden_layers"], id="orig-layers-str"),
    pytest.param("original", "num_hidden_layers", True, ["num_hidden_layers"], id="orig-layers-bool"),
    pytest.param("original", "rope_theta", "150000", ["rope_theta"], id="orig-rope_theta-str"),
    pytest.param("original", "sliding_window", "128", ["sliding_window"], id="orig-window-str"),
    pytest.param("original", "swiglu_limit", None, ["swiglu_limit"], id="orig-swiglu-null"),
    pytest.param("hf", "rms_norm_eps", None, ["rms_norm_eps"], id="hf-eps-null"),
    pytest.param("hf", "rope_scaling", {"rope_type": "yarn", "factor": "32"}, ["factor", "rope_scaling"],
                 id="hf-rope-factor-str"),
]


@pytest.mark.parametrize("layout, key, value, names", BAD_CONFIG_VALUES)
def test_bad_config_value(request, tmp_path, layout, key, value, names):
    """A config.json of the wrong shape is reported at load, naming the file and the key."""
    d = copy_checkpoint(src_dir(request, layout), tmp_path / "ckpt")
    path = edit_config(d, lambda c: c.__setitem__(key, value))
    message = load_error(d)
    assert str(path) in message
    assert any(n in message for n in names), message


# -- paths and hub ids -------------------------------------------------------------------------

def test_nonexistent_path(tmp_path):
    for ref in (tmp_path / "does" / "not" / "exist", "./no-such-checkpoint-dir"):
        message = load_error(ref)
        assert str(ref) in message


def test_path_is_a_file(tiny_original):
    message = load_error(tiny_original / "config.json")
    assert str(tiny_original / "config.json") in message


def test_hub_id_offline_with_empty_cache(tmp_path):
    """No network allowed and nothing cached: say so, and say what to download."""
    result = run_python("""
        import ossgpt
        try:
            ossgpt.load("openai/gpt-oss-20b", device="cpu", progress=False)
        except ossgpt.CheckpointError as e:
            print(str(e))
        else:
            raise SystemExit("loaded?")
    """, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}, timeout=120)
    message = result.stdout.strip()
    print(f"\n[offline hub id] {message}")
    assert "\n" not in message
    assert "openai/gpt-oss-20b" in message and "HF_HUB_OFFLINE" in message
    assert "hf download openai/gpt-oss-20b" in message and "original" in message
    assert not (tmp_path / "hf-home" / "hub" / "models--openai--gpt-oss-20b").exists()


def test_hub_id_from_offline_cache(tiny_original, tmp_path):
    """A hub id resolves through the huggingface_hub cache without the network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--tiny--gpt-oss-test"
    shutil.copytree(tiny_original, repo / "snapshots" / commit / "original")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "logits.pt"
    run_python(f"""
        import torch, ossgpt
        model = ossgpt.load("tiny/gpt-oss-test", device="cpu", dtype=torch.float32, progress=False)
        assert model.source[1] == "original", model.source
        assert "models--tiny--gpt-oss-test" in str(model.source[0]), model.source
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            torch.save(model(torch.randint(0, model.config.vocab_size, (2, 40), generator=g)), {str(out)!r})
    """, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}, timeout=120)
    assert torch.equal(torch.load(out), logits(load32(tiny_original)))


# -- layouts and round trips -------------------------------------------------------------------

def test_layouts_give_identical_weights_and_logits(tiny_original, tiny_hf):
    a, b = load32(tiny_original), load32(tiny_hf)
    assert a.source[1] == "original" and b.source[1] == "hf"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert torch.equal(logits(a), logits(b))


@pytest.mark.parametrize("layers", [None, 2])
def test_experts_held_on_their_own_device(tiny_original, layers):
    """experts_device (--experts-device cpu[:N]): every layer's experts, or the first N layers',
    on that device and the rest on `device`, the same logits. Here both are the CPU;
    benchmarks/gpu_check.py runs it with the model on a GPU."""
    net = ossgpt.load(tiny_original, device="cpu", dtype=torch.float32, progress=False,
                      experts_device="cpu", experts_layers=layers)
    assert all(b.mlp.experts.packed and b.mlp.experts.mlp1_blocks.device.type == "cpu" for b in net.blocks)
    assert torch.equal(logits(net), logits(load32(tiny_original)))
    with pytest.raises(CheckpointError, match="experts_layers needs experts_device"):
        ossgpt.load(tiny_original, device="cpu", progress=False, experts_layers=2)


def test_repo_root_with_both_layouts(tiny_repo, tiny_hf):
    """A hub snapshot: HF files at the root and original/ beside them."""
    model = load32(tiny_repo)
    assert model.source == (tiny_repo / "original", "original")
    assert torch.equal(logits(model), logits(load32(tiny_hf)))


def test_loaded_dtypes(tiny_hf):
    model = ossgpt.load(tiny_hf, device="cpu", dtype=torch.bfloat16, progress=False)
    sd = model.state_dict()
    assert sd["embedding.weight"].dtype == torch.bfloat16
    assert sd["blocks.0.mlp.experts.mlp1_blocks"].dtype == torch.uint8
    assert sd["blocks.0.mlp.experts.mlp1_scales"].dtype == torch.uint8
    assert sd["norm.weight"].dtype == torch.float32
    assert not any(t.is_meta for t in sd.values())
    assert logits(model).dtype == torch.float32


@pytest.mark.parametrize("src", ["original", "hf"])
@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_save_load_round_trip(request, tmp_path, src, fmt):
    source = src_dir(request, src)
    model = load32(source)
    out = save(model, tmp_path / "saved", fmt, progress=False)
    again = load32(out)
    assert again.source == (out, fmt)
    assert torch.equal(logits(again), logits(model))
    # bf16 weights saved in bf16 reproduce the random writer's files byte for byte
    reference = request.getfixturevalue({"original": "tiny_original", "hf": "tiny_hf"}[fmt])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in ("config.json", weights_file(reference).name):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_save_float32_round_trip(tiny_original, tmp_path, fmt):
    model = load32(tiny_original)
    out = save(model, tmp_path / "saved", fmt, dtype=torch.float32, progress=False)
    with safe_open(str(weights_file(out)), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32", "U8"}
    assert torch.equal(logits(load32(out)), logits(model))


def dense_copy(model: Transformer) -> Transformer:
    """The same model with dequantized (dense float32) experts."""
    dense = Transformer(model.config, packed_experts=False)
    sd = model.state_dict()
    new = {}
    for k, v in sd.items():
        if k.endswith("_blocks"):
            base = k[:-len("_blocks")]
            new[base + "_weight"] = mxfp4.dequantize(v, sd[base + "_scales"], torch.float32)
        elif not k.endswith("_scales"):
            new[k] = v
    dense.load_state_dict(new, strict=True)
    return dense.eval()


@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_dense_experts_round_trip(tiny_original, tmp_path, fmt):
    """Dense (unquantized) experts: original keeps (E, out, in); HF stores the (E, in, out)
    transposes gate_up_proj / down_proj."""
    packed = load32(tiny_original)
    dense = dense_copy(packed)
    want = logits(packed)
    # packed experts run the fused kernel (its own sum order), dense ones the plain path
    torch.testing.assert_close(logits(dense), want, rtol=1e-5, atol=1e-5)
    out = save(dense, tmp_path / "dense", fmt, progress=False)
    again = load32(out)
    assert not again.blocks[0].mlp.experts.packed
    assert torch.equal(logits(again), logits(dense))
    if fmt == "hf":
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        import transformers
        from transformers import GptOssForCausalLM
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        theirs = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, packed.config.vocab_size, (2, 40), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(theirs(tokens).logits.float(), want, rtol=1e-5, atol=1e-5)


def test_120b_structure_logits_equal_transformers(tmp_path):
    """gpt-oss-120b's structure, at small widths: 36 layers alternating sliding and full
    attention, 128 experts with 4 active. float32 logits equal transformers' on prompts past the
    128-token window (the full widths: test_full_width_checkpoint_peak_rss)."""
    import transformers
    from transformers import GptOssForCausalLM, Mxfp4Config
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = dataclasses.replace(ModelConfig.preset("120b"), hidden_size=64, intermediate_size=64,
                                 head_dim=16, num_attention_heads=8, num_key_value_heads=2)
    assert (config.num_hidden_layers, config.num_experts, config.experts_per_token) == (36, 128, 4)
    d = write_random(tmp_path / "hf", config, fmt="hf", seed=3, progress=False)
    ours = load32(d)
    theirs = GptOssForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                               quantization_config=Mxfp4Config(dequantize=True)).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 150), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits.float(), rtol=1e-5, atol=1e-5)


# -- memory ------------------------------------------------------------------------------------

RSS_PROBE = """
    import json, resource, sys, time, torch, ossgpt

    def rss():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}

    path, n_tokens = sys.argv[1], int(sys.argv[2])
    before = rss()
    t = time.perf_counter()
    model = ossgpt.load(path, device="cpu", dtype=torch.bfloat16, progress=False)
    load_s = time.perf_counter() - t
    after = rss()
    # is the embedding's storage inside a mapping of a checkpoint file?
    ptr = model.embedding.weight.data_ptr()
    mapped = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            mapped = parts[5:]
    out = dict(before=before, after_load=after, load_s=load_s, embedding_mapping=" ".join(mapped))
    if n_tokens:
        t = time.perf_counter()
        with torch.no_grad():
            y = model(torch.arange(1, n_tokens + 1)[None])
        out.update(forward_s=time.perf_counter() - t, finite=bool(y.isfinite().all()),
                   after_forward=rss())
        from ossgpt.generate import generate
        from ossgpt.sampling import SamplingParams
        out["generated"] = [e.token for e in generate(model, [list(range(1, n_tokens + 1))], 4,
                                                      SamplingParams(temperature=0))]
    # VmHWM: this process image's peak RSS. ru_maxrss is reported too, but after a vfork+exec
    # from a big parent (pytest) Linux carries the parent's peak into it, so it can overstate.
    out["peak_rss"] = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0]) * 1024
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))
"""


def probe(path: Path, n_tokens: int) -> dict:
    # Experts memory-mapped, as on a machine without room for the whole checkpoint (hugepages.py)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(RSS_PROBE), str(path), str(n_tokens)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OSSGPT_HUGEPAGES": "dense"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def bf16_bytes(config: ModelConfig) -> int:
    """The model's size with every weight in bf16, experts dequantized (2 bytes/param)."""
    with torch.device("meta"):
        dense = Transformer(config, packed_experts=False)
    return 2 * sum(p.numel() for p in dense.parameters())


GB = 1e9


def moved_bytes(config: ModelConfig) -> int:
    """What checkpoint/hugepages.py copies into memory at load in its "dense" mode (where the
    kernel has huge pages): the bf16 unembedding and attention projections, whose file pages
    it then drops."""
    if not hugepages.enabled():
        return 0
    C, HD, KD = config.hidden_size, config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return 2 * (config.vocab_size * C + config.num_hidden_layers * 2 * C * (HD + KD))


def test_weights_are_memory_mapped(tiny_config, tmp_path):
    """Loading a bf16 checkpoint in bf16 maps the file instead of reading it into memory."""
    config = dataclasses.replace(tiny_config, hidden_size=512, layer_types=None)
    d = write_random(tmp_path / "wide", config, fmt="original", progress=False)
    size = (d / "model.safetensors").stat().st_size
    r = probe(d, 0)
    grew = r["after_load"]["VmRSS"] - r["before"]["VmRSS"]
    print(f"\n[mmap] checkpoint {size / GB:.3f} GB; RSS {r['before']['VmRSS'] / GB:.3f} -> "
          f"{r['after_load']['VmRSS'] / GB:.3f} GB after load (+{grew / GB:.3f} GB) in {r['load_s']:.2f} s; "
          f"embedding mapped from: {r['embedding_mapping'] or '(anonymous memory)'}")
    assert r["embedding_mapping"].endswith("model.safetensors")
    # Reading the file into memory would add at least its size; a mapping adds only the small
    # tensors converted to float32 and torch's own allocations (measured 0.08 GB here), plus
    # the unembedding where checkpoint/hugepages.py copies it (its file pages are dropped).
    assert grew < moved_bytes(config) + 0.5 * size


@pytest.mark.parametrize("preset, layers", [("20b", 2), ("120b", 1)])
def test_full_width_checkpoint_peak_rss(tmp_path, preset, layers):
    """The real gpt-oss-20b dimensions cut to 2 layers (~3.1 GB in MXFP4), and gpt-oss-120b's
    (128 experts) cut to 1 (~4.0 GB): load in bf16, run a few tokens and generate 4 greedily;
    peak RSS must stay far below the bf16 size of the weights (what a
    load-and-dequantize-everything loader would need)."""
    need = 10 * GB
    if shutil.disk_usage(tmp_path).free < need:
        pytest.skip(f"needs {need / GB:.0f} GB free disk in {tmp_path}")
    d = tmp_path / f"gpt-oss-{preset}-{layers}-layers"
    try:
        run_python(f"""
            import dataclasses
            from ossgpt import ModelConfig
            from ossgpt.checkpoint import write_random
            config = dataclasses.replace(ModelConfig.preset({preset!r}), num_hidden_layers={layers},
                                         layer_types=None)
            write_random({str(d)!r}, config, fmt="original", progress=False)
        """, timeout=600)
        config = ModelConfig.from_file(d / "config.json")
        experts = {"20b": 32, "120b": 128}[preset]
        assert (config.hidden_size, config.num_experts, config.num_hidden_layers) == (2880, experts, layers)
        size = (d / "model.safetensors").stat().st_size
        dense = bf16_bytes(config)
        r = probe(d, 4)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    peak = r["peak_rss"]
    print(f"\n[{preset}-shaped, {layers} layers] checkpoint {size / GB:.2f} GB, bf16 weights {dense / GB:.2f} GB; "
          f"RSS after import {r['before']['VmRSS'] / GB:.2f} GB, after load {r['after_load']['VmRSS'] / GB:.2f} GB "
          f"({r['load_s']:.1f} s), after a 4-token forward {r['after_forward']['VmRSS'] / GB:.2f} GB "
          f"({r['forward_s']:.1f} s); peak RSS (VmHWM) {peak / GB:.2f} GB = {peak / dense:.0%} of bf16 "
          f"(ru_maxrss {r['ru_maxrss'] / GB:.2f} GB)")
    assert r["finite"] and len(r["generated"]) == 4
    assert r["after_load"]["VmRSS"] - r["before"]["VmRSS"] < moved_bytes(config) + 0.1 * size
    assert peak < 0.5 * dense
