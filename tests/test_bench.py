import json
import subprocess
import sys

import torch

from ossgpt import bench


def test_bench_measures_a_checkpoint(tiny_original) -> None:
    r = bench.run(str(tiny_original), prompt_tokens=200, decode_steps=3, batches=(1, 4),
                  dtype=torch.float32)
    assert r.load_s > 0 and r.prefill_tok_s > 0 and 0 < r.ttft_s
    assert set(r.decode_tok_s) == {1, 4} and all(v > 0 for v in r.decode_tok_s.values())
    assert 0 < r.peak_rss_gib < 64
    assert json.loads(json.dumps(r.to_dict()))["decode_tok_s"]["4"] == r.decode_tok_s[4]


def test_bench_cli(tiny_original, tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "ossgpt", "bench", "--model", str(tiny_original),
                          "--prompt-tokens", "64", "--decode-steps", "2", "--batch", "1,2",
                          "--dtype", "float32", "--json-out", str(tmp_path / "r.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "decode, batch 2" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())["prompt_tokens"] == 64
    bad = subprocess.run([sys.executable, "-m", "ossgpt", "bench", "--batch", "1,x"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --batch")
