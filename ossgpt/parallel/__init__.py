"""Inference across processes on torch.distributed, launched with torchrun: expert parallel
and tensor parallel attention (sharding.py). `torchrun --nproc-per-node 2 -m ossgpt generate
...` runs the same command in each process; `from_environment` joins them."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from .sharding import ExpertParallelMoE, Shard, TensorParallelAttention

__all__ = ["ExpertParallelMoE", "Shard", "TensorParallelAttention", "from_environment",
           "under_torchrun"]


def from_environment(device: torch.device) -> Shard | None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPUs, NCCL on GPUs,
    a GPU a process) and return this process's shard; None for a single process."""
    if not under_torchrun():
        return None
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return Shard(dist.get_rank(), dist.get_world_size())


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
