"""Figures: ``auglocal-fx report --plot``, ``auglocal-fx blocks --svg``, training curves (Agg).

The file type follows the extension (``.png``, ``.svg``, ``.pdf``). Plotting only: the numbers
come from ``auglocal_fx.costs`` and ``auglocal_fx.flops``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from ._io import atomic_write
from .errors import AugLocalError

__all__ = ["check_figure_path", "plot_report", "plot_blocks", "plot_training_curves", "plot_analysis"]

_EXTS = (".png", ".svg", ".pdf")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_figure_path(path: str) -> None:
    """Check a figure path before any work is done.

    Raises:
        AugLocalError: if the extension is not .png/.svg/.pdf or the folder does not exist.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTS:
        raise AugLocalError(f"cannot write a figure to {path!r}: use a .png, .svg or .pdf name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AugLocalError(f"folder {folder!r} does not exist: create it or choose another path")


def plot_report(report, path: str) -> None:
    """FLOPs and memory per method, and the per-block profile of FLOPs and activation size.

    Args:
        report: a ``CostReport``.
        path: output file (``.png``, ``.svg`` or ``.pdf``).
    """
    check_figure_path(path)
    plt = _pyplot()
    has_mem = any(r.memory is not None for r in report.rows)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=80)
    names = [r.method.replace("AugLocal ", "") for r in report.rows]
    colors = ["#555555", "#999999"] + ["#1f77b4"] * (len(names) - 2)

    ax = axes[0]
    ax.bar(names, [r.flops / 1e9 for r in report.rows], color=colors)
    ax.set_ylabel("forward GFLOPs / example")
    ax.set_title("FLOPs (1 multiply-add = 1 FLOP)", fontsize=9)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)

    ax = axes[1]
    if has_mem:
        ax.bar(names, [(r.memory or 0) / 2 ** 20 for r in report.rows], color=colors)
        ax.set_ylabel("MiB")
        what = "CUDA peak" if report.device.startswith("cuda") else "saved for backward"
        ax.set_title(f"measured memory ({what}), batch {report.batch_size}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "memory not measured\n(" + (report.memory_note or "") + ")",
                ha="center", va="center", fontsize=8, wrap=True)

    ax = axes[2]
    idx = [p["index"] for p in report.profile]
    ax.bar(idx, [p["flops"] / 1e6 for p in report.profile], color="#1f77b4")
    ax.set_xlabel("primary block")
    ax.set_ylabel("MFLOPs / example", color="#1f77b4")
    twin = ax.twinx()
    twin.plot(idx, [p["activation_bytes"] / 2 ** 20 for p in report.profile], color="#d62728",
              marker=".", linewidth=1)
    twin.set_ylabel(f"output MiB (batch {report.batch_size})", color="#d62728")
    ax.set_title("per-block FLOPs and activation size", fontsize=9)

    fig.suptitle(f"{report.model} at {'x'.join(map(str, report.input_size))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_blocks(flops, path: str) -> None:
    """The partition and, per auxiliary network, the later blocks it copies.

    Top row: the primary blocks (shaded by output resolution) and the head. Below, one row per
    auxiliary network ``j``: a square on block ``j`` and a dot on each block its auxiliary
    network copies (a ring where the copy reduces the resolution, as built: ``AuxNet.reductions``;
    the factor is written beside rings that reduce by more than 2).

    Args:
        flops: a ``LocalFlops``.
        path: output file (``.svg``, ``.png`` or ``.pdf``).
    """
    check_figure_path(path)
    plt = _pyplot()
    blocks, aux = flops.blocks, flops.aux
    num = len(blocks)
    width = min(16.0, max(6.5, 2.5 + 0.28 * (num + 1)))
    height = min(14.0, 1.6 + 0.18 * (len(aux) + 2))
    fig, ax = plt.subplots(figsize=(width, height), dpi=80)
    res = sorted({b.output_shape[-1] if len(b.output_shape) > 1 else 1 for b in blocks},
                 reverse=True)
    shade = {r: 0.35 + 0.55 * i / max(1, len(res) - 1) for i, r in enumerate(res)}
    cmap = plt.get_cmap("Blues")
    for b in blocks:
        r = b.output_shape[-1] if len(b.output_shape) > 1 else 1
        ax.add_patch(plt.Rectangle((b.index - 0.4, 0.6), 0.8, 0.8, color=cmap(shade[r])))
    ax.add_patch(plt.Rectangle((num - 0.4, 0.6), 0.8, 0.8, color="#999999"))
    ax.text(num, 1.0, "H", ha="center", va="center", fontsize=7, color="white")
    for a in aux:
        y = -(a.block + 1) * 0.5
        xs = [a.block] + list(a.selected)
        ax.plot(xs + [num], [y] * (len(xs) + 1), color="#cccccc", linewidth=0.8, zorder=1)
        ax.scatter([a.block], [y], marker="s", s=18, color="#d62728", zorder=2)
        for k, r in zip(a.selected, a.reductions):
            ax.scatter([k], [y], s=16, zorder=2, color="white" if r > 1 else "#1f77b4",
                       edgecolors="#1f77b4")
            if r > 2:
                ax.text(k + 0.25, y, f"/{r}", ha="left", va="center", fontsize=5, color="#1f77b4")
        ax.scatter([num], [y], marker="s", s=10, color="#999999", zorder=2)
    ax.set_xlim(-1, num + 1)
    ax.set_ylim(-(len(aux) + 1) * 0.5, 1.6)
    step = max(1, num // 20)
    ax.set_xticks(list(range(0, num, step)))
    ax.set_yticks([])
    ax.set_xlabel("primary block (shade: output resolution; H: head)")
    ax.set_ylabel("auxiliary network j (top to bottom)")
    desc = flops.local.conversion.describe()
    ax.set_title(f"{getattr(flops.local, 'spec', None) or 'model'}: {num} blocks, "
                 f"{len(aux)} auxiliary networks ({desc})\nred: block the auxiliary network is "
                 "attached to; blue: copied block; ring: the copy reduces the resolution "
                 "(2x unless written)",
                 fontsize=8)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training_curves(history: List[Dict[str, Any]], path: Union[str, Path]) -> None:
    """Loss and accuracy curves (matplotlib, Agg backend)."""
    if not history:
        return
    plt = _pyplot()

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if any(h["train_loss"] is not None for h in history):
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="output loss")
    if history[-1]["local_losses"]:
        local = np.array([h["local_losses"] for h in history])
        ax_loss.plot(epochs, local.mean(axis=1), "s--", label="mean local loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["test_acc"] for h in history], "o-", color="black", label="primary network")
    if history[-1]["aux_acc"]:
        aux = np.array([h["aux_acc"] for h in history])
        cmap = plt.get_cmap("viridis")
        for j in range(aux.shape[1]):
            ax_acc.plot(epochs, aux[:, j], color=cmap(j / max(1, aux.shape[1] - 1)), alpha=0.6, lw=1,
                        label="aux nets (early -> late)" if j == 0 else None)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test top-1 (%)")
    ax_acc.legend()
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    plt.close(fig)


def plot_analysis(cka: Mapping[str, Sequence[float]], probe: Mapping[str, Sequence[float]], path: str,
                  title: Optional[str] = None) -> None:
    """The paper's Figures 3 and 4: CKA to the reference per block and its average, probe accuracy.

    Args:
        cka: per method (label), the CKA of each block to the reference network.
        probe: per method (label), the linear-probe test accuracy (%) of each block; may be empty.
        path: output file (``.png``, ``.svg`` or ``.pdf``).
        title: a line above the panels.
    """
    check_figure_path(path)
    plt = _pyplot()
    panels = 3 if probe else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), dpi=90)
    cmap = plt.get_cmap("viridis")
    colors = {m: cmap(i / max(1, len(cka) - 1) * 0.85) for i, m in enumerate(cka)}
    ax = axes[0]
    for method, values in cka.items():
        ax.plot(range(len(values)), values, "o-", ms=3, color=colors[method], label=method)
    ax.set_xlabel("block")
    ax.set_ylabel("linear CKA to reference")
    ax.set_title("(a) CKA per block", fontsize=9)
    if cka:
        ax.legend(fontsize=7)
    ax = axes[1]
    means = [float(np.nanmean(v)) for v in cka.values()]
    ax.bar(range(len(means)), means, color=[colors[m] for m in cka])
    for i, v in enumerate(means):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(means)))
    ax.set_xticklabels(list(cka), rotation=20, fontsize=7)
    ax.set_ylabel("average CKA over blocks")
    ax.set_title("(b) average CKA (paper Fig. 3)", fontsize=9)
    if probe:
        ax = axes[2]
        for i, (method, values) in enumerate(probe.items()):
            style = dict(color="black", lw=2) if method not in colors else dict(color=colors[method])
            ax.plot(range(len(values)), values, "o-", ms=3, label=method, **style)
        ax.set_xlabel("block")
        ax.set_ylabel("linear probe test top-1 (%)")
        ax.set_title("(c) linear separability (paper Fig. 4)", fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    atomic_write(path, lambda handle: fig.savefig(handle, format=fmt))
    plt.close(fig)
