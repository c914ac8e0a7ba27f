"""Dense bf16 weights in 12 bits an element, losslessly, for faster decode on the CPU.

Why: decode reads every dense weight (attention, router, unembedding) once per token, and on a
CPU it waits on memory, not arithmetic. A bf16 weight's 8 exponent bits carry little: a row's
values span a few powers of two, so 4 bits relative to a per-row base hold nearly all of them.
The 20b model's dense weights shrink from 2.44 to 1.83 GB, and a decoded token reads 3.1 GB in
place of 3.7. Every value comes back bit for bit, so the logits are the bf16 model's.

Format of a weight (R, K), K % 64 == 0:
- `sm` (R, K) uint8: each element's sign << 7 | its 7 mantissa bits, permuted within each 64
  so that the kernel's byte unpacking yields them in order (byte 16 L + 8 h + i holds element
  32 h + 8 L + i);
- `nib` (R, K / 2) uint8: exponent - base[r] in 1..15, two to a byte (byte j of each 32:
  element j low, element 32 + j high); 0 for a zero (sign kept in sm) or a listed element;
- `base` (R,) uint8: the base whose window [base + 1, base + 15] holds most of the row's
  nonzero exponents (the lowest such base);
- the listed elements, outside the window (about 0.02% of a normal row: those 2**14 times
  smaller than its typical value, and subnormals), as CSR: `ptr` (R + 1,) int64, `col` int32,
  `val` float32; their sm and nibble are 0.

This module holds the plain reference of the format (`pack`, `unpack`) and `PackedLinear`; the
threaded C++ conversions and the decode products are in ossgpt/kernels (packed_bf16*.{h,cpp},
linear_cpu.cpp), tested against these bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .model import Linear

WINDOW = 15
DECODE_ROWS = 64      # PackedLinear's products of up to this many rows go through the kernel


@dataclass
class PackedBF16:
    sm: torch.Tensor
    nib: torch.Tensor
    base: torch.Tensor
    ptr: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.sm.shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts())

    def parts(self) -> list[torch.Tensor]:
        return [self.sm, self.nib, self.base, self.ptr, self.col, self.val]


def pack(weight: torch.Tensor) -> PackedBF16:
    """The plain reference: bf16 weight (R, K) -> its packed form."""
    R, K = weight.shape
    if weight.dtype != torch.bfloat16 or K % 64:
        raise ValueError(f"packing needs a bf16 weight with a multiple of 64 columns, got {weight.dtype} {tuple(weight.shape)}")
    bits = weight.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    exponent = (bits >> 7) & 0xFF
    zero = (bits & 0x7FFF) == 0
    hist = torch.zeros(R, 256, dtype=torch.int64).scatter_add_(1, exponent, (~zero).long())
    below = F.pad(hist.cumsum(1), (1, 0))                       # below[:, e] = count of exponents < e
    b = torch.arange(256 - WINDOW)
    base = (below[:, b + WINDOW + 1] - below[:, b + 1]).argmax(1)   # argmax: the first, lowest base
    offset = exponent - base[:, None]
    in_window = (offset >= 1) & (offset <= WINDOW)
    listed = ~in_window & ~zero
    sm = torch.where(listed, 0, ((bits >> 8) & 0x80) | (bits & 0x7F))
    nib = torch.where(in_window, offset, 0)
    sm = sm.view(R, K // 64, 2, 4, 8).transpose(2, 3).reshape(R, K).to(torch.uint8)
    nib = nib.view(R, K // 64, 2, 32)
    nib = (nib[:, :, 0] | nib[:, :, 1] << 4).reshape(R, K // 2).to(torch.uint8)
    rows, cols = listed.nonzero(as_tuple=True)
    ptr = F.pad(listed.sum(1).cumsum(0), (1, 0))
    return PackedBF16(sm, nib, base.to(torch.uint8), ptr, cols.to(torch.int32), weight[rows, cols].float())


def unpack(p: PackedBF16) -> torch.Tensor:
    """The plain reference: packed -> the bf16 weight (R, K), bit for bit."""
    R, K = p.shape
    sm = p.sm.view(R, K // 64, 4, 2, 8).transpose(2, 3).reshape(R, K).to(torch.int32)
    nib = p.nib.view(R, K // 64, 32).to(torch.int32)
    nib = torch.cat([nib & 15, nib >> 4], dim=-1).view(R, K)
    exponent = torch.where(nib > 0, nib + p.base[:, None].to(torch.int32), 0)
    bits = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F)
    bits = torch.where(bits >= 1 << 15, bits - (1 << 16), bits)          # as int16
    weight = bits.to(torch.int16).view(torch.bfloat16)
    rows = torch.repeat_interleave(torch.arange(R), p.ptr.diff())
    weight[rows, p.col.long()] = p.val.bfloat16()
    return weight


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def pack_fast(weight: torch.Tensor, empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = _empty,
              after_rows: Callable[[int, int], None] | None = None,
              rows_per_call: int = 8192) -> PackedBF16 | None:
    """`pack` through the threaded kernel, or None without it. `empty(shape, dtype)` allocates
    sm, nib and base (huge pages, when loading); `after_rows(r0, r1)` is called as each range
    of rows is done (to release a memory-mapped source as it goes)."""
    R, K = weight.shape
    ext = kernels.cpu_kernels()
    if ext is None or weight.dtype != torch.bfloat16 or K % 64:
        return None
    sm, nib, base = empty((R, K), torch.uint8), empty((R, K // 2), torch.uint8), empty((R,), torch.uint8)
    ptrs, cols, vals, listed = [torch.zeros(1, dtype=torch.int64)], [], [], 0
    for r0 in range(0, R, rows_per_call):
        r1 = min(R, r0 + rows_per_call)
        ptr, col, val = ext.pack_bf16(weight[r0:r1], sm[r0:r1], nib[r0:r1], base[r0:r1])
        ptrs.append(ptr[1:] + listed)
        cols.append(col)
        vals.append(val)
        listed += col.numel()
        if after_rows is not None:
            after_rows(r0, r1)
    return PackedBF16(sm, nib, base, torch.cat(ptrs), torch.cat(cols), torch.cat(vals))


def unpack_fast(p: PackedBF16) -> torch.Tensor:
    ext = kernels.cpu_kernels()
    if ext is None:
        return unpack(p)
    return ext.unpack_bf16(*p.parts())


class PackedLinear(nn.Module):
    """An inference-only bf16 Linear whose weight is held packed (on the CPU). Decode's products
    (up to DECODE_ROWS rows) read it packed (kernels.linear); anything else gets `weight`
    unpacked on the fly (prefill: a few ms a layer). Its state dict holds the unpacked weight,
    as nn.Linear's."""

    def __init__(self, weight: PackedBF16, bias: torch.Tensor | None = None):
        super().__init__()
        self.packed = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return unpack_fast(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        y = kernels.linear(x, self.packed, self.bias)          # any rows, on levels that take them
        if y is not None:
            return y
        if 0 < rows <= DECODE_ROWS:
            # the kernel takes 8 rows a call; more (a server's decode batch) read the weight once
            # per 8, still less than unpacking it whole (prefill's many rows amortize that)
            flat = x.reshape(rows, x.shape[-1])
            parts = [kernels.linear(flat[i:i + 8], self.packed, self.bias) for i in range(0, rows, 8)]
            if all(y is not None for y in parts):
                y = parts[0] if len(parts) == 1 else torch.cat(parts)
                return y.view(*x.shape[:-1], self.out_features)
        return kernels.plain_linear(x, self.weight.to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed={self.packed.nbytes / 2**20:.1f} MiB")


def packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.shape[1] % 64 == 0 and kernels.cpu_kernels() is not None)


def worth_it(p: PackedBF16) -> bool:
    """Whether the packed form is clearly smaller than bf16 (a row full of outliers is not)."""
    R, K = p.shape
    return p.nbytes < 0.85 * R * K * 2


def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 `model.Linear` of `model` (a loaded Transformer) by a PackedLinear
    where the kernels run and packing pays; -> bytes saved. `checkpoint.load(pack_dense=True)`
    does this while loading, without holding both forms."""
    saved = 0
    for name, module in list(model.named_modules()):
        if type(module) is not Linear or not packable(module.weight):
            continue
        p = pack_fast(module.weight)
        if not worth_it(p):
            continue
        swap_in(model, name, p)
        saved += module.weight.numel() * 2 - p.nbytes
    return saved


def swap_in(model: nn.Module, name: str, weight: PackedBF16) -> None:
    """Replace the Linear `name` of `model` by a PackedLinear holding `weight`, keeping its bias."""
    parent, _, child = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    setattr(module, child, PackedLinear(weight, getattr(module, child).bias))
