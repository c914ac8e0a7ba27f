import torch
import pytest

import ossgpt
from ossgpt.generate import generate, left_pad, prefill
from ossgpt.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tiny_original):
    return ossgpt.load(tiny_original, device="cpu", dtype=torch.float32, progress=False)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 199998, (n,), generator=g).tolist() for n in lengths]


def _greedy_reference(model, prompt, n):
    """Greedy continuation by the plain full-sequence forward, no cache."""
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_batched_greedy_equals_plain_forward(model):
    # unequal prompts, one longer than 2x the sliding window, decoding across the window edge
    prompts = _prompts([290, 40, 127])
    events = list(generate(model, prompts, max_tokens=12, sampling=SamplingParams(temperature=0)))
    for row, prompt in enumerate(prompts):
        got = [e.token for e in events if e.row == row]
        assert got == _greedy_reference(model, prompt, 12)


def test_prefill_chunks_do_not_change_logits(model):
    prompts = _prompts([300, 170])
    a = prefill(model, prompts, model.make_cache(), chunk_size=512)
    b = prefill(model, prompts, model.make_cache(), chunk_size=37)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        ref = model(torch.tensor([prompts[1]]))[0, -1]
    torch.testing.assert_close(a[1], ref, rtol=1e-5, atol=1e-5)


def test_logprobs_are_the_models(model):
    prompt = _prompts([50])[0]
    events = list(generate(model, [prompt], max_tokens=3, top_logprobs=3,
                           sampling=SamplingParams(temperature=1.0, seed=1)))
    seq = prompt + [e.token for e in events]
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([seq]))[0], dim=-1)
    for i, e in enumerate(events):
        expected = logprobs[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(expected[e.token].item(), abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == expected.topk(3).indices.tolist()


def test_stop_tokens_and_max_tokens(model):
    prompts = _prompts([30, 60])
    free = [e.token for e in generate(model, prompts[:1], 8, SamplingParams(temperature=0))]
    stop = free[3]
    events = list(generate(model, prompts, 8, SamplingParams(temperature=0), stop_tokens=[stop]))
    row0 = [e for e in events if e.row == 0]
    assert [e.token for e in row0] == free[:free.index(stop) + 1]
    assert row0[-1].finish_reason == "stop"
    row1 = [e for e in events if e.row == 1]
    assert row1[-1].finish_reason in ("stop", "length")
    assert len(row1) <= 8 and all(e.finish_reason is None for e in row1[:-1])


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    prompts = _prompts([20, 45, 33])
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=100, seed=7)
    alone = [e.token for e in generate(model, prompts[:1], 6, params)]
    again = [e.token for e in generate(model, prompts[:1], 6, params)]
    batched = [e.token for e in generate(model, prompts, 6, params) if e.row == 0]
    assert alone == again == batched
    other = [e.token for e in generate(model, prompts[:1], 6, SamplingParams(seed=8))]
    assert other != alone


def test_left_pad_positions():
    tokens, positions = left_pad([[5, 6, 7], [9]], torch.device("cpu"))
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert positions.tolist() == [[0, 1, 2], [-1, -1, 0]]
