"""The `ossgpt inspect` commands: typed functions whose signatures are their options (cli.py
reads them), each writing JSON, PNG plots and an index.html into --out. Heavy imports happen
inside the functions, so `ossgpt --help` stays quick."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import OssgptError


def _ints(flag: str, text: str | None) -> list[int] | None:
    """`--layers 0,3` -> [0, 3]; None when not given."""
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OssgptError(f"{flag} wants comma-separated integers, e.g. 0,3; got {text!r}") from None
    if not values:
        raise OssgptError(f"{flag} wants comma-separated integers, e.g. 0,3; got {text!r}")
    return values


def _floats(flag: str, text: str) -> list[float]:
    import math

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OssgptError(f"{flag} wants comma-separated numbers, e.g. -4,0,4; got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise OssgptError(f"{flag} wants comma-separated finite numbers, e.g. -4,0,4; got {text!r}")
    return values


def _at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise OssgptError(f"{flag} must be >= 1, got {value}")


def _model(model: str, device: str, dtype: str):
    from ..commands import _load

    return _load(model, device, dtype)


def _prompt_tokens(text: str, chat: bool) -> list[int]:
    """A prompt as the model sees it: a harmony user message ready for the reply (no date, so
    runs are reproducible), or the raw text."""
    from ..harmony import render_prompt
    from ..tokenizer import get_tokenizer

    if not text:
        raise OssgptError("the prompt is empty")
    if chat:
        return render_prompt([{"role": "user", "content": text}], date="")
    return get_tokenizer().encode(text)


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def _done(out: Path, summary: list[str]) -> None:
    for line in summary:
        print(line)
    print(f"Report: {(out / 'index.html').resolve()}")


def router(data: str, model: str = "nano", out: str = "runs/router", layers: str | None = None,
           limit: int | None = None, batch: int = 8, strict: bool = True,
           device: str = "auto", dtype: str = "bfloat16") -> None:
    """Expert routing over a chat data set: load per expert, routing entropy, top-1 gate,
    co-activation, cold experts, and load by harmony message kind (system, user, reasoning,
    final answer, tool call, tool result...).

    data: JSONL of conversations in the fine-tuning format ({"messages": [...], "tools"?: [...]})
    model: nano (bundled), a checkpoint directory or hub id
    out: folder for router.json, the plots and index.html
    layers: comma-separated layers to analyse (default: all)
    limit: analyse only the first LIMIT conversations
    batch: conversations per forward pass (left-padded together)
    strict: stop at a malformed data line (default); --no-strict skips it with a warning
    device: cpu, cuda or auto
    dtype: bfloat16, float32 or float16"""
    import itertools

    from tqdm import tqdm

    from ..finetune import iter_chats
    from .router import RouterStats, kind_ids, pad_labels, stop_after
    from .trace import Trace, check_layers, run

    _at_least_one("--batch", batch)
    wanted = _ints("--layers", layers)
    # Conversations are read as they are routed, a window at a time: memory does not grow
    # with the data. A statistic over a silently shrunken data set misleads, so a bad line
    # stops the run unless --no-strict asks for skipping (every skipped line is then named).
    problems: list[str] = []
    chats = itertools.islice(iter_chats(data, strict, problems), limit)
    window = list(itertools.islice(chats, 64 * batch))     # read before loading: fail fast
    if not window:
        raise OssgptError(f"{data}: no usable conversations" +
                          (f" (first problem: {problems[0]})" if problems else ""))
    net = _model(model, device, dtype)
    stats = RouterStats(net, check_layers(net, wanted))
    out_dir = Path(out)
    start = time.perf_counter()
    n_chats = n_tokens = 0
    with Trace(net, stats.layers, record=("router",), keep=False, on_record=stats.on_record), \
            tqdm(total=limit, desc="Routing", unit="chat", file=sys.stderr) as bar:
        while window:
            # Similar lengths together waste less on padding; order changes no statistic.
            window.sort(key=lambda c: len(c.tokens))
            for b in range(0, len(window), batch):
                group = [c.tokens for c in window[b:b + batch]]
                stats.labels = pad_labels([kind_ids(t) for t in group])
                with stop_after(net, max(stats.layers)):
                    run(net, group)
                n_tokens += sum(len(t) for t in group)
                bar.update(len(group))
            n_chats += len(window)
            window = list(itertools.islice(chats, 64 * batch))
    for p in problems[:10]:
        print(f"skipped {p}", file=sys.stderr)
    if len(problems) > 10:
        print(f"... and {len(problems) - 10} more malformed lines skipped", file=sys.stderr)
    seconds = time.perf_counter() - start
    summary = stats.summary()
    meta = {"data": str(data), "model": model, "conversations": n_chats, "tokens": n_tokens,
            "skipped_lines": problems, "seconds": round(seconds, 2), "batch": batch,
            "dtype": dtype, "peak_rss_mib": _peak_rss_mib(), "stats_bytes": stats.nbytes()}
    from .report import write_json
    from .router import write_router_report

    write_json(out_dir / "router.json", {**meta, **summary})
    lines = write_router_report(out_dir, meta, summary)
    _done(out_dir, lines)


def lens(prompt: str, model: str = "nano", out: str = "runs/lens", top: int = 5,
         chat: bool = True, layers: str | None = None, positions: int = 40,
         device: str = "auto", dtype: str = "bfloat16") -> None:
    """The logit lens: each layer's most likely next tokens at every position of a prompt.

    prompt: the text (a user message, or raw text with --no-chat)
    model: nano (bundled), a checkpoint directory or hub id
    out: folder for lens.json, lens.png and index.html
    top: tokens kept per layer and position
    chat: render the prompt as a harmony user message (--no-chat: raw text)
    layers: comma-separated layers (default: all)
    positions: the plot shows the last POSITIONS positions (the JSON has all)
    device: cpu, cuda or auto
    dtype: bfloat16, float32 or float16"""
    from ..tokenizer import get_tokenizer
    from .lens import logit_lens
    from .report import Section, cell_text, text_grid, write_index, write_json

    _at_least_one("--top", top)
    _at_least_one("--positions", positions)
    wanted = _ints("--layers", layers)
    tokens = _prompt_tokens(prompt, chat)
    net = _model(model, device, dtype)
    top = min(top, net.config.vocab_size)
    result = logit_lens(net, [tokens], wanted, top)
    tok = get_tokenizer()
    text = [tok.decode([t]) for t in tokens]
    ids, probs = result.top_ids[:, 0].tolist(), result.top_probs[:, 0].tolist()   # (L, T, top)
    per_layer = [{"layer": layer,
                  "top_ids": ids[i], "top_tokens": [[tok.decode([t]) for t in row] for row in ids[i]],
                  "top_probs": [[round(p, 6) for p in row] for row in probs[i]]}
                 for i, layer in enumerate(result.layers)]
    out_dir = Path(out)
    write_json(out_dir / "lens.json", {"model": model, "prompt": prompt, "chat": chat,
                                       "token_ids": tokens, "tokens": text, "top": top,
                                       "layers": per_layer})
    shown = range(max(0, len(tokens) - positions), len(tokens))
    import numpy as np

    values = np.array([[probs[i][t][0] for t in shown] for i in range(len(result.layers))])
    cells = [[cell_text(tok.decode([ids[i][t][0]])) for t in shown] for i in range(len(result.layers))]
    text_grid(out_dir / "lens.png", values, cells, title="Logit lens: top next token after each layer",
              xlabels=[f"{t}:{cell_text(text[t])[:10]}" for t in shown],
              ylabels=[f"layer {layer}" for layer in result.layers],
              xlabel="input position: token", ylabel="after block", colorbar="probability of the top token")
    last = len(tokens) - 1
    rows = [[f"layer {layer}"] + [f"{cell_text(per_layer[i]['top_tokens'][last][j])} "
                                  f"({probs[i][last][j]:.3f})" for j in range(top)]
            for i, layer in enumerate(result.layers)]
    write_index(out_dir, "Logit lens", f"Prompt ({'harmony user message' if chat else 'raw text'}, "
                f"{len(tokens)} tokens): {prompt}", [
                    Section("Next token at the last position", "What each layer would predict "
                            "after the whole prompt; the last layer's row is the model's output.",
                            tables=[(["layer"] + [f"#{j + 1}" for j in range(top)], rows)]),
                    Section("Top token per layer and position",
                            f"The last {len(shown)} positions; colour: its probability.",
                            images=[("lens.png", "logit lens grid (layers x positions)")])])
    final = per_layer[-1]["top_tokens"][last][0]
    _done(out_dir, [f"{len(tokens)} tokens, {len(result.layers)} layers; after the last block the "
                    f"top next token is {final!r} ({probs[-1][last][0]:.3f})"])


def attention(prompt: str, model: str = "nano", out: str = "runs/attention",
              layers: str | None = None, chat: bool = True, window: int = 48,
              device: str = "auto", dtype: str = "bfloat16") -> None:
    """Attention sinks and maps: the probability mass each head gives its learned sink, and each
    head's attention over the keys (sink included) for the selected layers.

    prompt: the text (a user message, or raw text with --no-chat)
    model: nano (bundled), a checkpoint directory or hub id
    out: folder for attention.json, the plots and index.html
    layers: comma-separated layers whose attention maps are drawn (default: all); sink mass is reported for every layer
    chat: render the prompt as a harmony user message (--no-chat: raw text)
    window: the maps show the last WINDOW queries and keys
    device: cpu, cuda or auto
    dtype: bfloat16, float32 or float16"""
    import numpy as np

    from ..tokenizer import get_tokenizer
    from .report import Section, cell_text, heatmap, heatmap_grid, write_index, write_json
    from .trace import Trace, check_layers, run

    _at_least_one("--window", window)
    wanted = _ints("--layers", layers)
    tokens = _prompt_tokens(prompt, chat)
    net = _model(model, device, dtype)
    drawn = check_layers(net, wanted)
    every = check_layers(net, None)
    with Trace(net, every, record=("attn_probs",)) as trace:
        run(net, [tokens])
    types = net.config.layer_types
    # One prompt, no padding: every query position is real.
    sink = np.stack([trace["sink", layer][0].float().mean(-1).numpy() for layer in every])   # (L, H)
    H, T = sink.shape[1], len(tokens)
    out_dir = Path(out)
    heatmap(out_dir / "sink_mass.png", sink, title="Sink mass per head (mean over query positions)",
            xlabel="head", ylabel="layer", ylabels=[f"{l} ({types[l].split('_')[0]})" for l in every],
            colorbar="probability on the sink", annotate=True, vmin=0, vmax=1)
    tok = get_tokenizer()
    text = [cell_text(tok.decode([t]))[:8] for t in tokens]
    lo = max(0, T - window)
    maps, images = {}, []
    for layer in drawn:
        probs = trace["attn_probs", layer][0].float()                     # (H, T, S=T)
        s = trace["sink", layer][0].float()                                # (H, T)
        # Column 0: the sink; then the keys of the window (the mass on earlier keys is left out).
        shown = np.concatenate([s[:, lo:, None].numpy(), probs[:, lo:, lo:].numpy()], axis=-1)
        maps[layer] = np.round(shown, 5).tolist()
        name = f"attention_layer{layer}.png"
        heatmap_grid(out_dir / name, list(shown), [f"head {h}" for h in range(H)],
                     suptitle=f"Layer {layer} ({types[layer]}): queries x [sink, keys {lo}..{T - 1}]",
                     xlabel="key (column 0: sink)", ylabel="query", cmap="magma", vmin=0, vmax=1)
        images.append((name, f"layer {layer}: each head's attention, sink in column 0"))
    write_json(out_dir / "attention.json", {
        "model": model, "prompt": prompt, "chat": chat, "token_ids": tokens,
        "tokens": [tok.decode([t]) for t in tokens], "layer_types": [types[l] for l in every],
        "sink_mass": {str(l): [round(float(x), 6) for x in sink[i]] for i, l in enumerate(every)},
        "window": [lo, T], "maps": {str(l): m for l, m in maps.items()},
        "maps_layout": "[head][query lo..T-1][0: sink, then keys lo..T-1]"})
    rows = [[layer, types[layer], f"{sink[i].mean():.3f}", int(sink[i].argmax()), f"{sink[i].max():.3f}",
             int(sink[i].argmin()), f"{sink[i].min():.3f}"] for i, layer in enumerate(every)]
    write_index(out_dir, "Attention sinks and maps", f"Prompt ({'harmony user message' if chat else 'raw text'}, "
                f"{T} tokens): {prompt}", [
                    Section("Sink mass", "The share of each head's attention that goes to its "
                            "learned sink (gpt-oss's per-head sink logit), averaged over the "
                            "prompt's positions.",
                            tables=[(["layer", "type", "mean", "most sink head", "mass",
                                      "least sink head", "mass"], rows)],
                            images=[("sink_mass.png", "sink mass per layer and head")]),
                    Section("Attention maps", f"Queries and keys {lo}..{T - 1} "
                            f"({' '.join(text[lo:])[:300]}); column 0 is the sink.", images=images)])
    i, h = np.unravel_index(sink.argmax(), sink.shape)
    _done(out_dir, [f"{T} tokens; mean sink mass {sink.mean():.3f}; the most sink-bound head is "
                    f"layer {every[i]} head {h} ({sink[i, h]:.3f})"])


def _prompt_file(flag: str, path: str, chat: bool) -> tuple[list[str], list[list[int]]]:
    try:
        lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise OssgptError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    if not lines:
        raise OssgptError(f"{flag} {path}: no prompts (one per line)")
    return lines, [_prompt_tokens(l, chat) for l in lines]


def steer(positive: str, negative: str, layer: int, model: str = "nano", out: str = "runs/steer",
          scales: str = "-4,0,4", prompt: str = "Tell me about yourself.", max_tokens: int = 64,
          position: str = "mean", chat: bool = True, device: str = "auto",
          dtype: str = "bfloat16") -> None:
    """A steering vector from two prompt sets (difference of means of the residual stream after
    block LAYER), saved as vector.safetensors, and greedy generations at several scales.

    positive: text file, one prompt per line: the direction points towards these
    negative: text file, one prompt per line: ... and away from these
    layer: the block after which the vector is read and added
    model: nano (bundled), a checkpoint directory or hub id
    out: folder for vector.safetensors, steer.json, the plot and index.html
    scales: comma-separated multiples of the vector to add, e.g. -4,0,4
    prompt: the prompt to generate from at each scale
    max_tokens: most tokens per generation
    position: mean (average over each prompt's tokens) or last (its last token)
    chat: render prompts as harmony user messages (--no-chat: raw text)
    device: cpu, cuda or auto
    dtype: bfloat16, float32 or float16"""
    from .steering import POSITIONS

    factors = _floats("--scales", scales)
    if position not in POSITIONS:
        raise OssgptError(f"--position must be one of {', '.join(POSITIONS)}, got {position!r}")
    pos_text, pos = _prompt_file("--positive", positive, chat)
    neg_text, neg = _prompt_file("--negative", negative, chat)
    query = _prompt_tokens(prompt, chat)
    net = _model(model, device, dtype)
    _run_steer(net, Path(out), layer, position, factors, query, prompt, chat, max_tokens,
               (positive, pos_text, pos), (negative, neg_text, neg), model)


def _run_steer(net, out_dir: Path, layer: int, position: str, factors: list[float],
               query: list[int], prompt: str, chat: bool, max_tokens: int,
               positive: tuple, negative: tuple, model: str) -> None:

    from ..generate import generate
    from ..harmony import parse_reply, stop_tokens
    from ..sampling import SamplingParams
    from ..tokenizer import ENDOFTEXT, RETURN, get_tokenizer
    from .interventions import steer as add
    from .report import Section, _pyplot, _save, write_index, write_json
    from .steering import SteeringVector, difference_of_means, prompt_residuals
    from .trace import check_layers

    (layer,) = check_layers(net, layer)
    (pos_file, _, pos), (neg_file, _, neg) = positive, negative
    vector = difference_of_means(net, pos, neg, layer, position)
    norm = float(vector.norm())
    info = {"positive": pos_file, "negative": neg_file, "position": position, "chat": chat,
            "positive_count": len(pos), "negative_count": len(neg), "model": model}
    SteeringVector(vector, layer, info).save(out_dir / "vector.safetensors")
    unit = vector / max(norm, 1e-12)
    proj_pos = (prompt_residuals(net, pos, layer, position) @ unit.double()).tolist()
    proj_neg = (prompt_residuals(net, neg, layer, position) @ unit.double()).tolist()
    tok = get_tokenizer()
    stops = stop_tokens() if chat else [ENDOFTEXT, RETURN]
    generations = []
    for scale in factors:
        with add(net, vector, layer, scale):
            ids = [e.token for e in generate(net, [query], max_tokens, SamplingParams(temperature=0), stops)]
        entry = {"scale": scale, "token_ids": ids, "text": tok.decode(ids)}
        if chat:
            reply = parse_reply(ids)
            entry.update(reasoning=reply.reasoning, content=reply.content,
                         tool_calls=[{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls])
        generations.append(entry)
    # Where the two sets' prompts fall along the vector: it should separate them.
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist([proj_pos, proj_neg], bins=20, label=["positive", "negative"], color=["tab:green", "tab:red"])
    ax.set(title=f"Prompts projected on the steering vector (layer {layer}, {position})",
           xlabel="projection on the unit vector", ylabel="prompts")
    ax.legend()
    _save(fig, out_dir / "projections.png")
    write_json(out_dir / "steer.json", {
        "model": model, "layer": layer, "position": position, "chat": chat, "vector_norm": norm,
        "vector": "vector.safetensors", **info, "prompt": prompt, "max_tokens": max_tokens,
        "projections": {"positive": proj_pos, "negative": proj_neg}, "generations": generations})
    rows = [[g["scale"], g.get("content", g["text"]) if chat else g["text"],
             g.get("reasoning", "")] for g in generations]
    gap = sum(proj_pos) / len(proj_pos) - sum(proj_neg) / len(proj_neg)
    write_index(out_dir, "Steering vector", f"Layer {layer}, position {position}, {len(pos)} positive "
                f"({pos_file}) and {len(neg)} negative ({neg_file}) prompts; vector norm {norm:.4g}. "
                f"Use it: ossgpt chat --steer {out_dir / 'vector.safetensors'}:{layer}:SCALE", [
                    Section(f"Greedy generations from: {prompt}",
                            tables=[(["scale", "reply", "reasoning"] if chat else ["scale", "text", ""], rows)]),
                    Section("Separation", f"Mean projection gap between the sets: {gap:.4g} "
                            "(equal to the vector's norm by construction).",
                            images=[("projections.png", "the prompts along the vector")])])
    lines = [f"vector norm {norm:.4g} at layer {layer}; saved {out_dir / 'vector.safetensors'}"]
    for g in generations:
        shown = (g.get("content") or g["text"]) if chat else g["text"]
        lines.append(f"scale {g['scale']:g}: {shown.strip()[:100]!r}")
    _done(out_dir, lines)
