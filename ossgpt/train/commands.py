"""The training commands: `ossgpt train-nano`, `ossgpt finetune` and `ossgpt merge-adapter`
(their signatures and docstrings are the command line, as in ../commands.py)."""

from __future__ import annotations

import sys

from ..commands import _load
from ..errors import OssgptError


def train_nano(output: str = "checkpoints/nano", steps: int = 1500, batch_tokens: int = 4096,
               lr: float = 3e-3, seed: int = 0, install: bool = True) -> None:
    """Train the bundled demo model from scratch on synthetic harmony conversations (resumes
    from OUTPUT if a run was interrupted), then export it in the compact bundled form.

    output: directory for training checkpoints and the exported model
    steps: optimizer steps
    batch_tokens: tokens per step
    lr: peak learning rate
    seed: data and initialisation seed
    install: also write the result into the package (ossgpt/assets/nano), the default model"""
    import time
    from pathlib import Path

    from .. import nano
    from .trainer import TrainConfig

    t0 = time.time()
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, warmup_steps=min(100, steps // 10 + 1))
    lm, history = nano.train(output, cfg, batch_tokens)
    last = history[-1] if history else {}
    print(f"trained {steps} steps in {time.time() - t0:.0f} s; final loss {last.get('loss', float('nan')):.4f}"
          f", held-out loss {last.get('eval_loss', float('nan')):.4f}")
    targets = [Path(output) / "export"] + ([nano.bundled_path()] if install else [])
    for target in targets:
        nano.export(lm, target)
        size = sum(f.stat().st_size for f in target.iterdir())
        print(f"wrote {target} ({size / 1e6:.1f} MB)")


def finetune(data: str, model: str = "nano", method: str = "lora", lora_rank: int = 8,
             lora_alpha: float = 16.0, target: str = "attention,experts", steps: int | None = None,
             epochs: float | None = None, lr: float | None = None, batch_tokens: int = 4096,
             output: str = "checkpoints/finetune", resume: bool = False, val_split: float = 0.1,
             strict: bool = False, grad_checkpointing: bool = False, dtype: str = "float32",
             micro_batch_tokens: int = 4096, trainable_tokens: str = "auto", task_prompts: int = 64,
             seed: int = 0) -> None:
    """Fine-tune on chat data (JSONL of OpenAI-style messages) with LoRA or fully; loss on the
    assistant's tokens. Writes a PEFT adapter (lora) or a checkpoint (full) under OUTPUT, with
    metrics.json and curve.png (the losses and the held-out task accuracy by step).

    data: JSONL file (one {"messages": [...], "tools"?: [...]} per line) or a hub dataset name
    model: base checkpoint directory, hub id, or "nano"
    method: lora or full
    lora_rank: adapter rank
    lora_alpha: adapter scale numerator (scale = alpha / rank)
    target: comma-separated LoRA targets among attention, experts, router
    steps: optimizer steps (default: from the data's size, see --epochs)
    epochs: passes over the data (default: 3, raised to reach 100 steps, at most 10 passes)
    lr: peak learning rate (default 2e-3 for lora, 1e-4 for full)
    batch_tokens: tokens per optimizer step
    output: run directory (checkpoints, adapter or model, metrics.json, curve.png)
    resume: continue the run in OUTPUT (after an interruption or kill)
    val_split: share of conversations held out for validation loss and task accuracy
    strict: stop at the first malformed data line instead of skipping it
    grad_checkpointing: recompute activations in the backward pass (less memory)
    dtype: float32 or bfloat16 weights while training
    micro_batch_tokens: padded tokens per forward pass (gradients accumulate over a step)
    trainable_tokens: auto (the data's tokens without a trained embedding or unembedding row of
        their own get one, with lora), none, or comma-separated token ids
    task_prompts: held-out conversations answered greedily at each evaluation for the task
        accuracy (tool calls or answers matching the reference); 0 for none
    seed: data order and adapter initialisation

    Under torchrun (several processes, torch.distributed), each process takes a share of
    every step's micro-batches and gradients are summed: the same steps as one process."""
    import json
    import os
    import time
    from pathlib import Path

    import torch

    from .. import finetune as ft
    from ..lora import LoraConfig, add_lora, save_adapter
    from ..model import unpack_experts
    from .curve import plot_history
    from .trainer import TrainConfig
    from ..trainable_tokens import add_trainable_tokens

    if method not in ("lora", "full"):
        raise OssgptError(f"--method must be lora or full, got {method!r}")
    out = Path(output)
    if (out / "train_state.pt").exists() and not resume:
        raise OssgptError(f"{out} already holds a run: pass --resume to continue it, or choose "
                          f"another --output")
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank() if dist.is_initialized() else 0
    say = (lambda text: print(text, file=sys.stderr)) if rank == 0 else (lambda text: None)
    chats, problems = ft.read_chats(data, strict=strict)
    for p in problems[:10]:
        say(f"skipped {p}")
    if len(problems) > 10:
        say(f"... and {len(problems) - 10} more malformed lines skipped")
    train, val = ft.split(chats, val_split, seed)
    net = _load(model, "cpu", dtype, pack_dense=False)
    torch.manual_seed(seed)
    token_ids = ft.token_choice(trainable_tokens, net, chats, method)
    if method == "lora":
        lora_cfg = LoraConfig(rank=lora_rank, alpha=lora_alpha,
                              targets=tuple(t.strip() for t in target.split(",") if t.strip()))
        add_lora(net, lora_cfg)
        if token_ids.get("embedding"):
            add_trainable_tokens(net, token_ids)
            say(f"{len(token_ids['embedding'])} tokens of the data have no trained row of their "
                f"own in {model}: their embedding rows train too, and the unembedding rows of the "
                f"{len(token_ids['unembedding'])} of them the model learns to write")
    else:
        unpack_experts(net)
        net.requires_grad_(True)
    per_step = ft.batch_source(train, batch_tokens, seed).per_step
    steps = steps or ft.default_steps(len(train), per_step, epochs)
    say(f"{steps} steps: {steps * per_step / len(train):.1f} passes over the training data")
    cfg = TrainConfig(steps=steps, lr=lr or (ft.LORA_LR if method == "lora" else ft.FULL_LR),
                      seed=seed, warmup_steps=max(1, min(50, steps // 10)), weight_decay=0.0,
                      eval_every=max(1, steps // 10), save_every=max(1, min(50, steps // 10)))
    t0 = time.time()
    history = ft.run(net, train, val, cfg, out, batch_tokens, grad_checkpointing,
                     progress=rank == 0, micro_tokens=micro_batch_tokens, task_prompts=task_prompts)
    seconds = time.time() - t0
    if rank != 0:
        dist.destroy_process_group()
        return
    if method == "lora":
        target_dir = save_adapter(net, lora_cfg, out / "adapter", base_model=model)
    else:
        from ..checkpoint import save
        target_dir = save(net, out / "model", progress=False)
    evals = [h for h in history if "eval_loss" in h]
    last = evals[-1] if evals else {}
    metric = next((k for k in last if k.endswith("_accuracy")), None)
    metrics = {"steps": steps, "lr": cfg.lr, "seconds": round(seconds, 1),
               "train_conversations": len(train), "val_conversations": len(val),
               "skipped_lines": len(problems), "trainable_tokens": len(token_ids.get("embedding", [])),
               "trainable_unembedding_rows": len(token_ids.get("unembedding", [])),
               "final_loss": history[-1].get("loss") if history else None,
               "val_loss": last.get("eval_loss"),
               **({metric: last[metric], "task_prompts": min(len(val), task_prompts)} if metric else {})}
    if metric and evals[0]["step"] == 0 and metric in evals[0]:
        metrics[f"base_{metric}"] = evals[0][metric]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if evals:
        plot_history(history, out / "curve.png", f"ossgpt finetune {Path(data).name} ({model}, {method})")
    shown = f", {metric.replace('_', ' ')} {last[metric]:.1%}" if metric else ""
    print(f"trained {steps} steps in {seconds:.0f} s; validation loss {metrics['val_loss']}"
          f"{shown}; wrote {target_dir}")
    for warning in ft.warnings_for(history, metric):
        print(f"warning: {warning}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()


def merge_adapter(adapter: str, output: str, model: str | None = None, layout: str = "original") -> None:
    """Fold a LoRA adapter into its base model and write a full checkpoint (experts
    re-quantized to MXFP4; the quantization error is reported).

    adapter: directory with adapter_config.json and adapter_model.safetensors
    output: directory for the merged checkpoint
    model: the base checkpoint the adapter was trained on (default: the one its adapter_config.json names)
    layout: original or hf"""
    from ..checkpoint import save
    from ..lora import load_adapter, merge

    if layout not in ("original", "hf"):
        raise OssgptError(f"--layout must be original or hf, got {layout!r}")
    net = _load(model or _adapter_base(adapter), "cpu", "float32", pack_dense=False)
    load_adapter(net, adapter)
    report = merge(net)
    path = save(net, output, fmt=layout, progress=True)
    print(f"merged {adapter} into {path} ({layout} layout); MXFP4 re-quantization error "
          f"{report['requantization_error']:.2e} (relative, experts), adapter update "
          f"{report['expert_update_norm']:.2e} of the expert weights")


def _adapter_base(adapter: str) -> str:
    """The base model an adapter records (finetune writes the --model it trained on)."""
    import json
    from pathlib import Path

    path = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise OssgptError(f"{path}: cannot read the adapter's config: {e}") from None
    if not base:
        raise OssgptError(f"{path} names no base_model_name_or_path: pass --model")
    return base
