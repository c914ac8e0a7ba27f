"""The weights decode streams, moved from the checkpoint's memory map into transparent huge
pages (Linux), the file pages under them dropped so resident memory does not grow.

Why: decode reads the attention and unembedding weights whole, and 4 of the experts, once per
token. In the memory map they are read through 4 KiB page-cache pages; copied into 2 MiB pages
the same reads measured 53-59 GB/s against 47-51 GB/s in place (the 20b unembedding, 2 threads;
a plain anonymous copy in 4 KiB pages: 39-43 GB/s, which is why nothing moves where the kernel
has transparent huge pages turned off), and the 24-layer 20b's experts took 51 ms a token
against 53-77 ms.

The MXFP4 experts move only where the checkpoint fits in available memory with room to spare:
left mapped, their clean pages can be dropped by the kernel under memory pressure, which a 16 GB
machine running gpt-oss-20b needs. OSSGPT_HUGEPAGES=dense moves only the dense weights, =0
nothing.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import sys
import warnings
from pathlib import Path

import torch

MIN_BYTES = 1 << 20     # smaller tensors stay in cache between tokens anyway
_HUGE_PAGE = 2 << 20
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21      # Linux 5.4+; older kernels refuse it and the pages stay cached
_CHUNK = 32 << 20       # bytes copied between releases of the source's pages
_enabled: bool | None = None


def mode() -> str:
    """OSSGPT_HUGEPAGES: "auto" (the default), "dense" or "0"."""
    return os.environ.get("OSSGPT_HUGEPAGES", "auto")


def enabled() -> bool:
    """Whether this kernel gives transparent huge pages to memory that asks (madvise/always),
    and OSSGPT_HUGEPAGES=0 does not turn the move off (leaving every weight memory-mapped)."""
    global _enabled
    if _enabled is None:
        try:
            thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        except OSError:
            thp = ""
        _enabled = (mode() != "0"
                    and sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
                    and ("[always]" in thp or "[madvise]" in thp))
    return _enabled


def move_experts(checkpoint_bytes: int) -> bool:
    """Whether the experts move too: in "auto" mode, when the whole checkpoint takes at most 80%
    of the memory available now (page cache counts as available: it can be dropped)."""
    if not enabled() or mode() != "auto":
        return False
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return checkpoint_bytes <= 0.8 * available


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in anonymous memory advised for huge pages."""
    nbytes = max(1, math.prod(shape) * dtype.itemsize)
    # Private: shared anonymous memory is shmem, which takes huge pages only if shmem_enabled says
    buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    # Huge pages cover only 2 MiB-aligned ranges: start the tensor on one.
    start = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % _HUGE_PAGE
    out = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start)  # keeps buf alive
    return out[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def copy(t: torch.Tensor, release_source: bool = False) -> torch.Tensor:
    """A contiguous copy of CPU tensor t in anonymous memory advised for huge pages; with
    `release_source` (t a view of a file mapping), t's pages are released as the copy passes
    them, so resident memory never holds both whole."""
    out = empty(t.shape, t.dtype)
    if not (release_source and t.is_contiguous()):
        out.copy_(t)
        if release_source:
            release(t)
        return out
    src, dst = t.view(-1), out.view(-1)
    step = max(1, _CHUNK // t.element_size())
    for i in range(0, src.numel(), step):
        dst[i:i + step].copy_(src[i:i + step])
        release(src[i:i + step])
    return out


def release(t: torch.Tensor) -> None:
    """Drop the whole pages under t, a view of a read-only file mapping that is no longer
    needed (it has been copied), from this process's mapping and from the page cache: a later
    read maps them back from the file.

    Why out of the page cache too: a copy as large as the checkpoint does not fit beside its
    cached file pages on most machines, and the kernel's reclaim of them on demand leaves free
    memory in 4 KiB pieces that huge pages cannot use. Loading the 24-layer 20b with its file
    cached got 9.1 of its 11.8 GB of weights into huge pages; dropping each copied range as it
    goes frees the memory in large runs: 11.5 GB. The cost: the next load reads the file from
    disk (here 17.6 s against 16.4 from the cache)."""
    span = (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
    page = mmap.PAGESIZE
    first = -(-t.data_ptr() // page) * page
    last = (t.data_ptr() + span) // page * page
    if last > first:
        for advice in (_MADV_PAGEOUT, _MADV_DONTNEED):
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(advice))


def huge_bytes() -> int:
    """This process's anonymous memory in huge pages (Linux's AnonHugePages), 0 where unknown."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHugePages:"))
    except (OSError, StopIteration, ValueError):
        return 0


def warn_if_short(wanted: int, got: int) -> None:
    """Say so when under 90% of `wanted` bytes of weights (1 GiB or more) got huge pages: the
    kernel fell back to 4 KiB pages, which decode reads 15-20% slower. Called from load_state_dict:
    the warning points at load()'s caller."""
    if wanted >= 1 << 30 and got < 0.9 * wanted:
        warnings.warn(f"ossgpt: {got / 2**30:.1f} of {wanted / 2**30:.1f} GiB of weights got huge pages "
                      "(free memory is fragmented, usually by other files' page cache); decode may run "
                      "up to 20% slower. Dropping the page cache before loading avoids it: "
                      "sync; echo 1 | sudo tee /proc/sys/vm/drop_caches", stacklevel=4)


@functools.cache
def _libc() -> ctypes.CDLL:
    """This process's C library (Linux only): madvise on memory Python did not map itself."""
    return ctypes.CDLL(None)
