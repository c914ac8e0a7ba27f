import torch

from ossgpt.config import ModelConfig
from ossgpt.kv_cache import KVCache, SlidingKVCache, make_cache


def _kv(B, T, fill):
    return torch.full((B, T, 2, 4), float(fill)), torch.full((B, T, 2, 4), float(fill))


def test_sliding_cache_keeps_only_the_window():
    cache = SlidingKVCache(window=8)
    for step in range(5):
        k, v = _kv(2, 3, step)
        pos = torch.arange(3 * step, 3 * step + 3).expand(2, 3)
        keys, _, positions = cache.update(k, v, pos)
        # attention sees the kept slots plus the new ones
        assert keys.shape[1] == min(3 * (step + 1), 8 + 3)
    assert cache.k.shape[1] == 8
    assert cache.pos[0].tolist() == list(range(7, 15))


def test_full_cache_grows_and_keeps_everything():
    cache = KVCache()
    for step in range(100):
        k, v = _kv(1, 5, step)
        keys, values, pos = cache.update(k, v, torch.arange(5 * step, 5 * step + 5)[None])
    assert keys.shape[1] == 500 and pos[0].tolist() == list(range(500))
    assert values[0, 499, 0, 0] == 99


def test_select_drops_rows():
    cache = KVCache()
    k, v = _kv(3, 4, 1)
    k[1] = 7
    cache.update(k, v, torch.zeros(3, 4, dtype=torch.long))
    cache.select(torch.tensor([1]))
    assert cache.k.shape[0] == 1 and cache.k[0, 0, 0, 0] == 7


def test_layer_types_choose_cache_kinds():
    cache = make_cache(ModelConfig.preset("tiny"))
    kinds = [type(c) for c in cache.layers]
    assert kinds == [SlidingKVCache, KVCache, SlidingKVCache, KVCache]


def test_joining_a_running_batch_matches_running_alone(tiny_original):
    """A request prefilled apart and joined to a running batch (Cache.extend, as the server's
    continuous batching does) decodes exactly as it would alone; when the longer row leaves,
    its left padding is dropped."""
    import ossgpt
    from ossgpt.generate import decode_step, prefill

    model = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(0)
    long, short = (torch.randint(0, 1000, (n,), generator=g).tolist() for n in (300, 40))
    running = model.make_cache()
    prefill(model, [long], running)
    for step in range(3):                      # the long one decodes a while before the join
        decode_step(model, torch.tensor([7]), torch.tensor([300 + step]), running)
    joining = model.make_cache()
    prefill(model, [short], joining)
    running.extend(joining)
    logits = decode_step(model, torch.tensor([5, 9]), torch.tensor([303, 40]), running)
    alone = model(torch.tensor([short + [9]]))[0, -1]
    assert torch.allclose(logits[1], alone, rtol=1e-4, atol=1e-4)
    full = model(torch.tensor([long + [7, 7, 7, 5]]))[0, -1]
    assert torch.allclose(logits[0], full, rtol=1e-4, atol=1e-4)
    running.select(torch.tensor([1]))
    assert running.layers[1].length == 41      # the short row's slots only
    assert running.layers[0].k.shape[1] <= model.config.sliding_window
    logits = decode_step(model, torch.tensor([3]), torch.tensor([41]), running)
    assert torch.allclose(logits[0], model(torch.tensor([short + [9, 3]]))[0, -1], rtol=1e-4, atol=1e-4)


def test_sliding_cache_decodes_in_a_ring_and_gives_its_contents_in_order():
    """Once full, one token a step overwrites the oldest slot in place; attention still sees the
    last `window` positions, contents() gives them oldest first, and what the cache was given
    (a prefix cache's stored keys) is never written."""
    cache = SlidingKVCache(window=8)
    given = _kv(2, 8, 0)
    given_pos = torch.arange(8).expand(2, 8)
    cache.set_contents(*given, given_pos)
    for p in range(8, 19):
        k, v = _kv(2, 1, p)
        keys, values, pos = cache.update(k, v, torch.full((2, 1), p))
        assert keys.shape[1] == 8 and sorted(pos[0].tolist()) == list(range(p - 7, p + 1))
        assert torch.equal(keys[:, :, 0, 0], pos.float().where(pos >= 8, torch.zeros(())))
    assert cache.oldest == 11 % 8
    k, v, pos = cache.contents()
    assert pos[0].tolist() == list(range(11, 19)) and k[0, :, 0, 0].tolist() == [float(p) for p in range(11, 19)]
    assert torch.equal(given[0], torch.zeros(2, 8, 2, 4))
    # more than one token after the ring: the kept slots in order, then the new ones
    keys, _, pos = cache.update(*_kv(2, 3, 19), torch.arange(19, 22).expand(2, 3))
    assert pos[0].tolist() == list(range(11, 22)) and cache.pos[0].tolist() == list(range(14, 22))
    assert cache.oldest == 0
