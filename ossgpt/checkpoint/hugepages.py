"""The dense weights every decoded token reads, moved into transparent huge pages (Linux).

Why: decode streams the attention and unembedding weights once per token. Left in the
checkpoint's memory map they are read through 4 KiB page-cache pages; copied into 2 MiB pages
the same reads measured 53-59 GB/s against 47-51 GB/s in place (the 20b unembedding, 2 threads;
a plain anonymous copy in 4 KiB pages: 39-43 GB/s, which is why nothing moves where the kernel
has transparent huge pages turned off). The MXFP4 experts stay memory-mapped: those pages are
clean, so the kernel can drop them under memory pressure, which a 16 GB machine needs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch

MIN_BYTES = 1 << 20     # smaller tensors stay in cache between tokens anyway
_HUGE_PAGE = 2 << 20
_MADV_DONTNEED = 4
_enabled: bool | None = None


def enabled() -> bool:
    """Whether this kernel gives transparent huge pages to memory that asks (madvise/always),
    and OSSGPT_HUGEPAGES=0 does not turn the move off (leaving every weight memory-mapped)."""
    global _enabled
    if _enabled is None:
        try:
            mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        except OSError:
            mode = ""
        _enabled = (os.environ.get("OSSGPT_HUGEPAGES", "1") != "0"
                    and sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
                    and ("[always]" in mode or "[madvise]" in mode))
    return _enabled


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor t in anonymous memory advised for huge pages."""
    nbytes = t.numel() * t.element_size()
    # Private: shared anonymous memory is shmem, which takes huge pages only if shmem_enabled says
    buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    # Huge pages cover only 2 MiB-aligned ranges: start the tensor on one.
    start = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % _HUGE_PAGE
    out = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start)  # keeps buf alive
    out = out.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def release(t: torch.Tensor) -> None:
    """Drop this process's mapping of the whole pages under t, a view of a read-only file
    mapping that is no longer needed: the data stays in the page cache (a later read maps it
    back) and stops counting towards this process's resident memory."""
    span = (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
    page = mmap.PAGESIZE
    first = -(-t.data_ptr() // page) * page
    last = (t.data_ptr() + span) // page * page
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                                  ctypes.c_int(_MADV_DONTNEED))
