"""nano: a tiny model of the real gpt-oss architecture (sinks, alternating sliding window, YaRN,
MoE with MXFP4 experts, o200k_harmony), trained by ossgpt on synthetic harmony conversations
(ossgpt/data) and bundled with the package as the default model.

Training runs over a compact vocabulary (compact_vocab.py): the data uses a few thousand of the
201,088 ids. The bundled checkpoint stores only those rows and is expanded on load."""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from . import mxfp4
from .compact_vocab import CompactVocab
from .config import ModelConfig
from .model import Experts, Transformer
from .train.trainer import Batch, TrainConfig, Trainer

NANO_CONFIG = ModelConfig(
    num_hidden_layers=4, num_experts=8, experts_per_token=2, hidden_size=256,
    intermediate_size=256, head_dim=32, num_attention_heads=8, num_key_value_heads=2)


def bundled_path() -> Path:
    return Path(str(resources.files("ossgpt") / "assets" / "nano"))


# -- the training model ------------------------------------------------------------------------

class FakeQuantExperts(Experts):
    """Dense experts that, when `enabled`, compute with their MXFP4 rounding (straight-through
    gradient), so the network learns weights that survive being stored as MXFP4."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, packed=False)
        self.enabled = False

    def weight(self, e: int, which: int, dtype: torch.dtype) -> torch.Tensor:
        w = super().weight(e, which, dtype)
        return _fake_mxfp4(w) if self.enabled else w


def _fake_mxfp4(w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        q = mxfp4.dequantize(*mxfp4.quantize(w), dtype=w.dtype)
    return w + (q - w).detach()


class CompactLM(nn.Module):
    """A gpt-oss Transformer over a compact vocabulary plus the shared unembedding row of
    every unused id."""

    def __init__(self, config: ModelConfig, vocab: CompactVocab):
        super().__init__()
        self.config, self.vocab = config, vocab
        compact_config = dataclasses.replace(config, vocab_size=len(vocab))
        self.transformer = Transformer(compact_config, packed_experts=False)
        for block in self.transformer.blocks:
            block.mlp.experts = FakeQuantExperts(compact_config)
        self.shared = nn.Parameter(torch.zeros(config.hidden_size))

    def set_fake_quant(self, on: bool) -> None:
        for block in self.transformer.blocks:
            block.mlp.experts.enabled = on

    def loss(self, batch: Batch) -> torch.Tensor:
        h = self.transformer.hidden_states(batch.tokens, positions=batch.positions)
        return self.vocab.loss(h[batch.mask], self.transformer.unembedding.weight, self.shared,
                               batch.targets[batch.mask])


def init_weights(lm: CompactLM, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) matrices, residual projections scaled by 1/sqrt(2 * layers)."""
    n_layers = lm.config.num_hidden_layers
    for name, p in lm.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif p.dim() == 1 or name.endswith("sinks"):
            nn.init.zeros_(p)
        elif name.endswith(("o_proj.weight", "mlp2_weight")):
            nn.init.normal_(p, std=std / math.sqrt(2 * n_layers))
        else:
            nn.init.normal_(p, std=std)


# -- data --------------------------------------------------------------------------------------

def make_batch(rendered: list[tuple[list[int], list[int]]], vocab: CompactVocab) -> Batch:
    """(tokens, loss mask) pairs -> a right-padded Batch in compact ids; a target is trained on
    when the token it predicts is the assistant's."""
    T = max(len(t) for t, _ in rendered) - 1
    B = len(rendered)
    tokens = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, T, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (ids, loss_mask) in enumerate(rendered):
        ids_c = vocab.compact(torch.tensor(ids))
        n = len(ids) - 1
        tokens[i, :n], targets[i, :n] = ids_c[:-1], ids_c[1:]
        positions[i, :n] = torch.arange(n)
        mask[i, :n] = torch.tensor(loss_mask[1:], dtype=torch.bool)
    return Batch(tokens, positions, targets, mask)


def _batch_seed(seed: int, step: int) -> int:
    return zlib.crc32(f"{seed}/{step}".encode())


def used_token_ids(seed: int = 0, n_samples: int = 30000) -> list[int]:
    """Every id of a large sample of the training mixture, all held-out examples, and the
    harmony special tokens."""
    from .data import FAMILIES, examples, mixture, render_example
    ids: set[int] = set(range(199998, 200013))
    it = mixture(seed=10_000_019 + seed)
    for _ in range(n_samples):
        ids.update(render_example(next(it))[0])
    for family in FAMILIES:
        for ex in examples(family, "test", seed):
            ids.update(render_example(ex)[0])
    return sorted(ids)


def batch_source(vocab: CompactVocab, batch_tokens: int, seed: int, micro_tokens: int = 4096):
    """step -> micro-batches holding about `batch_tokens` tokens of examples: a pure function of
    its arguments, so training resumes exactly. Examples are sorted by length and cut into
    micro-batches of at most `micro_tokens` padded tokens, so little compute goes to padding."""
    from .data import mixture, render_example

    def get(step: int) -> list[Batch]:
        it = mixture(seed=_batch_seed(seed, step))
        rendered, total = [], 0
        while total < batch_tokens:
            rendered.append(render_example(next(it), check=False))
            total += len(rendered[-1][0])
        rendered.sort(key=lambda r: len(r[0]))
        batches, group = [], []
        for r in rendered:
            if group and (len(group) + 1) * len(r[0]) > micro_tokens:
                batches.append(make_batch(group, vocab))
                group = []
            group.append(r)
        return batches + [make_batch(group, vocab)]

    return get


# -- train, export ---------------------------------------------------------------------------

def train(out_dir: str | Path, cfg: TrainConfig, batch_tokens: int = 4096,
          config: ModelConfig = NANO_CONFIG, fake_quant_from: float = 0.7,
          progress: bool = True) -> tuple[CompactLM, list[dict]]:
    """Train nano from scratch (or resume in out_dir); the last (1 - fake_quant_from) of the
    steps train against MXFP4-rounded experts."""
    from .data import FAMILIES, examples, render_example

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab_ids.json"
    if not vocab_file.is_file():
        vocab_file.write_text(json.dumps(used_token_ids(cfg.seed)))
    vocab = CompactVocab(json.loads(vocab_file.read_text()), config.vocab_size)
    torch.manual_seed(cfg.seed)
    lm = CompactLM(config, vocab)
    init_weights(lm)
    held_out = [render_example(ex) for f in FAMILIES for ex in list(examples(f, "test", cfg.seed))[:16]]
    eval_batches = [make_batch(held_out[i:i + 16], vocab) for i in range(0, len(held_out), 16)]
    batches = batch_source(vocab, batch_tokens, cfg.seed)
    quant_step = int(cfg.steps * fake_quant_from)

    def loss_fn(model: CompactLM, batch: Batch) -> torch.Tensor:
        model.set_fake_quant(trainer.step >= quant_step)
        return model.loss(batch)

    trainer = Trainer(lm, loss_fn, batches, cfg, out_dir, eval_batches, progress)
    # Tiny gradients of a small model go subnormal, and subnormal float math is very slow on CPUs.
    flush = torch.set_flush_denormal(True)
    try:
        history = trainer.fit(resume=True)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    lm.set_fake_quant(False)
    return lm, history


def export(lm: CompactLM, directory: str | Path) -> Path:
    """Write the bundled form: original layout, MXFP4 experts, compact vocabulary."""
    from .checkpoint.load import COMPACT_IDS, COMPACT_SHARED
    from .checkpoint.save import write_checkpoint

    state = lm.transformer.state_dict()
    packed: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith(("mlp1_weight", "mlp2_weight")):
            blocks, scales = mxfp4.quantize(t.detach())
            base = name.removesuffix("_weight")
            packed[base + "_blocks"], packed[base + "_scales"] = blocks, scales
        else:
            packed[name] = t.detach()
    extra = {COMPACT_IDS: lm.vocab.ids.clone(), COMPACT_SHARED: lm.shared.detach().bfloat16()}
    return write_checkpoint(directory, lm.config, packed.__getitem__, packed=True, progress=False,
                            extra=extra, stored_vocab_rows=len(lm.vocab))


def bundle(model: Transformer, directory: str | Path) -> Path:
    """Write a nano-shaped model loaded at full vocabulary (e.g. fine-tuned and merged) in the
    bundled compact form: the rows of the ids it uses (their rows differ from the ones every
    unused id shares), the shared unembedding row, MXFP4 experts as they are."""
    from .checkpoint.load import COMPACT_IDS, COMPACT_SHARED
    from .checkpoint.save import write_checkpoint

    if not model.blocks[0].mlp.experts.packed:
        raise ValueError("bundle wants MXFP4 experts (merge-adapter writes them)")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    def unused_row(table: torch.Tensor) -> torch.Tensor:   # the row most ids have
        rows, counts = torch.unique(table, dim=0, return_counts=True)
        return rows[counts.argmax()]

    emb, unemb = state["embedding.weight"], state["unembedding.weight"]
    shared = unused_row(unemb)
    used = (unemb != shared).any(dim=1) | (emb != unused_row(emb)).any(dim=1)
    ids = torch.nonzero(used).flatten()
    for table in ("embedding.weight", "unembedding.weight"):
        state[table] = state[table][ids]
    extra = {COMPACT_IDS: ids, COMPACT_SHARED: shared.bfloat16()}
    return write_checkpoint(directory, model.config, state.__getitem__, packed=True, progress=False,
                            extra=extra, stored_vocab_rows=len(ids))


# -- evaluation --------------------------------------------------------------------------------

def evaluate(model: Transformer, n_per_family: int = 200, seed: int = 0, batch_size: int = 32,
             max_tokens: int = 160, progress: bool = True,
             families: tuple[str, ...] | None = None,
             builtin_tools: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Greedy replies to held-out prompts of every family -> per family: accuracy and the rate
    of well-formed harmony (analysis + final, or a tool call with valid JSON); for families
    with tool calls also `right_tool`, over the `calls` prompts that expect one. `builtin_tools`
    ("browser", "python") declares those in every prompt, as `ossgpt chat --tools` does: a
    question that needs no tool must still be answered, not sent to one."""
    from tqdm import tqdm

    from .data import FAMILIES, examples, prompt_tokens, score
    from .generate import generate
    from .harmony import parse_reply, stop_tokens
    from .sampling import SamplingParams

    cases = [ex for f in families or FAMILIES for ex in list(examples(f, "test", seed))[:n_per_family]]
    if builtin_tools:
        cases = [dataclasses.replace(ex, builtin_tools=builtin_tools) for ex in cases]
    results: dict[str, list[dict]] = {}
    bar = tqdm(total=len(cases), desc="Evaluating", unit="prompt", disable=not progress)
    for i in range(0, len(cases), batch_size):
        chunk = cases[i:i + batch_size]
        replies: list[list[int]] = [[] for _ in chunk]
        for event in generate(model, [prompt_tokens(ex) for ex in chunk], max_tokens,
                              SamplingParams(temperature=0), stop_tokens()):
            replies[event.row].append(event.token)
        for ex, tokens in zip(chunk, replies):
            results.setdefault(ex.family, []).append(score(ex, parse_reply(tokens)))
        bar.update(len(chunk))
    bar.close()
    out = {f: {"n": len(r), "accuracy": sum(x["correct"] for x in r) / len(r),
               "well_formed": sum(x["well_formed"] for x in r) / len(r)} for f, r in results.items()}
    for f, r in results.items():
        if calls := [x["right_tool"] for x in r if "right_tool" in x]:
            out[f]["calls"] = len(calls)
            out[f]["right_tool"] = sum(calls) / len(calls)
    return out
