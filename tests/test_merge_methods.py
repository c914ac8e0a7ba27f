"""The merge methods against their papers' definitions, written out here element by element on
small tensors (TIES: trim, elect, disjoint mean; DARE: drop with p, rescale by 1/(1-p); SLERP:
the arc, the straight line for near-parallel vectors)."""

from __future__ import annotations

import math

import pytest
import torch

from ossgpt.merge import methods


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def ties_by_the_paper(base: list[float], deltas: list[list[float]], density: float) -> list[float]:
    """Yadav et al. 2023, section 3, one entry at a time: keep each task vector's top-k% by
    magnitude (ties: the earlier entry), gamma = sgn(sum of trimmed), mean of the trimmed values
    whose sign is gamma."""
    n = len(base)
    k = round(density * n)
    trimmed = []
    for d in deltas:
        top = sorted(range(n), key=lambda i: (-abs(d[i]), i))[:k]
        trimmed.append([d[i] if i in top else 0.0 for i in range(n)])
    out = []
    for p in range(n):
        total = sum(t[p] for t in trimmed)
        gamma = (total > 0) - (total < 0)
        agree = [t[p] for t in trimmed if t[p] != 0 and ((t[p] > 0) - (t[p] < 0)) == gamma]
        out.append(base[p] + (sum(agree) / len(agree) if agree else 0.0))
    return out


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_is_the_papers_trim_elect_disjoint_mean(density):
    base, deltas = rand(1, 40), [rand(1, 40, seed=s) for s in (1, 2, 3)]
    deltas[1][0, :5] = deltas[0][0, :5]            # equal magnitudes: the tie rule matters
    ours = methods.ties(base, deltas, [1.0] * 3, [density] * 3)
    want = ties_by_the_paper(base[0].tolist(), [d[0].tolist() for d in deltas], density)
    torch.testing.assert_close(ours[0], torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_trim_keeps_exactly_k_even_among_equal_magnitudes():
    delta = torch.tensor([[0.5, -0.5, 0.5, 0.25, -0.5, 0.0, 1.0, -0.25]])
    kept = methods.trim(delta, 0.5)                # k = 4: 1.0, then three of the four 0.5s
    assert torch.equal(kept, torch.tensor([[0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0]]))


def test_units_are_merged_independently():
    """Rows are separate units (experts, router rows, vocabulary rows): merging two rows
    together equals merging each alone."""
    base, deltas = rand(2, 64), [rand(2, 64, seed=s) for s in (1, 2)]
    together = methods.ties(base, deltas, [1.0, 0.5], [0.3, 0.6])
    for r in range(2):
        alone = methods.ties(base[r:r + 1], [d[r:r + 1] for d in deltas], [1.0, 0.5], [0.3, 0.6])
        assert torch.equal(together[r:r + 1], alone)
    a, b = rand(2, 64, seed=3), rand(2, 64, seed=4)
    for r in range(2):
        assert torch.equal(methods.slerp(0.3, a, b)[r:r + 1], methods.slerp(0.3, a[r:r + 1], b[r:r + 1]))


def test_weighted_ties_elects_by_the_weighted_sum():
    base = torch.zeros(1, 1)
    deltas = [torch.tensor([[1.0]]), torch.tensor([[-2.0]])]
    # unweighted: -1 wins; weighted 3:1 the positive delta wins, and is the mean alone
    assert methods.ties(base, deltas, [1.0, 1.0], [1.0, 1.0]).item() == -2.0
    assert methods.ties(base, deltas, [3.0, 1.0], [1.0, 1.0]).item() == 1.0


def test_dare_drops_with_p_and_rescales_by_one_over_one_minus_p():
    delta = rand(1, 20000)
    density = 0.3                                   # p = 0.7
    out = methods.drop_and_rescale(delta, density, torch.Generator().manual_seed(7))
    kept = out != 0
    assert torch.equal(out[kept], delta[kept] / density)
    assert abs(kept.float().mean().item() - density) < 0.015      # 20000 draws: sd 0.0032
    # seeded: the same generator state drops the same entries; its mask is rand < density
    again = methods.drop_and_rescale(delta, density, torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    mask = torch.rand(delta.shape, generator=torch.Generator().manual_seed(7)) < density
    assert torch.equal(kept, mask)
    # unbiased: the mean over many seeds approaches the delta
    mean = sum(methods.drop_and_rescale(delta[:, :200], density, torch.Generator().manual_seed(s))
               for s in range(2000)) / 2000
    assert (mean - delta[:, :200]).abs().max() < 0.25 * delta[:, :200].abs().max()


def test_dare_linear_and_dare_ties():
    base, deltas = rand(1, 50), [rand(1, 50, seed=s) for s in (1, 2)]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (10, 11)]  # noqa: E731
    kept = [methods.drop_and_rescale(d, 0.5, g) for d, g in zip(deltas, gens())]
    linear = methods.dare(base, deltas, [0.6, 0.4], [0.5, 0.5], gens(), lam=0.9)
    torch.testing.assert_close(linear, base + 0.9 * (0.6 * kept[0] + 0.4 * kept[1]))
    ties = methods.dare(base, deltas, [1.0, 1.0], [0.5, 0.5], gens(), sign_consensus=True, normalize=True)
    want = ties_by_the_paper(base[0].tolist(), [k[0].tolist() for k in kept], 1.0)
    torch.testing.assert_close(ties[0], torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_slerp_follows_the_arc():
    a, b = torch.zeros(1, 8), torch.zeros(1, 8)
    a[0, 0], b[0, 1] = 2.0, 2.0                     # orthogonal, equal norms: a quarter circle
    for t in (0.0, 0.25, 0.5, 1.0):
        out = methods.slerp(t, a, b)
        want = 2.0 * torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)])
        torch.testing.assert_close(out[0, :2], want, rtol=0, atol=1e-6)
        assert out.norm().item() == pytest.approx(2.0, abs=1e-6)      # the norm stays on the arc
    x, y = rand(1, 100, seed=1), rand(1, 100, seed=2)
    w = math.acos(((x * y).sum() / (x.norm() * y.norm())).item())
    want = (math.sin(0.3 * w) * x + math.sin(0.7 * w) * y) / math.sin(w)   # Shoemake, t = 0.7
    torch.testing.assert_close(methods.slerp(0.7, x, y), want, rtol=1e-5, atol=1e-6)


def test_slerp_falls_back_to_lerp_for_near_parallel_vectors():
    a = rand(1, 64)
    b = 3 * a + 1e-4 * rand(1, 64, seed=1)          # cos ~ 1: the arc is numerically undefined
    assert torch.equal(methods.slerp(0.25, a, b), (0.75 * a.double() + 0.25 * b.double()).float())
    assert torch.equal(methods.slerp(0.25, a, -b), (0.75 * a.double() - 0.25 * b.double()).float())
    zero = torch.zeros(1, 64)                       # no angle at all: lerp, no NaN
    assert torch.equal(methods.slerp(0.5, zero, a), (0.5 * a.double()).float())


def test_linear_and_task_arithmetic():
    x, y, base = rand(3, 5), rand(3, 5, seed=1), rand(3, 5, seed=2)
    assert torch.equal(methods.linear([x, y], [1.0, 0.0]), x)
    torch.testing.assert_close(methods.linear([x, y], [3.0, 1.0]), 0.75 * x + 0.25 * y)
    torch.testing.assert_close(methods.linear([x, y], [3.0, 1.0], normalize=False), 3 * x + y)
    torch.testing.assert_close(methods.task_arithmetic(base, [x - base, y - base], [0.5, 0.5], lam=2.0),
                               base + (x - base) + (y - base))
