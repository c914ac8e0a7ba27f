import dataclasses

import torch

from ossgpt.compact_vocab import CompactVocab
from ossgpt.config import ModelConfig
from ossgpt.nano import CompactLM, init_weights, make_batch
from ossgpt.train.trainer import Batch, TrainConfig, Trainer, lr_at

CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=2, layer_types=None,
                             sliding_window=8)
VOCAB = CompactVocab(range(50), CONFIG.vocab_size)


def batches(step: int) -> list[Batch]:
    """Deterministic per step: a learnable pattern (counting) of two lengths."""
    g = torch.Generator().manual_seed(step)
    rendered = []
    for n in (12, 20, 20):
        start = int(torch.randint(0, 30, (1,), generator=g))
        ids = list(range(start, start + n))
        rendered.append((ids, [0] * 4 + [1] * (n - 4)))
    return [make_batch(rendered[:1], VOCAB), make_batch(rendered[1:], VOCAB)]


def make_trainer(out_dir, steps=8):
    torch.manual_seed(0)
    lm = CompactLM(CONFIG, VOCAB)
    init_weights(lm)
    cfg = TrainConfig(steps=steps, lr=1e-2, warmup_steps=2, save_every=3, eval_every=4)
    return Trainer(lm, lambda m, b: m.loss(b), batches, cfg, out_dir,
                   eval_batches=batches(10_000), progress=False)


def training_steps(history: list[dict]) -> list[dict]:
    """The records of training steps; the step-0 record holds only the untrained evaluation."""
    return [h for h in history if "loss" in h]


def test_loss_decreases(tmp_path):
    history = make_trainer(tmp_path, steps=30).fit()
    assert history[0]["step"] == 0 and "eval_loss" in history[0] and "loss" not in history[0]
    steps = training_steps(history)
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert "eval_loss" in steps[3]


def test_resume_continues_exactly_as_if_never_stopped(tmp_path):
    full = make_trainer(tmp_path / "full").fit()
    interrupted = make_trainer(tmp_path / "part")
    interrupted.cfg.steps = 3
    interrupted.fit()                  # saved at step 3
    interrupted.train_step()           # progress after the last save, lost when killed
    interrupted.train_step()
    resumed = make_trainer(tmp_path / "part")          # a new process: fresh model, same dir
    history = resumed.fit(resume=True)
    assert resumed.step == 8
    # steps 4-5 are redone from the step-3 checkpoint and must match the first attempt too
    assert [round(h["loss"], 10) for h in training_steps(history)] == \
        [round(h["loss"], 10) for h in training_steps(full)]
    reference = make_trainer(tmp_path / "full")
    reference.resume()
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(),
                                 reference.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_is_atomic(tmp_path):
    trainer = make_trainer(tmp_path, steps=3)
    trainer.fit()
    assert (tmp_path / "train_state.pt").is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(100, cfg) - 0.1) < 1e-9
    assert lr_at(50, cfg) < lr_at(20, cfg)
