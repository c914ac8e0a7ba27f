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
