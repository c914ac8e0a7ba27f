"""Run by tests/test_parallel.py under torchrun: this process's share of the model (as `ossgpt
generate` splits it) computes the prefill and decode logits of the conftest's batch of unequal
prompts; process 0 saves them with each process's description.

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel_logits.py CKPT OUT.pt DTYPE PROMPTS.json
"""

import json
import sys

import torch
import torch.distributed as dist

import ossgpt
from ossgpt import parallel
from conftest import _decode_logits

ckpt, out, dtype, prompts = sys.argv[1:5]
shard = parallel.from_environment(torch.device("cpu"))
net = ossgpt.load(ckpt, device="cpu", dtype=getattr(torch, dtype), progress=False,
                  pack_dense=dtype == "bfloat16", shard=shard)
logits = _decode_logits(net, json.loads(open(prompts).read()))
described = [None] * shard.world
dist.all_gather_object(described, shard.describe(net))
if shard.rank == 0:
    torch.save({"logits": logits, "described": described}, out)
