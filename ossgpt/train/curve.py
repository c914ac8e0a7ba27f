"""The training curve of a run as a PNG: training loss per step, validation loss and the task
accuracy at each evaluation, so a user sees at a glance whether it learned and whether it had
finished learning."""

from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict], path: str | Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")          # no display: the file is the output
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, loss_ax = plt.subplots(figsize=(7, 4), dpi=110)
    trained = [h for h in history if "loss" in h]
    loss_ax.plot([h["step"] for h in trained], [h["loss"] for h in trained], color="#9ab", lw=1,
                 label="training loss")
    evals = [h for h in history if "eval_loss" in h]
    loss_ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-",
                 color="#1f5fa8", label="validation loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (nats per token)")
    loss_ax.set_yscale("log")
    handles, labels = loss_ax.get_legend_handles_labels()
    metrics = sorted({k for h in evals for k in h if k.endswith("_accuracy")})
    if metrics:
        acc_ax = loss_ax.twinx()
        for name, color in zip(metrics, ("#d2691e", "#2e8b57")):
            acc_ax.plot([h["step"] for h in evals if name in h], [h[name] for h in evals if name in h],
                        "s--", color=color, label=name.replace("_", " "))
        acc_ax.set_ylim(-0.02, 1.02)
        acc_ax.set_ylabel("held-out accuracy")
        more_h, more_l = acc_ax.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    loss_ax.legend(handles, labels, loc="center right", fontsize=8)
    loss_ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
