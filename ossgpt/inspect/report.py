"""The reports of `ossgpt inspect`: JSON, PNG plots (matplotlib, headless) and one index.html per
output folder that shows the plots and key tables together. The page is self-contained: plots are
linked relatively (the folder can be moved or zipped), no scripts, no CDN, every text escaped.
Every file is written atomically (ossgpt.files.write_atomic), so a reader never sees half of one.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import write_atomic


def _pyplot():
    # Imported late (the CLI's --help stays quick) and headless: no display is needed.
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def write_json(path: str | os.PathLike, data: object) -> None:
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def _save(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    write_atomic(path, buf.getvalue())


def _ticks(ax, xlabels: Sequence[str] | None, ylabels: Sequence[str] | None) -> None:
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), [str(x) for x in xlabels],
                      rotation=90 if len(xlabels) > 12 else 0, fontsize=7 if len(xlabels) > 24 else 9)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), [str(y) for y in ylabels], fontsize=7 if len(ylabels) > 24 else 9)


def heatmap(path: str | os.PathLike, matrix: np.ndarray, *, title: str, xlabel: str, ylabel: str,
            xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None,
            colorbar: str = "", annotate: bool = False, cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None) -> None:
    """One matrix as a coloured grid; `annotate` writes each value in its cell (small grids)."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=float)
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * cols, 18), min(1.5 + 0.4 * rows, 14)))
    im = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=colorbar)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    _ticks(ax, xlabels if xlabels is not None else range(cols), ylabels if ylabels is not None else range(rows))
    if annotate and rows * cols <= 400:
        top = np.nanmax(matrix) if matrix.size else 0
        for i in range(rows):
            for j in range(cols):
                v = matrix[i, j]
                ax.text(j, i, f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}", ha="center", va="center",
                        fontsize=7, color="white" if v < 0.6 * top else "black")
    _save(fig, path)


def heatmap_grid(path: str | os.PathLike, matrices: Sequence[np.ndarray], titles: Sequence[str], *,
                 suptitle: str, xlabel: str, ylabel: str, cmap: str = "viridis",
                 vmin: float | None = None, vmax: float | None = None,
                 xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None) -> None:
    """Several matrices of one kind side by side (attention heads, co-activation per layer)."""
    plt = _pyplot()
    n = len(matrices)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    im = None
    for i, (ax, m, t) in enumerate(zip(axes.flat, matrices, titles)):
        im = ax.imshow(np.asarray(m, dtype=float), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if xlabels is not None and len(xlabels) == np.asarray(m).shape[1]:
            ax.set_xticks(range(len(xlabels)), xlabels, fontsize=6, rotation=90)
        if ylabels is not None and len(ylabels) == np.asarray(m).shape[0]:
            # Named rows only on the left column: long names would run into the next panel.
            ax.set_yticks(range(len(ylabels)), ylabels if i % cols == 0 else [], fontsize=7)
            if i % cols:
                ax.set_ylabel("")
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat[:n]), shrink=0.8)
    fig.suptitle(suptitle)
    _save(fig, path)


def bars(path: str | os.PathLike, labels: Sequence[str], values: Sequence[float], *, title: str,
         xlabel: str, ylabel: str, errors: Sequence[float] | None = None,
         reference: float | None = None, reference_label: str = "") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(labels) + 2), 3.5))
    ax.bar(range(len(values)), values, yerr=errors, color="tab:blue", capsize=3)
    if reference is not None:
        ax.axhline(reference, color="tab:red", linestyle="--", label=reference_label)
        ax.legend(fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    _ticks(ax, labels, None)
    _save(fig, path)


def text_grid(path: str | os.PathLike, values: np.ndarray, texts: Sequence[Sequence[str]], *,
              title: str, xlabels: Sequence[str], ylabels: Sequence[str], xlabel: str, ylabel: str,
              colorbar: str = "") -> None:
    """A heatmap with a short text in each cell (the logit lens: layers x positions)."""
    plt = _pyplot()
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.75 * cols, 40), 1.5 + 0.45 * rows))
    im = ax.imshow(values, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=colorbar, fraction=0.02)
    for i in range(rows):
        for j in range(cols):
            text = texts[i][j]
            text = text if len(text) <= 8 else text[:7] + "…"
            ax.text(j, i, text, ha="center", va="center", fontsize=6,
                    color="white" if values[i, j] > 0.6 else "black")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_xticks(range(cols), xlabels, rotation=90, fontsize=6)
    ax.set_yticks(range(rows), ylabels, fontsize=8)
    _save(fig, path)


def cell_text(text: str) -> str:
    """A token's text made visible in a plot or table cell: whitespace shown, nothing empty."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t")
    if shown.strip() != shown or not shown:
        shown = shown.replace(" ", "·")
    return shown or "∅"


# -- index.html -----------------------------------------------------------------------------------

@dataclass
class Section:
    heading: str
    text: str = ""
    images: list[tuple[str, str]] = field(default_factory=list)      # (file name, caption)
    tables: list[tuple[list[str], list[list[object]]]] = field(default_factory=list)
    pre: str = ""


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}
th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee;margin:.3em 0}figure{margin:0 0 1.5em}
figcaption{color:#555;font-size:.9em}pre{background:#f7f7f7;padding:.7em;white-space:pre-wrap}code{background:#f2f2f2}"""


def write_index(out: str | os.PathLike, title: str, intro: str, sections: Sequence[Section]) -> Path:
    """index.html in `out`: the sections' text, tables and plots (linked by relative name)."""
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{_STYLE}</style></head><body>", f"<h1>{e(title)}</h1>", f"<p>{e(intro)}</p>"]
    for s in sections:
        parts.append(f"<h2>{e(s.heading)}</h2>")
        if s.text:
            parts.append(f"<p>{e(s.text)}</p>")
        for header, rows in s.tables:
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        if s.pre:
            parts.append(f"<pre>{e(s.pre)}</pre>")
        for name, caption in s.images:
            parts.append(f"<figure><a href='{e(name, quote=True)}'><img src='{e(name, quote=True)}' "
                         f"alt='{e(caption, quote=True)}'></a><figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    path = Path(out) / "index.html"
    write_atomic(path, "\n".join(parts))
    return path


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
