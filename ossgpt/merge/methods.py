"""Model-merging methods on float32 tensors, as their papers define them.

Every function works on `units`: a tensor (U, N) of U independent rows, each merged on its own.
A unit is what a method's statistics are taken over (TIES' magnitude trim, SLERP's angle): one
expert's weight matrix, one expert's router row, one token's embedding row, or a whole small
tensor (merge/driver.py decides). Task vectors ("deltas") are a model minus the base model.

- linear: the weighted mean (Wortsman et al. 2022, "Model soups").
- task arithmetic: base + lambda * sum_i w_i delta_i (Ilharco et al. 2023, "Editing models with
  task arithmetic").
- TIES (Yadav et al. 2023, "TIES-Merging"): trim each delta to its top-k magnitudes (k = density
  * N), elect each entry's sign as that of the (weighted) sum of the trimmed deltas, and take
  the mean over only the deltas that agree with it (the "disjoint mean").
- DARE (Yu et al. 2024, "Language models are super Mario"): drop each delta entry with
  probability p = 1 - density and rescale the survivors by 1 / (1 - p); then sum (dare_linear)
  or elect signs and take the disjoint mean as TIES does (dare_ties).
- SLERP (Shoemake 1985): the point a fraction t along the great-circle arc from a to b,
  sin((1-t) W) / sin W * a + sin(t W) / sin W * b with W the angle between them; the straight
  line where they are (anti)parallel, where the arc is numerically undefined.
The weighted variants and `normalize` follow mergekit, whose configs these are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# |cos W| above which SLERP falls back to linear interpolation (mergekit's DOT_THRESHOLD):
# sin W there is < 0.032 and the arc's coefficients lose precision.
PARALLEL = 0.9995


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out


def linear(units: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize`."""
    out = weighted_sum(units, weights)
    if normalize:
        total = sum(weights)
        if total == 0:
            raise ValueError("the weights sum to 0: nothing to normalize by")
        out /= total
    return out


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep each row's k = round(density * N) largest magnitudes, zero the rest.
    Exactly k: magnitudes equal to the k-th largest (common: MXFP4 weights lie on a coarse
    grid) are kept first come, first served."""
    n = delta.shape[-1]
    k = round(density * n)
    if k >= n:
        return delta
    if k == 0:
        return torch.zeros_like(delta)
    mag = delta.abs()
    # the k-th largest (kthvalue: ~10x faster than topk for a 16M-value expert)
    threshold = mag.kthvalue(n - k + 1, dim=-1, keepdim=True).values
    above = mag > threshold
    tied = mag == threshold
    room = k - above.sum(-1, keepdim=True)
    keep = above | (tied & (tied.cumsum(-1) <= room))
    return torch.where(keep, delta, 0.0)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability `density` (dropped with p = 1 - density), the kept
    ones scaled by 1 / density, so the expected delta is unchanged."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, 0.0)


def disjoint_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float],
                  normalize: bool = True) -> torch.Tensor:
    """TIES' sign election and disjoint merge: each entry's sign is that of sum_i w_i delta_i;
    the result sums w_i delta_i over the deltas of that sign (zeros take no part), divided by
    the sum of their weights when `normalize` (the paper's mean, with unit weights)."""
    elected = torch.sign(weighted_sum(deltas, weights))
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        agree = (torch.sign(d) == elected) & (d != 0)
        total += torch.where(agree, d * w, 0.0)
        count += agree * w
    if not normalize:
        return total
    return torch.where(count != 0, total / torch.where(count != 0, count, 1.0), 0.0)


def task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float],
                    lam: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """base + lambda * sum_i w_i delta_i (divided by sum_i w_i when `normalize`)."""
    return base + lam * linear(deltas, weights, normalize)


def ties(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], lam: float = 1.0, normalize: bool = True) -> torch.Tensor:
    trimmed = [trim(d, k) for d, k in zip(deltas, densities)]
    return base + lam * disjoint_mean(trimmed, weights, normalize)


def dare(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], generators: Sequence[torch.Generator], lam: float = 1.0,
         sign_consensus: bool = False, normalize: bool = False) -> torch.Tensor:
    """dare_linear (`sign_consensus` False) or dare_ties (True)."""
    kept = [drop_and_rescale(d, k, g) for d, k, g in zip(deltas, densities, generators)]
    merged = disjoint_mean(kept, weights, normalize) if sign_consensus else linear(kept, weights, normalize)
    return base + lam * merged


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each row of a (t = 0) and b (t = 1) interpolated along the arc between them."""
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1), b64.norm(dim=-1)
    cos = ((a64 * b64).sum(-1) / (na * nb)).clamp(-1, 1)
    omega = torch.arccos(cos)
    arc = (cos.abs() <= PARALLEL) & (na > 0) & (nb > 0)
    sin = torch.where(arc, torch.sin(omega), 1.0)
    s0 = torch.where(arc, torch.sin((1 - t) * omega) / sin, 1 - t)
    s1 = torch.where(arc, torch.sin(t * omega) / sin, t)
    return (s0.unsqueeze(-1) * a64 + s1.unsqueeze(-1) * b64).to(a.dtype)
