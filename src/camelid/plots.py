"""Pictures a person would rather look at than read: loss curves, length histograms, and any figure saved as a PNG."""

import io
from pathlib import Path

from camelid.files import write_atomic


def loss_curve(metrics: list[dict], path: str | Path, title: str = "training loss") -> Path:
    """A PNG of the training loss per step (raw and smoothed) and the held-out loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or touched
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    _curve(ax, metrics, "loss", "cross-entropy per supervised token")
    ax.set_title(title)
    fig.tight_layout()
    path = save_png(fig, path)
    plt.close(fig)
    return path


def preference_curves(metrics: list[dict], path: str | Path, title: str) -> Path:
    """A PNG of a preference run: the loss, the reward margin and the reward accuracy per step (raw and
    smoothed), each with its held-out value where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
              ("rewards/accuracies", "share of pairs ranked right")]
    panels = [(key, label) for key, label in panels if any(key in m or f"eval_{key}" in m for m in metrics)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        _curve(ax, metrics, key, label)
    fig.suptitle(title)
    fig.tight_layout()
    path = save_png(fig, path)
    plt.close(fig)
    return path


def _curve(ax, metrics: list[dict], key: str, ylabel: str) -> None:
    """One metric per step on `ax`: raw, smoothed, and its held-out value (`eval_<key>`) as points."""
    train = [(m["step"], m[key]) for m in metrics if key in m]
    held_out = [(m["step"], m[f"eval_{key}"]) for m in metrics if f"eval_{key}" in m]
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1, label="train (per step)")
        smooth, avg = [], None
        for x in values:  # exponential moving average, as TensorBoard's smoothing
            avg = x if avg is None else 0.9 * avg + 0.1 * x
            smooth.append(avg)
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="train (smoothed)")
    if held_out:
        steps, values = zip(*held_out)
        ax.plot(steps, values, "o-", color="tab:orange", linewidth=2, label="held out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if train or held_out:
        ax.legend()


def length_histogram(
    lengths: list[int], path: str | Path, *, title: str, xlabel: str = "tokens per conversation", marks=()
) -> Path:
    """A PNG histogram of lengths with a dashed line at each of `marks` (context lengths within the range).

    The counts are drawn on a log scale when the tallest bar is over 50 times the shortest non-empty one, as
    with the long tail of conversation lengths, whose few long conversations a linear scale would hide.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or touched
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    counts, _, _ = ax.hist(lengths, bins=50, color="tab:blue", alpha=0.8)
    filled = [c for c in counts if c > 0]
    if filled and max(filled) > 50 * min(filled):
        ax.set_yscale("log")
    top = max(lengths, default=0)
    for mark in marks:
        if mark <= top:
            ax.axvline(mark, color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(f"{mark:,}", (mark, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", color="tab:red", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("conversations")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = save_png(fig, path)
    plt.close(fig)
    return path


def save_png(fig, path: str | Path) -> Path:
    """Write a matplotlib figure to `path` as a PNG, all at once: a reader never sees half a picture."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    write_atomic(path, buffer.getvalue())
    return path
