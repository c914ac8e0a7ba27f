"""Tracing: record what happens inside the model while it runs, for the layers asked.

    with Trace(model, layers=[0, 5], record=("residual", "router")) as trace:
        logits = run(model, prompts)            # or model(...), generate(...), a chat
    trace["residual", 5]                        # (B, T, C): the residual stream after block 5
    trace["experts", 0], trace["gates", 0]      # (B, T, k): the chosen experts and their gates

Everything is recorded through PyTorch module hooks (and Attention.observer for the attention
probabilities), registered on entering and removed on leaving: with no trace active the model
runs exactly as before, and while one is, the fast kernels still compute everything; recording
attention probabilities computes them a second time, in float32, beside the kernel.

What can be recorded (names for `record`), per layer unless said otherwise:
    residual     (B, T, C)     the residual stream after the block
    attn_out     (B, T, C)     the attention's contribution to it (o_proj's output)
    attn_probs   (B, H, T, S)  each head's attention over the S keys the query sees (cached ones
                               included), float32; rows sum to 1 - sink
    sink         (B, H, T)     the probability mass each head's sink took
    router       (B, T, E)     router logits, float32; also `experts` (B, T, k) and `gates`
                               (B, T, k), exactly as the model chose them
    embeddings   (B, T, C)     the token embeddings (the residual stream before block 0); no layer
    logits       (B, T, V)     the final logits, float32; no layer
`positions` (B, T) is always recorded: each token's position, negative for padding.

Each forward call appends; `trace[name, layer]` concatenates the calls along T (a prefill and
its decode steps, the batch unchanged), `trace.calls(name, layer)` gives them one by one. With
`keep=False` nothing is stored and `on_record(name, layer, tensor, positions)` sees each record
as it is made: statistics over any amount of data in bounded memory (ossgpt.inspect.router).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch

from ..errors import OssgptError
from ..model import Transformer

PER_LAYER = ("residual", "attn_out", "attn_probs", "sink", "router", "experts", "gates")
WHOLE_MODEL = ("embeddings", "logits", "positions")
# What a `record` entry asks for -> what it produces.
GROUPS = {"attn_probs": ("attn_probs", "sink"), "sink": ("sink",), "router": ("router", "experts", "gates")}
DEFAULT_RECORD = ("residual", "attn_out", "attn_probs", "router", "logits")

OnRecord = Callable[[str, "int | None", torch.Tensor, torch.Tensor], None]


class InspectError(OssgptError, ValueError):
    """A request ossgpt.inspect cannot honour: an unknown layer, expert, head or record name, or
    a vector of the wrong width; the message names it."""


def check_layers(model: Transformer, layers: Iterable[int] | int | None) -> list[int]:
    """The layer indices asked for (all when None), each checked against the model."""
    n = model.config.num_hidden_layers
    if layers is None:
        return list(range(n))
    layers = [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise InspectError(f"layer {layer!r} does not exist: the model has layers 0..{n - 1}")
    return layers


class Trace:
    """Records `record` for `layers` (all when None) while the context is active; see the
    module docstring. Tensors are stored detached, on `device`."""

    def __init__(self, model: Transformer, layers: Iterable[int] | int | None = None,
                 record: Sequence[str] = DEFAULT_RECORD, *, device: str | torch.device = "cpu",
                 keep: bool = True, on_record: OnRecord | None = None):
        unknown = [r for r in record if r not in PER_LAYER + WHOLE_MODEL]
        if unknown:
            raise InspectError(f"cannot record {unknown[0]!r}: choose from "
                               f"{', '.join(PER_LAYER + WHOLE_MODEL)}")
        self.model, self.layers = model, check_layers(model, layers)
        self.wanted = {name for r in record for name in GROUPS.get(r, (r,))}
        self.device, self.keep, self.on_record = torch.device(device), keep, on_record
        self.records: dict[tuple[str, int | None], list[torch.Tensor]] = defaultdict(list)
        self._handles: list = []
        self._observed: list = []
        self._positions: torch.Tensor | None = None

    # -- reading -------------------------------------------------------------------------------

    def calls(self, name: str, layer: int | None = None) -> list[torch.Tensor]:
        """The records of `name` at `layer`, one per forward call."""
        key = (name, layer)
        if key not in self.records:
            have = sorted({f"{n}" + (f"@{l}" if l is not None else "") for n, l in self.records})
            raise InspectError(f"nothing recorded for {name!r}" + (f" at layer {layer}" if layer is not None else "")
                               + f"; recorded: {', '.join(have) or 'nothing'}")
        return self.records[key]

    def __getitem__(self, key: str | tuple[str, int | None]) -> torch.Tensor:
        name, layer = (key, None) if isinstance(key, str) else key
        parts = self.calls(name, layer)
        if len(parts) == 1:
            return parts[0]
        # Along T: dimension 2 for the per-head records, 1 for the rest. attn_probs' key axis
        # grows from call to call, so its calls cannot be joined.
        if name == "attn_probs":
            raise InspectError("attn_probs was recorded over several calls; use trace.calls('attn_probs', layer)")
        return torch.cat(parts, dim=2 if name == "sink" else 1)

    # -- recording -----------------------------------------------------------------------------

    def _emit(self, name: str, layer: int | None, tensor: torch.Tensor) -> None:
        if name not in self.wanted and name != "positions":
            return
        tensor = tensor.detach().to(self.device)
        if self.on_record is not None:
            self.on_record(name, layer, tensor, self._positions)
        if self.keep:
            self.records[(name, layer)].append(tensor)

    def _hook(self, module: torch.nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def __enter__(self) -> Trace:
        model, k = self.model, self.model.config.experts_per_token

        def on_embeddings(module, args, out):
            self._emit("embeddings", None, out)

        def on_block_input(module, args):
            # Block(x, cos, sin, positions, cache): every record of this call shares them.
            self._positions = args[3].detach().to(self.device)
            if module is model.blocks[0]:
                self._emit("positions", None, args[3])

        def per_layer(layer: int, name: str):
            return lambda module, args, out: self._emit(name, layer, out)

        def on_router(layer: int):
            def hook(module, args, out):
                shape = self._positions.shape + (out.shape[-1],)
                logits = out.float().reshape(shape)                              # (B, T, E)
                self._emit("router", layer, logits)
                if {"experts", "gates"} & self.wanted:
                    # Exactly as MoE.forward chooses and weights them.
                    top = torch.topk(out, k, dim=-1, sorted=True)
                    self._emit("experts", layer, top.indices.reshape(shape[:-1] + (k,)))
                    self._emit("gates", layer, torch.softmax(top.values.float(), dim=-1).reshape(shape[:-1] + (k,)))
            return hook

        def on_attention(layer: int):
            def observe(probs: torch.Tensor, positions: torch.Tensor) -> None:
                B, K, G, T, S1 = probs.shape
                probs = probs.reshape(B, K * G, T, S1)                           # (B, H, T, S + 1)
                self._emit("attn_probs", layer, probs[..., :-1])
                self._emit("sink", layer, probs[..., -1])
            return observe

        self._hook(model.embedding, on_embeddings)
        for block in model.blocks:
            self._handles.append(block.register_forward_pre_hook(on_block_input))
        for layer in self.layers:
            block = model.blocks[layer]
            self._hook(block, per_layer(layer, "residual"))
            self._hook(block.attn.o_proj, per_layer(layer, "attn_out"))
            self._hook(block.mlp.router, on_router(layer))
            if {"attn_probs", "sink"} & self.wanted:
                if block.attn.observer is not None:
                    raise InspectError(f"layer {layer}'s attention is already being traced")
                block.attn.observer = on_attention(layer)
                self._observed.append(block.attn)
        self._hook(model.unembedding, lambda module, args, out: self._emit("logits", None, out.float()))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for attn in self._observed:
            attn.observer = None
        self._handles, self._observed = [], []


def run(model: Transformer, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over prompts of any lengths, left-padded into one batch as generation
    pads them: -> logits (B, T, V) float32 and positions (B, T), negative at padding."""
    from ..generate import left_pad

    if not prompts or any(len(p) == 0 for p in prompts):
        raise InspectError("every prompt needs at least one token")
    tokens, positions = left_pad([list(p) for p in prompts], model.device)
    with torch.inference_mode():
        return model(tokens, positions=positions), positions
