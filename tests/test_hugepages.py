"""Decode's dense weights in transparent huge pages (ossgpt/checkpoint/hugepages.py): what moves,
that the logits do not change, and that the file pages left behind stop counting as resident."""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import warnings

import pytest
import torch

import ossgpt
from ossgpt.checkpoint import hugepages, write_random

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


def _in_file(t: torch.Tensor) -> bool:
    return _mapping(t.data_ptr())[0].endswith(".safetensors")


@torch.inference_mode()
def test_load_moves_what_decode_streams(tiny_config, tmp_path, monkeypatch):
    """auto (this small checkpoint fits in memory): dense weights and experts move, the
    embedding stays mapped; dense: the experts stay mapped too; 0: everything does. Same
    logits."""
    # Tensors past hugepages.MIN_BYTES: unembedding 4096 x 256 bf16 (2 MiB), each layer's
    # mlp1 blocks 4 x 4096 x 8 x 16 bytes (4 MiB).
    config = dataclasses.replace(tiny_config, vocab_size=4096, hidden_size=256, intermediate_size=2048)
    write_random(tmp_path, config, fmt="original", progress=False)
    tokens = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    logits = {}
    for mode in ("auto", "dense", "0"):
        monkeypatch.setenv("OSSGPT_HUGEPAGES", mode)
        monkeypatch.setattr(hugepages, "_enabled", None)
        net = ossgpt.load(tmp_path, dtype=torch.bfloat16, progress=False)
        unembedding, experts = net.unembedding.weight, net.blocks[0].mlp.experts.mlp1_blocks
        assert _in_file(net.embedding.weight)                     # one row read per token
        assert _in_file(unembedding) == (mode == "0")
        assert _in_file(experts) == (mode != "auto")
        if mode == "auto":
            assert unembedding.data_ptr() % (2 << 20) == 0 and experts.data_ptr() % (2 << 20) == 0
        logits[mode] = net(tokens)
    assert torch.equal(logits["auto"], logits["0"]) and torch.equal(logits["dense"], logits["0"])


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


def _cached_pages(path) -> int:
    """Pages of the file now in the page cache (mincore on a fresh mapping, which faults none)."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    pages = -(-len(m) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(address), ctypes.c_size_t(len(m)), vec) == 0
    return sum(v & 1 for v in vec)


def test_release_drops_the_file_pages_from_the_page_cache_too(tmp_path):
    """A copied range is out of the page cache as well (MADV_PAGEOUT), so that a copy as large
    as the checkpoint does not make the kernel reclaim it piecemeal (fragmenting free memory)."""
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (8 << 12))                 # 8 MiB
        f.flush()
        os.fsync(f.fileno())                                     # clean pages: droppable
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    t = torch.frombuffer(mapped, dtype=torch.uint8)
    t.sum()                                                      # every page read: cached
    assert _cached_pages(path) == 2048
    hugepages.release(t)
    assert _cached_pages(path) <= 16
    assert t[4096 * 100 + 7] == 7                                # read back from the file


def test_warns_when_weights_miss_huge_pages():
    with pytest.warns(UserWarning, match=r"1\.0 of 2\.0 GiB of weights got huge pages"):
        hugepages.warn_if_short(2 << 30, 1 << 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hugepages.warn_if_short(2 << 30, int(1.9 * 2**30))      # 95%: fine
        hugepages.warn_if_short(512 << 20, 0)                   # too small to matter
    assert hugepages.huge_bytes() >= 0
