"""The torch-free kernel cores (ossgpt/kernels/cpu) through a native harness (tests/native/
harness.cpp), for every level: the x86 levels this CPU runs natively, and aarch64 NEON, cross-
compiled with Debian's aarch64-linux-gnu-g++ and run under qemu-aarch64 on x86 machines
(natively on aarch64 ones). Each case is checked against the plain PyTorch reference with the
tolerances of tests/test_kernels.py; exact operations (dequantizing, packing, unpacking) bit
for bit. On x86 the harness also gives the extension's results bit for bit, which ties the
harness to what users run.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from ossgpt import kernels, model, mxfp4, packed_bf16
from ossgpt.kernels import build

HARNESS = Path(__file__).parent / "native" / "harness.cpp"
DTYPES = {torch.float32: "f", torch.bfloat16: "h", torch.uint8: "b", torch.int64: "l", torch.int32: "i",
          torch.bool: "?"}
CODES = {v: k for k, v in DTYPES.items()}
ARCH = build.architecture()


def _tools(level: str) -> tuple[list[str], list[str]] | str:
    """(compiler command, runner prefix) for `level`, or why it cannot run here."""
    if level == "neon":
        if ARCH == "aarch64":
            return ["c++"], []
        missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
        if missing:
            return (f"{' and '.join(missing)} not installed "
                    "(apt-get install g++-aarch64-linux-gnu qemu-user)")
        return ["aarch64-linux-gnu-g++", "-static"], ["qemu-aarch64"]
    if ARCH != "x86_64":
        return f"{level} is an x86-64 level; this machine is {ARCH}"
    if level not in build.supported_levels():
        return f"this CPU cannot run {level}"
    return ["c++"], []


LEVELS = ["avx2", "avx512", "avx512bf16", "neon"]


@pytest.fixture(scope="module", params=LEVELS)
def harness(request, tmp_path_factory):
    """Runs the harness of one level: f(op, **arrays) -> dict of result tensors."""
    level = request.param
    tools = _tools(level)
    if isinstance(tools, str):
        pytest.skip(tools)
    compiler, runner = tools
    binary = tmp_path_factory.mktemp(f"harness_{level}") / "harness"
    flags = [f for f in build.FLAGS[level] if not (ARCH == "aarch64" and f.startswith("-march"))]
    subprocess.run([*compiler, "-std=c++17", "-O2", *flags, f"-I{build.CPU_DIR}", str(HARNESS), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    workdir = binary.parent

    def run(op: str, **arrays: torch.Tensor | float) -> dict[str, torch.Tensor]:
        tensors = {k: torch.tensor([float(v)]) if not isinstance(v, torch.Tensor) else v for k, v in arrays.items()}
        tensors["op"] = torch.tensor(list(op.encode()), dtype=torch.uint8)
        _write(workdir / "in.bin", tensors)
        proc = subprocess.run([*runner, str(binary), str(workdir / "in.bin"), str(workdir / "out.bin")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return _read(workdir / "out.bin")

    run.level = level
    assert bytes(run("level")["level"].tolist()).decode() == level
    return run


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with open(path, "wb") as f:
        f.write(b"OSSK" + struct.pack("<I", len(tensors)))
        for name, t in tensors.items():
            t = t.contiguous()
            f.write(struct.pack("<I", len(name)) + name.encode() + DTYPES[t.dtype].encode())
            f.write(struct.pack("<I", t.dim()) + struct.pack(f"<{t.dim()}q", *t.shape))
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _read(path: Path) -> dict[str, torch.Tensor]:
    data, out, at = path.read_bytes(), {}, 8
    assert data[:4] == b"OSSK"
    for _ in range(struct.unpack_from("<I", data, 4)[0]):
        (n,) = struct.unpack_from("<I", data, at)
        name = data[at + 4:at + 4 + n].decode()
        dtype = CODES[chr(data[at + 4 + n])]
        (ndim,) = struct.unpack_from("<I", data, at + 5 + n)
        shape = struct.unpack_from(f"<{ndim}q", data, at + 9 + n)
        at += 9 + n + 8 * ndim
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        out[name] = torch.frombuffer(bytearray(data[at:at + size]) or bytearray(1), dtype=torch.uint8)[:size] \
            .view(dtype).reshape(shape).clone()
        at += size
    return out


def _parts(prefix: str, p: packed_bf16.PackedBF16) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": t for name, t in zip("sm nib base ptr col val".split(), p.parts())}


# -- the cases ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_moe(tiny_config):
    """The odd shapes of tests/test_kernels.py: 3 and 5 blocks a row, 5 experts, 3 routed."""
    from test_kernels import _random_moe
    config = dataclasses.replace(tiny_config, hidden_size=96, intermediate_size=160, num_experts=5,
                                 experts_per_token=3)
    return {dtype: _random_moe(config, dtype) for dtype in (torch.float32, torch.bfloat16)}


def _moe_arrays(moe, t, idx, gates) -> dict:
    e = moe.experts
    return dict(x=t.float(), bf16=float(t.dtype == torch.bfloat16), indices=idx, gates=gates, limit=moe.limit,
                alpha=1.702, mlp1_blocks=e.mlp1_blocks, mlp1_scales=e.mlp1_scales, mlp1_bias=e.mlp1_bias,
                mlp2_blocks=e.mlp2_blocks, mlp2_scales=e.mlp2_scales, mlp2_bias=e.mlp2_bias)


@pytest.mark.parametrize("tokens", [1, 6, 40])
@torch.inference_mode()
def test_moe(harness, odd_moe, tokens):
    """float32 within 1e-5 of the plain path; bf16 within the plain bf16 path's error against
    float32 (twice it with x86's 9-bit inputs). 40 tokens (8 a routed expert) take the panels, 1 and 6 the in-register products."""
    from test_kernels import _routed
    f32, bf16 = odd_moe[torch.float32], odd_moe[torch.bfloat16]
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
    t, idx, gates = _routed(f32, x)
    plain = f32.grouped(t, idx, gates)
    y = harness("moe", **_moe_arrays(f32, t, idx, gates))["y"]
    assert (y - plain).abs().max() <= 1e-5 * plain.abs().max()

    t, idx, gates = _routed(bf16, x.bfloat16())
    truth = f32.grouped(t.float(), idx, gates)
    y = harness("moe", **_moe_arrays(bf16, t, idx, gates))["y"]
    err = ((y - truth).norm() / truth.norm()).item()
    err_plain = ((bf16.grouped(t, idx, gates) - truth).norm() / truth.norm()).item()
    allowed = 2.0 if harness.level in ("avx2", "avx512") else 1.0   # 9-bit inputs: test_kernels.py
    assert err <= allowed * max(err_plain, 1e-3), (err, err_plain)


def test_dequantize_bf16_bit_exact_for_every_scale(harness):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (256, 16), generator=g, dtype=torch.uint8)
    scales = torch.arange(256, dtype=torch.uint8)
    y = harness("dequantize_bf16", blocks=blocks, scales=scales)["y"].view(256, 32)
    plain = mxfp4.dequantize(blocks[:, None], scales[:, None], torch.bfloat16).view(256, 32)
    nan = plain.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), plain[~nan].view(torch.int16))


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, 12])
@pytest.mark.parametrize("form", ["dense", "packed"])
@torch.inference_mode()
def test_linear(harness, rows, form):
    """Products: exact products summed in float32, rounded once to bf16 (37 and 64 rows: not
    multiples of any tile); packed weights give the dense weights' products. Up to 8 rows
    (decode) at every level, more (prefill) where the level has no bf16 products."""
    if rows > 8 and harness.level == "avx512bf16":
        pytest.skip("avx512bf16 leaves more than 8 rows to oneDNN's bf16 matmul")
    g = torch.Generator().manual_seed(rows)
    R, K = (37, 96) if form == "dense" else (64, 128)
    x = torch.randn(rows, K, generator=g).bfloat16()
    w, b = (torch.randn(R, K, generator=g) / 4).bfloat16(), torch.randn(R, generator=g).bfloat16()
    if form == "packed":
        w[1, 3] = 1e-12                    # a listed element that counts
    weight = {"weight": w} if form == "dense" else _parts("weight", packed_bf16.pack(w))
    y = harness("linear", x=x, bias=b, **weight)["y"]
    truth = x.double() @ w.double().T + b.double()
    assert y.dtype == torch.bfloat16 and y.shape == (rows, R)
    assert ((y.double() - truth).abs() <= truth.abs() * 2**-8 + 1e-6).all()


@torch.inference_mode()
def test_qkv_rope(harness, tiny_config):
    """The fused norm, q/k/v products and rotary embedding against the plain modules (one of the
    three weights packed): equal but for rare last-bit flips."""
    config = dataclasses.replace(tiny_config, hidden_size=128, head_dim=64)
    g = torch.Generator().manual_seed(3)
    attn = model.Attention(config, 0).bfloat16()
    for p in attn.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(3, 1, 128, generator=g).bfloat16()
    cos, sin = model.rope_cos_sin(torch.randint(0, 5000, (3, 1), generator=g), config)
    y = harness("qkv_rope", x=x.view(3, 128), norm=attn.norm.weight.float(), eps=attn.norm.eps,
                q=attn.q_proj.weight, k=attn.k_proj.weight, **_parts("v", packed_bf16.pack(attn.v_proj.weight)),
                q_bias=attn.q_proj.bias, k_bias=attn.k_proj.bias, v_bias=attn.v_proj.bias,
                cos=cos.view(3, -1), sin=sin.view(3, -1), rope_heads=6.0)["y"]
    h = attn.norm(x)
    plain = torch.cat([model.apply_rope(attn.q_proj(h).view(3, 1, 4, 64), cos, sin).view(3, -1),
                       model.apply_rope(attn.k_proj(h).view(3, 1, 2, 64), cos, sin).view(3, -1),
                       attn.v_proj(h).view(3, -1)], dim=-1)
    close = (y.float() - plain.float()).abs() <= plain.float().abs() * 2**-7 + 1e-3
    assert close.float().mean() >= 0.99


@pytest.mark.parametrize("D", [64, 16])
@torch.inference_mode()
def test_decode_attention(harness, D):
    """One new token per sequence against model.sdpa_with_sinks: one left-padded row, one that
    attends nothing (output 0), 150 keys past a 128-token window, 8 query heads per key head."""
    g = torch.Generator().manual_seed(D)
    B, S, K, H = 3, 150, 2, 16
    k, v = (torch.randn(B, S, K, D, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(B, 1, H, D, generator=g).bfloat16()
    sinks = torch.randn(H, generator=g)
    positions = torch.arange(S).expand(B, S).clone()
    positions[1, :40] = -1
    positions[2] = -1
    mask = model.attention_mask(torch.full((B, 1), S), positions, 128)
    y = harness("attention", q=q.view(B, H, D), k=k, v=v, sinks=sinks, mask=mask.view(B, S), scale=D**-0.5)["y"]
    truth = model.sdpa_with_sinks(q.float(), k.float(), v.float(), sinks, mask, D**-0.5).view(B, H, D)
    assert ((y.float() - truth).abs() <= truth.abs() * 2**-8 + 1e-6).all()
    assert (y[2] == 0).all()


def test_pack_and_unpack_bit_for_bit(harness):
    """Packing gives the reference's parts, and unpacking the weight, bit for bit, including
    zeros, subnormals, inf, nan and a row spread over 60 decades."""
    from test_packed_bf16 import _bits, _weight
    w = _weight(37, 128)
    ref = packed_bf16.pack(w)
    out = harness("pack", weight=w)
    for name, a in zip("sm nib base ptr col val".split(), ref.parts()):
        b = out[name]
        assert torch.equal(a.view(torch.int32) if name == "val" else a, b.view(torch.int32) if name == "val" else b), name
    back = harness("unpack", **{name: t for name, t in zip("sm nib base ptr col val".split(), ref.parts())})["y"]
    assert torch.equal(_bits(back), _bits(w))


@torch.inference_mode()
def test_the_harness_runs_what_the_extension_runs(harness, odd_moe):
    """On x86 the same core through the extension (threaded) gives the harness's (serial)
    results bit for bit: each output is summed by one thread either way."""
    if harness.level == "neon":
        pytest.skip("the extension of an emulated level does not load here")
    from test_kernels import _routed
    bf16 = odd_moe[torch.bfloat16]
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)).bfloat16()
    t, idx, gates = _routed(bf16, x)
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) / 4).bfloat16()
    xs = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    with kernels.use_isa(harness.level):
        moe = kernels.moe(t, idx, gates, bf16.experts, bf16.limit)
        dense = kernels.linear(xs, w, None)
        packed = kernels.linear(xs, packed_bf16.pack(w), None)
    assert torch.equal(moe, harness("moe", **_moe_arrays(bf16, t, idx, gates))["y"])
    assert torch.equal(dense, harness("linear", x=xs, weight=w)["y"])
    assert torch.equal(packed, harness("linear", x=xs, **_parts("weight", packed_bf16.pack(w)))["y"])
