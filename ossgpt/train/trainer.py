"""One training loop for every method: AdamW, warmup + cosine schedule, gradient accumulation,
gradient clipping, periodic held-out evaluation, and atomic checkpoints that resume exactly.

Exact resume: a step's batches are a pure function of (seed, step), so the data position is
just the step number; the optimizer state, the history and the RNG state travel in the
checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm


@dataclass
class Batch:
    tokens: torch.Tensor      # (B, T) input ids
    positions: torch.Tensor   # (B, T), -1 at padding
    targets: torch.Tensor     # (B, T) next-token ids
    mask: torch.Tensor        # (B, T) bool: positions whose target is trained on

    @property
    def n_targets(self) -> int:
        return int(self.mask.sum())


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 50
    seed: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on biases, norms, sinks and other vectors.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class Trainer:
    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Callable[[int], list[Batch]],
                 cfg: TrainConfig, out_dir: str | os.PathLike,
                 eval_batches: list[Batch] | None = None, progress: bool = True,
                 task: Callable[[nn.Module], dict[str, float]] | None = None):
        """`task`, when given, is run at each evaluation and its figures (e.g. a held-out
        accuracy) go into the history and the progress bar beside the loss."""
        self.model, self.loss_fn, self.batches, self.cfg = model, loss_fn, batches, cfg
        self.task = task
        self.out_dir = Path(out_dir)
        self.eval_batches = eval_batches or []
        self.progress = progress
        self.optimizer = make_optimizer(model, cfg)
        # Data parallel under torch.distributed (torchrun): each process takes every
        # world-th micro-batch of the step and gradients are summed across processes, so the
        # step is the same as one process doing all of it.
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.step = 0
        self.history: list[dict] = []

    # -- checkpoints ----------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.out_dir / "train_state.pt"

    def save(self) -> None:
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Only what trains: a LoRA run's checkpoint holds the adapter, not the frozen base.
        trainable = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        state = {"model": trainable, "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "history": self.history, "rng": torch.get_rng_state(),
                 "config": dataclasses.asdict(self.cfg)}
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)   # a kill mid-save leaves the previous checkpoint

    def resume(self) -> bool:
        """Continue from the last checkpoint in out_dir, if any."""
        if not self.state_path.is_file():
            return False
        state = torch.load(self.state_path, weights_only=False)
        result = self.model.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if result.unexpected_keys or trainable & set(result.missing_keys):
            raise ValueError(f"{self.state_path} does not match the model being trained "
                             f"(e.g. {(result.unexpected_keys or sorted(trainable & set(result.missing_keys)))[0]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]
        torch.set_rng_state(state["rng"])
        return True

    # -- the loop -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total, n = 0.0, 0
        for batch in self.eval_batches:
            total += self.loss_fn(self.model, batch).item() * batch.n_targets
            n += batch.n_targets
        self.model.train()
        return total / max(n, 1)

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.batches(self.step)     # micro-batches, gradients accumulated
        n_total = sum(b.n_targets for b in batches)
        loss_sum = 0.0
        for batch in batches[self.rank::self.world]:
            # Weight each micro-batch by its share of target tokens: the step's gradient is
            # that of the mean loss over all of them, however they were split.
            loss = self.loss_fn(self.model, batch)
            (loss * batch.n_targets / n_total).backward()
            loss_sum += loss.item() * batch.n_targets
        if self.world > 1:
            loss_sum = self._all_reduce_grads(loss_sum)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(b.tokens.numel() for b in batches)
        return {"step": self.step, "loss": loss_sum / n_total, "lr": lr,
                "grad_norm": float(grad_norm), "tokens": tokens}

    def _all_reduce_grads(self, loss_sum: float) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # this process had no micro-batch touching it
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        total = torch.tensor([loss_sum], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)

    def fit(self, resume: bool = True) -> list[dict]:
        if resume and self.resume():
            print(f"resumed from {self.state_path} at step {self.step}")
        self.model.train()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="Training", unit="step",
                   disable=not self.progress or self.rank != 0)
        shown: dict[str, str] = {}   # the last evaluation's figures, kept on the bar
        if self.step == 0 and self.eval_batches:
            # Where training starts from: the curve's first point, and the base's accuracy.
            start = {"step": 0, "eval_loss": self.evaluate()}
            if self.task is not None and self.rank == 0:
                start.update(self.task(self.model))
            self.history.append(start)
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            record = self.train_step()
            record["tokens_per_s"] = record["tokens"] / (time.perf_counter() - t0)
            if self.eval_batches and (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps):
                record["eval_loss"] = self.evaluate()
                if self.task is not None and self.rank == 0:
                    record.update(self.task(self.model))
            self.history.append(record)
            bar.update(1)
            if "eval_loss" in record:
                shown = {"eval": f"{record['eval_loss']:.3f}",
                         **{k.removesuffix("_accuracy"): f"{v:.0%}" for k, v in record.items()
                            if k.endswith("_accuracy")}}
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **shown)
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                self.save()
        bar.close()
        return self.history
