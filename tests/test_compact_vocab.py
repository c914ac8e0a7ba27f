import torch

from ossgpt.compact_vocab import CompactVocab


def test_compact_loss_equals_full_vocabulary_cross_entropy():
    torch.manual_seed(0)
    V, C, N = 1000, 16, 40
    vocab = CompactVocab([3, 17, 99, 500, 998], V)
    emb_c = torch.randn(len(vocab), C, dtype=torch.float64)
    unemb_c = torch.randn(len(vocab), C, dtype=torch.float64)
    shared = torch.randn(C, dtype=torch.float64)
    h = torch.randn(N, C, dtype=torch.float64)
    targets = torch.randint(0, len(vocab), (N,))
    loss = vocab.loss(h, unemb_c, shared, targets)

    _, full_unemb = vocab.expand(emb_c, unemb_c, shared)
    full_targets = vocab.ids[targets]
    expected = torch.nn.functional.cross_entropy(h @ full_unemb.T, full_targets)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)


def test_expand_and_compact_round_trip():
    vocab = CompactVocab([5, 2, 7, 2], 10)           # duplicates and order do not matter
    assert vocab.ids.tolist() == [2, 5, 7] and vocab.n_unused == 7
    tokens = torch.tensor([[7, 2, 5]])
    assert vocab.compact(tokens).tolist() == [[2, 0, 1]]
    emb = torch.arange(6.0).view(3, 2)
    full_emb, full_unemb = vocab.expand(emb, emb + 10, torch.tensor([-1.0, -2.0]))
    assert full_emb[vocab.ids].tolist() == emb.tolist()
    assert full_emb[0].tolist() == emb.mean(0).tolist()      # unused ids: mean embedding
    assert full_unemb[3].tolist() == [-1.0, -2.0]            # unused ids: the shared row
    try:
        vocab.compact(torch.tensor([3]))
    except ValueError as e:
        assert "3" in str(e)
    else:
        raise AssertionError("an unused id must be rejected")
