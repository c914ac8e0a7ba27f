"""Interventions: change what the model computes inside, as context managers that compose with
each other, with tracing, and with generation (generate, chat, serve):

    with steer(model, vector, layer=12, scale=4.0):      # add 4 * vector after block 12
        ...
    with ablate_experts(model, layer=3, experts=[7]):    # expert 7 of layer 3 is never routed
    with force_experts(model, layer=3, experts=[0, 1, 2, 3]):
    with scale_sinks(model, layer=0, heads=[5], scale=0.0):   # head 5 of layer 0 loses its sink
    with patch(model, {layer: residual}):                # replace the residual stream after a block

Each is a forward hook registered in front of any other (so a Trace sees the intervened values),
removed on leaving; scale_sinks changes the sink parameters and restores them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from ..model import Transformer
from .trace import InspectError, check_layers


def _check_experts(model: Transformer, experts: Iterable[int]) -> list[int]:
    E = model.config.num_experts
    experts = sorted(set(int(e) for e in experts))
    for e in experts:
        if not 0 <= e < E:
            raise InspectError(f"expert {e} does not exist: the model has experts 0..{E - 1}")
    return experts


def _check_vector(model: Transformer, vector: torch.Tensor, what: str) -> None:
    C = model.config.hidden_size
    if vector.ndim != 1 or vector.shape[0] != C:
        raise InspectError(f"{what} has shape {tuple(vector.shape)}, but the model's residual "
                           f"stream has width {C}: a vector of shape ({C},) is needed")


@contextmanager
def steer(model: Transformer, vector: torch.Tensor, layer: int, scale: float = 1.0) -> Iterator[None]:
    """Add `scale * vector` (C,) to the residual stream after block `layer`, at every position."""
    (layer,) = check_layers(model, layer)
    _check_vector(model, vector, "the steering vector")
    if not math.isfinite(scale):
        raise InspectError(f"steering scale must be a finite number, got {scale}")
    delta = None

    def hook(module, args, out):
        nonlocal delta
        if delta is None or delta.device != out.device or delta.dtype != out.dtype:
            delta = (scale * vector.float()).to(out.device, out.dtype)
        return out + delta
    handle = model.blocks[layer].register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def patch(model: Transformer, residuals: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Replace the residual stream after each block named in `residuals` (layer -> (B, T, C),
    e.g. a Trace's ["residual", layer] of another run) on every forward call of that shape."""
    layers = check_layers(model, list(residuals))
    handles = []

    def hook(layer: int, source: torch.Tensor):
        def replace(module, args, out):
            if out.shape != source.shape:
                raise InspectError(f"patching layer {layer}: the run's residual stream has shape "
                                   f"{tuple(out.shape)}, the patch {tuple(source.shape)}")
            return source.to(out.device, out.dtype)
        return replace
    try:
        for layer in layers:
            handles.append(model.blocks[layer].register_forward_hook(hook(layer, residuals[layer]), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _router_mask(model: Transformer, layer: int, blocked: torch.Tensor) -> Iterator[None]:
    """Router logits of the experts where `blocked` (E,) is True set to -inf: never chosen."""
    def hook(module, args, out):
        return out.masked_fill(blocked.to(out.device), float("-inf"))
    handle = model.blocks[layer].mlp.router.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def ablate_experts(model: Transformer, layer: int, experts: Iterable[int]) -> Iterator[None]:
    """The `experts` of block `layer` are never routed to: every token takes its next choices
    (gates renormalised over them, as the router would with those experts absent)."""
    (layer,) = check_layers(model, layer)
    experts = _check_experts(model, experts)
    E, k = model.config.num_experts, model.config.experts_per_token
    if E - len(experts) < k:
        raise InspectError(f"cannot ablate {len(experts)} of {E} experts: each token needs {k}")
    blocked = torch.zeros(E, dtype=torch.bool)
    blocked[experts] = True
    with _router_mask(model, layer, blocked):
        yield


@contextmanager
def force_experts(model: Transformer, layer: int, experts: Iterable[int]) -> Iterator[None]:
    """Every token of block `layer` is routed to exactly these k experts, gated by the softmax of
    their own router logits (as if the router had chosen them)."""
    (layer,) = check_layers(model, layer)
    experts = _check_experts(model, experts)
    k = model.config.experts_per_token
    if len(experts) != k:
        raise InspectError(f"forcing routing needs exactly {k} distinct experts, got {len(experts)}")
    blocked = torch.ones(model.config.num_experts, dtype=torch.bool)
    blocked[experts] = False
    with _router_mask(model, layer, blocked):
        yield


@contextmanager
def scale_sinks(model: Transformer, layer: int | Iterable[int] | None = None,
                heads: Iterable[int] | None = None, scale: float = 0.0) -> Iterator[None]:
    """Multiply the weight (exp of the logit) of the sinks of `heads` (all when None) in
    `layer` (all when None) by `scale`: 0 removes them, 2 doubles the mass they draw."""
    layers = check_layers(model, layer)
    H = model.config.num_attention_heads
    heads = list(range(H)) if heads is None else sorted(set(int(h) for h in heads))
    for h in heads:
        if not 0 <= h < H:
            raise InspectError(f"head {h} does not exist: the model has heads 0..{H - 1}")
    if not (scale >= 0 and math.isfinite(scale)):
        raise InspectError(f"sink scale must be a finite number >= 0, got {scale}")
    shift = math.log(scale) if scale > 0 else float("-inf")
    saved = []
    try:
        with torch.no_grad():
            for i in layers:
                sinks = model.blocks[i].attn.sinks
                saved.append((sinks, sinks.detach().clone()))
                sinks[heads] = sinks[heads] + shift
        yield
    finally:
        with torch.no_grad():
            for sinks, original in saved:
                sinks.copy_(original)
