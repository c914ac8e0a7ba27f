"""Trainable tokens: which ids have no row of their own, the exact cheap loss over repeated rows,
and adapters carrying token rows in PEFT's format (loaded by peft on transformers, by ossgpt,
merged, and switched per request as the server does)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import ossgpt
from ossgpt import finetune as ft
from ossgpt.compact_vocab import DistinctRowsLoss
from ossgpt.lora import (LoraConfig, add_lora, load_adapter, load_adapters, merge, save_adapter,
                         set_adapter)
from ossgpt.tokenizer import get_tokenizer
from ossgpt.trainable_tokens import (NEAR_DUPLICATE, TrainableRows, add_trainable_tokens,
                                     near_duplicate_rows, shared_row_ids, untrained_ids)
from ossgpt.train.trainer import Batch

NEW_TOOL = "get_local_time"
ANSWER = "Ψηφίδα Κρόνος"     # nano has never written Greek: no token of it has a row of its own


def _randomize(params, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def nano():
    return ossgpt.load("nano", dtype=torch.float32, progress=False)


def test_nano_has_no_rows_of_its_own_for_the_new_tool_name(nano) -> None:
    ids = get_tokenizer().encode(NEW_TOOL)
    missing = untrained_ids(nano, ids)
    assert missing, "every token of the new name already has a row: the test teaches nothing"
    # The ids without a row all get one logit, whatever the input: they cannot be told apart.
    logits = nano(torch.tensor([get_tokenizer().encode("What time is it?")]))[0, -1]
    assert len(set(logits[missing].tolist())) == 1
    shared = set(shared_row_ids(nano.unembedding.weight).tolist())
    assert len(shared) > 190_000 and not shared & set(get_tokenizer().encode(" Paris"))


def test_rows_a_few_percent_apart_are_not_rows_of_their_own(nano) -> None:
    # nano never wrote ' backwards' or 'Subtract' (they are only ever in its prompts): the
    # softmax's push-down alone left their unembedding rows 3% apart. (So were ' *' and '}'
    # before nano learned python, and a LoRA run wrote `print(7117}`.)
    tok = get_tokenizer()
    back, sub, paris = (tok.encode(s)[0] for s in (" backwards", "Subtract", " Paris"))
    w = nano.unembedding.weight.detach()
    assert not {back, sub} & set(shared_row_ids(w).tolist())        # not the same row exactly
    assert (w[back] - w[sub]).norm() < NEAR_DUPLICATE * w[back].norm()
    assert set(untrained_ids(nano, [back, sub, paris])) == {back, sub}


def test_auto_trains_unembedding_rows_only_for_the_tokens_the_model_writes(nano, tmp_path) -> None:
    # A row for an id seen only in prompts would get nothing but push-down, which Adam scales up
    # to full-size steps: it stays as it was.
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": f"What does {NEW_TOOL} return in Fennimore?"},
        {"role": "assistant", "content": ANSWER}]}) + "\n")
    chats, _ = ft.read_chats(tmp_path / "d.jsonl")
    tok = get_tokenizer()
    written = set(untrained_ids(nano, tok.encode(ANSWER)))
    prompt_only = set(untrained_ids(nano, tok.encode(f" {NEW_TOOL} Fennimore"))) - written
    assert prompt_only and written, "the data must hold both kinds of id"
    choice = ft.token_choice("auto", nano, chats, "lora")
    assert prompt_only | written <= set(choice["embedding"])
    assert written <= set(choice["unembedding"]) and not prompt_only & set(choice["unembedding"])
    assert ft.token_choice("5,7", nano, chats, "lora") == {"embedding": [5, 7], "unembedding": [5, 7]}
    assert ft.token_choice("auto", nano, chats, "full") == {} == ft.token_choice("none", nano, chats, "lora")


def test_near_duplicate_rows_equal_a_brute_force_search() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3000, 64, generator=g) * torch.rand(3000, 1, generator=g).add(0.5)
    for i, (src, eps) in enumerate([(3, 0.02), (3, 0.05), (10, 0.09), (20, 0.11), (30, 0.3)]):
        rows[100 + i] = rows[src] + eps * rows[src].norm() * F.normalize(torch.randn(64, generator=g), dim=0)
    which = torch.arange(0, 3000, 7).unique().tolist() + [3, 10, 20, 30] + list(range(100, 105))
    which = torch.tensor(sorted(set(which)))
    dist = torch.cdist(rows[which], rows)
    dist[torch.arange(len(which)), which] = float("inf")
    want = (dist <= NEAR_DUPLICATE * rows[which].norm(dim=1, keepdim=True)).any(dim=1)
    got = near_duplicate_rows(rows, which)
    assert torch.equal(got, want)
    assert set(which[got].tolist()) == {3, 10, 100, 101, 102}


def test_distinct_rows_loss_equals_the_full_vocabulary_loss(nano) -> None:
    model = ossgpt.load("nano", dtype=torch.float32, progress=False)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(rank=2))
    ids = untrained_ids(model, get_tokenizer().encode(NEW_TOOL))
    rows = add_trainable_tokens(model, ids)
    _randomize(rows, std=0.5)       # the trained rows differ from the shared one
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 200_000, (2, 40), generator=g)
    targets = torch.randint(0, 200_000, (2, 40), generator=g)
    targets[0, :4] = torch.tensor(ids[:4] if len(ids) >= 4 else (ids * 4)[:4])
    batch = Batch(tokens, torch.arange(40).expand(2, 40), targets, torch.ones(2, 40, dtype=torch.bool))
    distinct = ft.distinct_rows(model)
    assert isinstance(distinct, DistinctRowsLoss) and len(distinct) < 3000
    losses, grads = [], []
    for d in (None, distinct):
        loss = ft.chunked_loss(model, batch, chunk=32, distinct=d)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in rows])
        model.zero_grad()
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    # Float32 rounding of sums over 80 positions that mostly cancel, so measured against the
    # gradient's own scale (here 2e-5 of it at most; a wrong row count is off by its whole size).
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_adapter_with_token_rows_loads_in_peft_with_the_same_logits(tiny_original, tiny_hf,
                                                                      tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import GptOssForCausalLM, Mxfp4Config

    ids = [5, 17, 200_001]
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 1000, (2, 150), generator=g)   # past the 128 window
    tokens[:, ::7] = torch.tensor(ids).repeat(22)[:tokens[:, ::7].shape[1]]
    model = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    base_logits = model(tokens)
    config = LoraConfig(rank=4, alpha=8)
    params = add_lora(model, config) + add_trainable_tokens(model, ids)
    # Starts at the base (the new rows' logits are the same products, summed in another order).
    assert torch.allclose(model(tokens), base_logits, rtol=1e-6, atol=1e-6)
    _randomize(params)
    save_adapter(model, config, tmp_path / "adapter")
    with torch.no_grad():
        ours = model(tokens)
    assert (ours[..., ids] - base_logits[..., ids]).abs().max() > 1e-3

    hf = GptOssForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32, attn_implementation="eager",
                                           quantization_config=Mxfp4Config(dequantize=True)).eval()
    theirs_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = theirs_model(tokens).logits
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"\nossgpt vs transformers+peft, adapter with token rows: rel err {rel:.2e}")
    assert rel < 1e-4

    reloaded = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    load_adapter(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(tokens), ours, rtol=1e-5, atol=1e-5)
    trained = {t: getattr(reloaded, t).rows.detach().clone() for t in ("embedding", "unembedding")}
    merge(reloaded)   # (the experts' part is re-quantized to MXFP4: tested in test_lora.py)
    for t, rows in trained.items():
        assert type(getattr(reloaded, t)) is not TrainableRows
        assert torch.equal(getattr(reloaded, t).weight[ids], rows)

    served = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    load_adapters(served, {"ft": tmp_path / "adapter"})
    with torch.no_grad():
        set_adapter(served, "ft")
        assert torch.allclose(served(tokens), ours, rtol=1e-5, atol=1e-5)
        set_adapter(served, None)
        assert torch.allclose(served(tokens), base_logits, rtol=1e-5, atol=1e-5)
