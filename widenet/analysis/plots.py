"""PNG figures for the comparison report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_params(rows: Sequence[dict], path: Path) -> Path:
    """rows: dicts with label, params, acc_mean, acc_std."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.errorbar(r["params"] / 1e6, 100 * r["acc_mean"], yerr=100 * r["acc_std"], fmt="o", capsize=3)
        ax.annotate(r["label"], (r["params"] / 1e6, 100 * r["acc_mean"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("trainable parameters (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against parameters")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def training_curves(curves: dict[str, dict[str, list]], path: Path) -> Path:
    """curves: label -> {"train_step", "train_loss", "test_step", "test_acc"}."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, c in curves.items():
        few = len(c["train_step"]) < 20  # a short run logs a few points: one alone draws no line
        ax_loss.plot(c["train_step"], c["train_loss"], marker="o" if few else None, label=label)
        ax_acc.plot(c["test_step"], [100 * a for a in c["test_acc"]], marker="o", label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def expert_load(load: Sequence[Sequence[float]], blocks: Sequence[int], title: str, path: Path) -> Path:
    """Stacked bars: fraction of assignments per expert, one bar per block."""
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(blocks) + 2), 4))
    bottom = [0.0] * len(blocks)
    for e in range(len(load[0]) if load else 0):
        share = [row[e] for row in load]
        ax.bar([str(b) for b in blocks], share, bottom=bottom, label=f"expert {e}")
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.axhline(0.5, color="k", lw=0.5, ls=":")
    ax.set_xlabel("block")
    ax.set_ylabel("fraction of assignments")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def similarity_heatmaps(matrices: dict[str, list[list[float]]], path: Path) -> Path:
    """One heatmap per model of block-output cosine similarity."""
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), squeeze=False)
    for ax, (label, m) in zip(axes[0], matrices.items()):
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("block")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
