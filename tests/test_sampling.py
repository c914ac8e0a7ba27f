import pytest
import torch

from ossgpt.sampling import SamplingParams, make_generators, make_sampler


def _logprobs():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    return torch.log_softmax(logits, dim=-1)


def _draws(params, n=2000):
    sample = make_sampler(params)
    gens = make_generators(0, 1, torch.device("cpu"))
    return torch.cat([sample(_logprobs(), gens) for _ in range(n)])


def test_greedy():
    sample = make_sampler(SamplingParams(temperature=0))
    assert sample(_logprobs(), []).tolist() == [0]


def test_top_k_limits_support():
    assert set(_draws(SamplingParams(top_k=2)).tolist()) == {0, 1}


def test_top_p_keeps_smallest_nucleus():
    probs = _logprobs().exp()[0]
    # top_p just above p0 needs token 1 too; exactly p0 + p1 needs only those two
    drawn = set(_draws(SamplingParams(top_p=float(probs[0]) + 1e-3)).tolist())
    assert drawn == {0, 1}
    assert set(_draws(SamplingParams(top_p=0.01)).tolist()) == {0}


def test_temperature_one_matches_distribution():
    draws = _draws(SamplingParams(temperature=1.0), n=4000)
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    torch.testing.assert_close(freq, _logprobs().exp()[0], atol=0.03, rtol=0)


def test_low_temperature_sharpens():
    cold = _draws(SamplingParams(temperature=0.2), n=500)
    assert (cold == 0).float().mean() > 0.95


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(top_k=-1)])
def test_bad_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
