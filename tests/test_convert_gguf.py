"""`ossgpt convert --to gguf` and `--from gguf`, with llama-cpp-python as the peer that runs the
files: nano and a random gpt-oss-20b-dimension checkpoint give ossgpt's logits within the bf16
band, and nano answers through llama.cpp as through ossgpt.

The bf16 band: a bf16 engine's logits differ from float32 ones by rounding alone; its width is
measured on the same prompt as ossgpt's own bf16 logits' relative distance from its float32
logits (nano 0.0070, the 20b-dimension model 0.0076, on this machine). llama.cpp must stay
within twice that: besides its bf16 weights it rounds the activations that meet MXFP4 experts
to 8 bits (Q8_0), measured at 0.0055 (0.8x the band) on nano and 0.0113 (1.5x) on the 20b
dimensions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import ossgpt
from ossgpt import ModelConfig, mxfp4
from ossgpt.checkpoint.tensors import Checkpoint
from ossgpt.cli import main
from ossgpt.convert.gguf import from_ggml_mxfp4, to_ggml_mxfp4, write_gguf
from ossgpt.convert.gguf_file import GGUFFile
from ossgpt.errors import OssgptError
from ossgpt.harmony import render_prompt

QUESTION = "What is 348 + 275?"
BAND_FACTOR = 2.0


@pytest.fixture(scope="module")
def llama_cpp():
    """The peer (llama-cpp-python, in the test extra)."""
    return pytest.importorskip("llama_cpp")


def test_mxfp4_blocks_repacked_for_ggml():
    """gguf's own MXFP4 dequantizer (ggml's layout) reads our repacked blocks as our
    dequantizer reads the originals, and the repacking inverts exactly."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 135, (3, 5, 4), generator=g, dtype=torch.uint8)
    ggml = to_ggml_mxfp4(blocks, scales)
    assert ggml.shape == (3, 5, 4 * 17)
    theirs = gguf.quants.dequantize(ggml.numpy(), gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(theirs, mxfp4.dequantize(blocks, scales, torch.float32).numpy())
    back = from_ggml_mxfp4(ggml)
    assert torch.equal(back[0], blocks) and torch.equal(back[1], scales)


# -- nano through llama-cpp-python ------------------------------------------------------------------

@pytest.fixture(scope="module")
def nano_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "nano.gguf"
    main(["convert", "nano", "--to", "gguf", "--output", str(path)])
    return path


@pytest.fixture(scope="module")
def nano_reader(nano_gguf) -> gguf.GGUFReader:
    """The file as the gguf package reads it (37 s on a 2-core Zen 1: it parses 650,000 token
    and merge strings one by one; ossgpt's gguf_file takes 0.8 s)."""
    return gguf.GGUFReader(nano_gguf)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_gguf_metadata(nano_reader):
    reader = nano_reader
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "gpt-oss"
    assert (field("gpt-oss.block_count"), field("gpt-oss.expert_count"), field("gpt-oss.embedding_length")) == (4, 8, 256)
    assert field("tokenizer.ggml.pre") == "gpt-4o" and len(reader.fields["tokenizer.ggml.tokens"].data) == 201088
    assert "<|channel|>" in field("tokenizer.chat_template")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.3.ffn_down_exps.weight"] == "MXFP4"
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == "BF16"
    assert types["blk.0.attn_sinks.weight"] == types["blk.0.ffn_gate_inp.weight"] == "F32"


def test_our_reader_reads_what_the_gguf_package_reads(nano_gguf, nano_reader, tmp_path):
    """gguf_file (the header in about a second) against the package's GGUFReader: every field's
    value, every tensor's name, type, shape and bytes; a cut file is refused, naming it."""
    ours = GGUFFile(nano_gguf)
    theirs = {key: field for key, field in nano_reader.fields.items()
              if not key.startswith("GGUF.")}       # the reader's own: version and counts
    assert list(ours.fields) == list(theirs)
    for key, field in theirs.items():
        value = ours.fields[key]
        assert (value.tolist() if isinstance(value, np.ndarray) else value) == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in nano_reader.tensors]
    for a, b in zip(ours.tensors, nano_reader.tensors):
        assert (a.tensor_type, a.shape, a.data.dtype, a.data.shape) == \
            (b.tensor_type, tuple(b.shape.tolist()), b.data.dtype, b.data.shape), a.name
        assert np.array_equal(a.data, b.data), a.name
    data = nano_gguf.read_bytes()
    for cut in (100_000, len(data) - 1000):        # in the vocabulary; in the last tensor
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(OssgptError, match="cut.gguf: not a readable GGUF"):
            GGUFFile(tmp_path / "cut.gguf")


@pytest.mark.parametrize("order", list(gguf.GGUFEndian), ids=lambda e: e.name.lower())
def test_our_reader_reads_every_value_type_in_either_byte_order(tmp_path, order):
    """Written by the package's GGUFWriter, read by both: every scalar type, strings (non-ASCII
    too), arrays of numbers, of strings and of arrays, tensors F32, F16, Q8_0 and MXFP4."""
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(path, "test", endianess=order)
    for i, kind in enumerate(("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")):
        getattr(w, f"add_{kind}")(f"k.{kind}", (-1) ** i * (i + 1) if kind.startswith("int") else i + 1)
    w.add_float32("k.float32", 1e-5)
    w.add_float64("k.float64", 1 / 3)
    w.add_bool("k.bool", True)
    w.add_string("k.string", "café 中文 ▁Ġ")
    w.add_array("k.ints", [3, -1, 4])
    w.add_array("k.floats", [0.5, 2.25])
    w.add_array("k.strings", ["", "a b", "ünï"])
    w.add_array("k.nested", [[1, 2], [3]])
    g = np.random.default_rng(0)
    w.add_tensor("t.f32", g.standard_normal((3, 4)).astype(np.float32))
    w.add_tensor("t.f16", g.standard_normal((2, 8)).astype(np.float16))
    for name, q in (("t.q8", gguf.GGMLQuantizationType.Q8_0), ("t.mxfp4", gguf.GGMLQuantizationType.MXFP4)):
        data = gguf.quants.quantize(g.standard_normal((2, 64)).astype(np.float32), q)
        w.add_tensor(name, data, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF.") and key != "k.nested":
            value = ours.fields[key]
            assert (value.tolist() if isinstance(value, np.ndarray) else value) == field.contents(), key
    assert ours.fields["k.nested"] == [[1, 2], [3]]      # the package flattens it: [1, 2, 3]
    assert sum(ours.fields["k.nested"], []) == theirs.fields["k.nested"].contents()
    assert ours.fields["k.string"] == "café 中文 ▁Ġ" and ours.fields["k.int16"] == -4
    assert len(ours.tensors) == len(theirs.tensors) == 4
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.shape, a.data.shape) == (b.name, b.tensor_type, tuple(b.shape.tolist()), b.data.shape)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


def test_nano_gguf_in_llama_cpp_matches_ossgpt(nano_gguf, llama_cpp):
    prompt = render_prompt([{"role": "user", "content": QUESTION}], date="", reasoning_effort="low")
    llm = llama_cpp.Llama(str(nano_gguf), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(prompt)
        theirs = np.array(llm.scores[:len(prompt)])
    finally:
        llm.close()
    # without logits_all, which copies every position's 201,088 logits at each step
    llm = llama_cpp.Llama(str(nano_gguf), n_ctx=512, n_threads=2, verbose=False)
    try:
        reply = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            if token in (200002, 200012) or len(reply) >= 200:    # <|return|>, <|call|>
                break
            reply.append(token)
    finally:
        llm.close()
    from ossgpt.generate import generate
    from ossgpt.sampling import SamplingParams
    from ossgpt.tokenizer import get_tokenizer

    tokens = torch.tensor([prompt])
    net = ossgpt.load("nano", dtype=torch.bfloat16, progress=False)
    with torch.no_grad():
        f32 = ossgpt.load("nano", dtype=torch.float32, progress=False)(tokens)[0].numpy()
        bf16 = net(tokens)[0].float().numpy()
    band = relative(bf16, f32)
    error = relative(theirs, f32)
    print(f"\nnano GGUF in llama.cpp: logits {error:.4f} from ossgpt float32 (relative), "
          f"the bf16 band {band:.4f}; argmax agrees at {(theirs.argmax(-1) == f32.argmax(-1)).mean():.0%}")
    assert error < BAND_FACTOR * band
    ours = [e.token for e in generate(net, [prompt], 200, SamplingParams(temperature=0.0), (200002, 200012))
            if e.token not in (200002, 200012)]
    text = get_tokenizer().decode(reply)
    print(f"llama.cpp's greedy reply: {text!r}")
    assert text == get_tokenizer().decode(ours)
    assert text.endswith("348 + 275 = 623.")


def test_chat_template_through_llama_cpp(nano_reader, llama_cpp):
    """llama-cpp-python renders chats with the GGUF's template (today's date, its default
    medium effort): harmony's prompt, as ossgpt renders it."""
    import datetime

    from ossgpt.tokenizer import get_tokenizer

    Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter

    template = nano_reader.fields["tokenizer.chat_template"].contents()
    formatter = Jinja2ChatFormatter(template, eos_token="<|return|>", bos_token="<|startoftext|>")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    today = datetime.date.today().isoformat()
    assert formatter(messages=messages).prompt == get_tokenizer().decode(render_prompt(messages, date=today))


# -- back from GGUF -------------------------------------------------------------------------------

@pytest.mark.slow
def test_gguf_back_to_hf_gives_nanos_logits(nano_gguf, tmp_path):
    """Lossless for what nano's GGUF holds: MXFP4 experts (bytes repacked back), bf16 tables
    and float32 norms, biases, sinks and router."""
    main(["convert", str(nano_gguf), "--to", "hf", "--output", str(tmp_path / "hf")])
    assert ModelConfig.from_file(tmp_path / "hf" / "config.json") == Checkpoint("nano").config
    tokens = torch.randint(0, 201088, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        back = ossgpt.load(tmp_path / "hf", dtype=torch.float32, progress=False)(tokens)
        want = ossgpt.load("nano", dtype=torch.float32, progress=False)(tokens)
    assert torch.equal(back, want)


@pytest.mark.slow
def test_q8_0_gguf_back_to_hf(tiny_original, tmp_path):
    """Q8_0 tensors come back dequantized by the gguf package (to bf16), close to the source."""
    write_gguf(Checkpoint(tiny_original), tmp_path / "q8.gguf", outtype="q8_0", progress=False)
    types = {t.name: t.tensor_type.name for t in GGUFFile(tmp_path / "q8.gguf").tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == "Q8_0"
    # a nonzero error below is what Q8_0 leaves
    main(["convert", str(tmp_path / "q8.gguf"), "--from", "gguf", "--to", "original", "--output", str(tmp_path / "back")])
    a, b = ossgpt.load(tmp_path / "back", dtype=torch.float32, progress=False), \
        ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    w, v = a.blocks[0].attn.q_proj.weight, b.blocks[0].attn.q_proj.weight
    assert 0 < ((w - v).norm() / v.norm()).item() < 0.01


def test_gguf_of_another_architecture_is_refused(tmp_path, cli_error):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = cli_error("convert", str(path), "--to", "hf", "--output", str(tmp_path / "out"))
    assert str(path) in err and "'llama'" in err and "gpt-oss" in err
    (tmp_path / "text.gguf").write_text("not a gguf")
    err = cli_error("convert", str(tmp_path / "text.gguf"), "--from", "gguf", "--to", "hf",
                    "--output", str(tmp_path / "out"))
    assert "not a readable GGUF" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.gguf", "text.gguf"]


# -- gpt-oss-20b dimensions ------------------------------------------------------------------------

BIG = """
    import dataclasses, json, sys
    import numpy as np, torch, llama_cpp, ossgpt
    from ossgpt import ModelConfig
    from ossgpt.checkpoint import write_random
    from ossgpt.checkpoint.tensors import Checkpoint
    from ossgpt.convert.gguf import write_gguf

    work = sys.argv[1]
    config = dataclasses.replace(ModelConfig.preset("20b"), num_hidden_layers=1, layer_types=None)
    write_random(work + "/ckpt", config, fmt="original", progress=False)
    write_gguf(Checkpoint(work + "/ckpt"), work + "/big.gguf", progress=False)
    prompt = torch.randint(0, 199998, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = llama_cpp.Llama(work + "/big.gguf", n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(prompt)
    theirs = np.array(llm.scores[:len(prompt)])
    llm.close()
    out = {}
    for dtype in ("bfloat16", "float32"):
        net = ossgpt.load(work + "/ckpt", dtype=getattr(torch, dtype), progress=False)
        with torch.no_grad():
            out[dtype] = net(torch.tensor([prompt]))[0].float().numpy()
        del net
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(json.dumps({"llama": rel(theirs, out["float32"]), "band": rel(out["bfloat16"], out["float32"]),
                      "argmax": float((theirs.argmax(-1) == out["float32"].argmax(-1)).mean())}))
"""


@pytest.mark.slow
def test_20b_dimension_gguf_in_llama_cpp(tmp_path, llama_cpp):
    """gpt-oss-20b's dimensions (hidden 2880, 64 query and 8 KV heads, 32 experts of MXFP4 rows
    of 90 blocks, the full vocabulary), one layer: 2.8 GB, converted and run by llama.cpp."""
    if shutil.disk_usage(tmp_path).free < 8e9:
        pytest.skip("needs 8 GB free disk")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(BIG), str(tmp_path)], capture_output=True,
                            text=True, timeout=900, env={**os.environ, "OSSGPT_HUGEPAGES": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\n20b-dimension GGUF in llama.cpp: logits {r['llama']:.4f} from ossgpt float32, the bf16 "
          f"band {r['band']:.4f}; argmax agrees at {r['argmax']:.0%}")
    assert r["llama"] < BAND_FACTOR * r["band"]
