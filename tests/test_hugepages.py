"""Decode's dense weights in transparent huge pages (ossgpt/checkpoint/hugepages.py): what moves,
that the logits do not change, and that the file pages left behind stop counting as resident."""

from __future__ import annotations

import mmap

import pytest
import torch

import ossgpt
from ossgpt.checkpoint import hugepages

pytestmark = pytest.mark.skipif(not hugepages.enabled(), reason="no transparent huge pages here")


def _mapping(address: int) -> tuple[str, int]:
    """(path or '', resident kB) of this process's mapping that holds `address`."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and head[0][0] in "0123456789abcdef":
            start, end = (int(v, 16) for v in head[0].split("-"))
            if start <= address < end:
                rss = next(int(l.split()[1]) for l in lines[i + 1:] if l.startswith("Rss:"))
                return (head[5] if len(head) > 5 else ""), rss
    raise AssertionError(f"no mapping holds {address:#x}")


@torch.inference_mode()
def test_load_moves_attention_and_unembedding_only(tiny_original, monkeypatch):
    net = ossgpt.load(tiny_original, dtype=torch.bfloat16, progress=False)
    moved = net.unembedding.weight                      # 201088 x 64 bf16: 25 MB
    assert moved.data_ptr() % (2 << 20) == 0
    assert not _mapping(moved.data_ptr())[0].endswith(".safetensors")
    # The embedding (one row read per token) and the MXFP4 experts stay in the file mapping.
    assert _mapping(net.embedding.weight.data_ptr())[0].endswith(".safetensors")
    assert _mapping(net.blocks[0].mlp.experts.mlp1_blocks.data_ptr())[0].endswith(".safetensors")

    tokens = torch.randint(0, 201088, (2, 40), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(hugepages, "_enabled", False)
    in_place = ossgpt.load(tiny_original, dtype=torch.bfloat16, progress=False)
    assert _mapping(in_place.unembedding.weight.data_ptr())[0].endswith(".safetensors")
    assert torch.equal(net(tokens), in_place(tokens))


def test_release_drops_resident_pages_and_keeps_the_data(tmp_path):
    data = torch.randint(0, 256, (8 << 20,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.numpy().tobytes())
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    t = torch.frombuffer(mapped, dtype=torch.uint8)[1000:]     # not page-aligned: edges stay
    assert torch.equal(t, data[1000:])                          # every page read: resident
    before = _mapping(t.data_ptr())[1]
    hugepages.release(t)
    after = _mapping(t.data_ptr())[1]
    assert before - after >= 7 * 1024, (before, after)          # kB: all but the edge pages
    assert torch.equal(t, data[1000:])                          # read back from the page cache
