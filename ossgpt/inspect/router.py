"""Router statistics over a data set (`ossgpt inspect router`): which experts each layer uses,
how sure the router is, which experts are chosen together, and how all of that differs between
the harmony message kinds (system, user, reasoning, final answer, tool call, tool result...).

Statistics are streamed: `RouterStats.on_record` is a Trace `on_record` callback (keep=False)
that folds each forward pass into fixed-size count arrays, so memory does not grow with the
amount of data; padding (negative positions) is never counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from ..harmony.framing import Event, Framer, Header
from ..model import Transformer
from .trace import InspectError, check_layers

# The kind of message each token belongs to. "commentary" is assistant commentary that is not a
# call (preambles); "other" is anything outside a well-formed message.
KINDS = ("system", "developer", "user", "analysis", "final", "commentary", "tool_call",
         "tool_result", "other")
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
ENTROPY_BINS = 20
GATE_BINS = 20


def message_kind(header: Header) -> str:
    """The kind (one of KINDS) of a message with this header."""
    if header.role in ("system", "developer", "user"):
        return header.role
    if header.role == "tool":
        return "tool_result"
    if header.role == "assistant":
        if header.call(None):
            return "tool_call"
        if header.channel in ("analysis", "final", "commentary"):
            return header.channel
    return "other"


def label_tokens(tokens: Sequence[int]) -> list[str]:
    """The kind of message each token of a rendered conversation belongs to. A message's
    header (<|start|> through <|message|>) and its terminator (<|end|>, <|call|>, <|return|>)
    count as the message's own tokens; a header is only read once it is complete, so its tokens
    wait for <|message|> to learn their label."""
    framer = Framer(role=None)          # a rendered conversation begins with <|start|>
    labels: list[str] = []
    pending: list[int] = []             # indices of the header being written
    current = "other"
    for i, token in enumerate(tokens):
        event = framer.push(token)
        labels.append("other")
        if event is Event.HEADER:
            pending.append(i)
            continue
        if event is Event.OPEN or (event is Event.END and pending):
            # The header is complete (or a header ended without a body): it names the kind.
            current = message_kind(framer.header)
            for j in pending:
                labels[j] = current
            pending = []
            labels[i] = current
        elif event in (Event.CONTENT, Event.END):
            labels[i] = current
        elif event is Event.LOOSE:
            current = "other"
        # STRAY and LOOSE tokens stay "other".
    return labels


def kind_ids(tokens: Sequence[int]) -> list[int]:
    return [KIND_INDEX[k] for k in label_tokens(tokens)]


class RouterStats:
    """Fixed-size accumulators of routing statistics for `layers` (all when None).

    Use as a Trace callback: set `labels` (B, T) for the batch (kind index per token, aligned
    with the left-padded batch) before each forward pass, then
    `Trace(model, layers, record=("router",), keep=False, on_record=stats.on_record)`."""

    def __init__(self, model: Transformer, layers: Sequence[int] | None = None):
        cfg = model.config
        self.layers = check_layers(model, layers)
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        L, E, K = len(self.layers), cfg.num_experts, len(KINDS)
        self.num_experts, self.k = E, cfg.experts_per_token
        self.max_entropy = math.log(E)
        # Every array is allocated here and only ever added to: memory is fixed by the shapes.
        self.tokens = np.zeros(L, np.int64)                    # routed (real) tokens per layer
        self.load = np.zeros((L, E), np.int64)                 # slots routed to each expert
        self.coactivation = np.zeros((L, E, E), np.int64)      # tokens routed to both i and j
        self.load_by_kind = np.zeros((L, K, E), np.int64)
        self.tokens_by_kind = np.zeros((L, K), np.int64)
        self.entropy_sum = np.zeros(L, np.float64)
        self.entropy_hist = np.zeros((L, ENTROPY_BINS), np.int64)   # over [0, log E]
        self.top1_sum = np.zeros(L, np.float64)                 # the top-1 expert's gate
        self.top1_hist = np.zeros((L, GATE_BINS), np.int64)         # over [0, 1]
        self.labels: torch.Tensor | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: value for name, value in vars(self).items() if isinstance(value, np.ndarray)}

    def nbytes(self) -> int:
        """Bytes held by the accumulators: the same after one batch or a million."""
        return sum(a.nbytes for a in self.arrays().values())

    # -- accumulating --------------------------------------------------------------------------

    def on_record(self, name: str, layer: int | None, tensor: torch.Tensor,
                  positions: torch.Tensor) -> None:
        if layer not in self.row:
            return
        real = (positions >= 0).reshape(-1).cpu()
        flat = tensor.reshape(-1, tensor.shape[-1]).cpu()[real]            # (N, E or k)
        if name == "router":
            self.add_logits(layer, flat)
        elif name == "experts":
            labels = self._labels(positions)[real]
            self.add_experts(layer, flat, labels)
        elif name == "gates":
            self.add_gates(layer, flat)

    def _labels(self, positions: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return torch.full((positions.numel(),), KIND_INDEX["other"], dtype=torch.long)
        if self.labels.shape != positions.shape:
            raise InspectError(f"labels of shape {tuple(self.labels.shape)} for a batch of "
                               f"shape {tuple(positions.shape)}")
        return self.labels.reshape(-1).cpu()

    def add_logits(self, layer: int, logits: torch.Tensor) -> None:
        """logits (N, E) of real tokens: the entropy of the softmax over all E experts."""
        r = self.row[layer]
        logp = torch.log_softmax(logits.double(), dim=-1)
        entropy = (-(logp.exp() * logp).sum(-1)).clamp(min=0).numpy()
        self.entropy_sum[r] += entropy.sum()
        bins = np.minimum((entropy / self.max_entropy * ENTROPY_BINS).astype(np.int64), ENTROPY_BINS - 1)
        self.entropy_hist[r] += np.bincount(bins, minlength=ENTROPY_BINS)

    def add_experts(self, layer: int, experts: torch.Tensor, labels: torch.Tensor) -> None:
        """experts (N, k) chosen for real tokens, labels (N,) their message kinds."""
        r, E = self.row[layer], self.num_experts
        onehot = torch.zeros(len(experts), E, dtype=torch.int64)
        onehot.scatter_(1, experts.long(), 1)                                  # (N, E)
        self.tokens[r] += len(experts)
        self.load[r] += onehot.sum(0).numpy()
        # Diagonal: tokens routed to the expert at all (its load); off-diagonal: both.
        self.coactivation[r] += (onehot.T @ onehot).numpy()
        by_kind = torch.zeros(len(KINDS), E, dtype=torch.int64).index_add_(0, labels.long(), onehot)
        self.load_by_kind[r] += by_kind.numpy()
        self.tokens_by_kind[r] += np.bincount(labels.numpy(), minlength=len(KINDS))

    def add_gates(self, layer: int, gates: torch.Tensor) -> None:
        """gates (N, k), sorted as the model chose (top-1 first)."""
        r = self.row[layer]
        top1 = gates[:, 0].double().numpy()
        self.top1_sum[r] += top1.sum()
        bins = np.minimum((top1 * GATE_BINS).astype(np.int64), GATE_BINS - 1)
        self.top1_hist[r] += np.bincount(bins, minlength=GATE_BINS)

    # -- reading -------------------------------------------------------------------------------

    def load_fraction(self) -> np.ndarray:
        """(L, E): each expert's share of the routed slots (rows sum to 1)."""
        return self.load / np.maximum(self.tokens * self.k, 1)[:, None]

    def load_fraction_by_kind(self) -> np.ndarray:
        """(L, K, E): the same, within the tokens of each message kind."""
        return self.load_by_kind / np.maximum(self.tokens_by_kind * self.k, 1)[..., None]

    def summary(self) -> dict:
        """Everything as JSON-ready numbers, per layer."""
        load, by_kind = self.load_fraction(), self.load_fraction_by_kind()
        layers = []
        for r, layer in enumerate(self.layers):
            n = max(int(self.tokens[r]), 1)
            kinds = {k: {"tokens": int(self.tokens_by_kind[r, i]),
                         "load": [round(float(x), 6) for x in by_kind[r, i]]}
                     for i, k in enumerate(KINDS) if self.tokens_by_kind[r, i]}
            layers.append({
                "layer": layer, "tokens": int(self.tokens[r]),
                "load": [round(float(x), 6) for x in load[r]],
                "load_counts": self.load[r].tolist(),
                "cold_experts": [int(e) for e in np.flatnonzero(self.load[r] == 0)],
                "entropy_mean": float(self.entropy_sum[r] / n),
                "entropy_hist": self.entropy_hist[r].tolist(),
                "top1_gate_mean": float(self.top1_sum[r] / n),
                "top1_gate_hist": self.top1_hist[r].tolist(),
                "coactivation": self.coactivation[r].tolist(),
                "by_kind": kinds,
            })
        return {"num_experts": self.num_experts, "experts_per_token": self.k,
                "max_entropy": self.max_entropy, "entropy_bins": ENTROPY_BINS,
                "gate_bins": GATE_BINS, "kinds": list(KINDS), "layers": layers}


class _Enough(Exception):
    """Raised by `stop_after`'s hook: the layers wanted have run."""


@contextmanager
def stop_after(model: Transformer, layer: int) -> Iterator[None]:
    """End every forward pass inside the context right after block `layer`, silently: the
    layers after it and the unembedding (B x T x vocabulary logits, by far the largest tensor
    of a pass) are never computed, so a router pass costs memory independent of the vocabulary."""
    def hook(module, args, out):
        raise _Enough
    handle = model.blocks[layer].register_forward_hook(hook)
    try:
        yield
    except _Enough:
        pass
    finally:
        handle.remove()


def pad_labels(label_rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Kind ids of each conversation, left-padded as `trace.run` pads the tokens."""
    T = max(len(r) for r in label_rows)
    out = torch.full((len(label_rows), T), KIND_INDEX["other"], dtype=torch.long)
    for i, r in enumerate(label_rows):
        out[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
    return out


# -- the report ---------------------------------------------------------------------------------

def _top(load: Sequence[float], n: int = 3) -> str:
    best = np.argsort(-np.asarray(load), kind="stable")[:n]
    return ", ".join(f"{e} ({load[e]:.0%})" for e in best)


def write_router_report(out, meta: dict, summary: dict) -> list[str]:
    """The plots and index.html of a router analysis (router.json is written beside them);
    -> the lines of a short summary for the terminal."""
    from .report import Section, bars, heatmap, heatmap_grid, write_index

    layers, E, k = summary["layers"], summary["num_experts"], summary["experts_per_token"]
    names = [str(l["layer"]) for l in layers]
    load = np.array([l["load"] for l in layers])
    heatmap(out / "load.png", load, title=f"Expert load: share of routed slots (uniform = {1 / E:.3f})",
            xlabel="expert", ylabel="layer", ylabels=names, colorbar="share of slots",
            annotate=True, vmin=0)
    entropy = [l["entropy_mean"] for l in layers]
    bars(out / "entropy.png", names, entropy, title="Routing entropy (softmax over all experts), mean per layer",
         xlabel="layer", ylabel="entropy (nats)", reference=summary["max_entropy"],
         reference_label=f"uniform over {E} experts (log {E})")
    hists = np.array([l["entropy_hist"] for l in layers], dtype=float)
    hists /= np.maximum(hists.sum(1, keepdims=True), 1)
    heatmap(out / "entropy_hist.png", hists, title="Routing entropy distribution per layer",
            xlabel=f"entropy bin (0 .. log {E}, {summary['entropy_bins']} bins)", ylabel="layer",
            ylabels=names, colorbar="share of tokens", cmap="Blues")
    # Co-activation as the share of tokens routed to both experts (the diagonal: to the expert).
    coact = [np.array(l["coactivation"]) / max(l["tokens"], 1) for l in layers]
    heatmap_grid(out / "coactivation.png", coact, [f"layer {n}" for n in names],
                 suptitle="Co-activation: share of tokens routed to both experts",
                 xlabel="expert", ylabel="expert", cmap="viridis", vmin=0)
    kinds = [kd for kd in summary["kinds"] if any(kd in l["by_kind"] for l in layers)]
    by_kind = [np.array([l["by_kind"].get(kd, {"load": [0.0] * E})["load"] for kd in kinds]) for l in layers]
    heatmap_grid(out / "load_by_kind.png", by_kind, [f"layer {n}" for n in names],
                 suptitle="Expert load by message kind: share of each kind's routed slots",
                 xlabel="expert", ylabel="message kind", cmap="viridis", vmin=0, ylabels=kinds)
    layer_rows = [[l["layer"], l["tokens"], f"{l['entropy_mean']:.3f}",
                   f"{l['entropy_mean'] / summary['max_entropy']:.0%}", f"{l['top1_gate_mean']:.3f}",
                   _top(l["load"]), f"{min(l['load']):.3f}", ", ".join(map(str, l["cold_experts"])) or "none"]
                  for l in layers]
    kind_rows = []
    for kd in kinds:
        n = layers[0]["by_kind"].get(kd, {}).get("tokens", 0)
        kind_rows.append([kd, n] + [_top(l["by_kind"][kd]["load"]) if kd in l["by_kind"] else "" for l in layers])
    intro = (f"{meta['conversations']} conversations, {meta['tokens']} tokens from {meta['data']}; "
             f"model {meta['model']}, {E} experts, {k} per token; {meta['seconds']} s; "
             f"peak RSS {meta['peak_rss_mib']} MiB, statistics {meta['stats_bytes']} bytes "
             f"(fixed, whatever the data size); {len(meta['skipped_lines'])} lines skipped.")
    sections = [
        Section("Per layer", "Entropy of the router's softmax over all experts (max log E = "
                f"{summary['max_entropy']:.3f} nats); top-1 gate: the weight of the first chosen "
                "expert after the softmax over the chosen k; cold: never chosen.",
                tables=[(["layer", "tokens", "entropy", "of max", "top-1 gate", "most used (share of slots)",
                          "least share", "cold experts"], layer_rows)],
                images=[("load.png", "expert load per layer"), ("entropy.png", "mean routing entropy per layer"),
                        ("entropy_hist.png", "routing entropy distribution")]),
        Section("By message kind", "Each token is labelled with the harmony message it belongs "
                "to (its header and terminator included): the most used experts per kind and layer.",
                tables=[(["kind", "tokens"] + [f"layer {n}" for n in names], kind_rows)],
                images=[("load_by_kind.png", "expert load by message kind")]),
        Section("Co-activation", "How often two experts are chosen together for one token.",
                images=[("coactivation.png", "co-activation per layer")]),
    ]
    if meta["skipped_lines"]:
        sections.append(Section("Skipped lines", pre="\n".join(meta["skipped_lines"][:100])))
    write_index(out, "Router analysis", intro, sections)
    lines = [f"{meta['conversations']} conversations, {meta['tokens']} tokens; peak RSS {meta['peak_rss_mib']} MiB"]
    for l in layers:
        lines.append(f"layer {l['layer']}: entropy {l['entropy_mean']:.3f} / {summary['max_entropy']:.3f}, "
                     f"top-1 gate {l['top1_gate_mean']:.3f}, most used {_top(l['load'], 2)}, "
                     f"cold: {', '.join(map(str, l['cold_experts'])) or 'none'}")
    return lines
