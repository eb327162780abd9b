"""Pictures for people: a validation grid (what the model gets wrong) and training curves.

Matplotlib with the Agg backend (no display on a training server or in CI). Both functions
write a PNG and return its path; they never open a window.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from edge.contract import PostprocessParams
from edge.postprocess import postprocess
from edge.rules import decide, effective_rules

_KIND_ORDER = {"FN": 0, "FP": 1, "TP": 2, "TN": 3}


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 gray or BGR -> float RGB in [0, 1] for imshow."""
    img = image.astype(np.float32) / 255.0
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return img[:, :, ::-1]


def _overlay(image: np.ndarray, mask: np.ndarray, color: tuple[float, float, float], alpha: float = 0.5) -> np.ndarray:
    out = _rgb(image).copy()
    sel = np.asarray(mask).astype(bool)
    out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(color, np.float32)
    return out


def pick_rows(labels: Sequence[bool], preds: Sequence[bool], scores: Sequence[float], max_rows: int) -> list[int]:
    """Indices to show: false negatives, then false positives, then defective hits, then good parts.

    Within a kind the most telling first: misses with the highest score (nearly found), false
    alarms with the highest score, hits with the lowest score (nearly missed).
    """
    def key(i: int) -> tuple[int, float]:
        kind = ("TP" if preds[i] else "FN") if labels[i] else ("FP" if preds[i] else "TN")
        s = float(scores[i])
        return _KIND_ORDER[kind], (s if kind == "TP" else -s)

    return sorted(range(len(labels)), key=key)[:max_rows]


def save_validation_grid(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], probs: Sequence[np.ndarray],
    params: PostprocessParams, path: str | Path, max_rows: int = 8, names: Sequence[str] | None = None,
    parts: Sequence[float] | None = None,
) -> Path:
    """One row per chosen part: image | true mask | predicted mask + region boxes | probability map.

    Rows show the errors first (see `pick_rows`), so a glance tells what the model misses. With
    `parts` (a model with a decision head) verdicts and scores are the part decisions, as at the edge.
    """
    if not (len(images) == len(masks) == len(probs)):
        raise ValueError(f"{len(images)} images, {len(masks)} masks and {len(probs)} maps: counts differ")
    if not images:
        raise ValueError("no images for the validation grid")
    dets = [postprocess(p, params, None if parts is None else float(parts[i])) for i, p in enumerate(probs)]
    labels = [bool(np.any(m)) for m in masks]
    rules = effective_rules(params).rules  # as the line judges without station overrides
    preds = [decide(d, rules)[0] == "fail" for d in dets]
    scores = [d.score if d.part_score is None else d.part_score for d in dets]
    rows = pick_rows(labels, preds, scores, max_rows)
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 2.8 * len(rows) + 0.4), squeeze=False,
                             layout="constrained")
    for r, i in enumerate(rows):
        kind = ("TP" if preds[i] else "FN") if labels[i] else ("FP" if preds[i] else "TN")
        name = names[i] if names is not None else f"#{i}"
        ax = axes[r]
        ax[0].imshow(_rgb(images[i]))
        ax[0].set_title(f"{name} [{kind}] {'part ' if parts is not None else ''}score {scores[i]:.2f}", fontsize=8)
        ax[1].imshow(_overlay(images[i], masks[i], (0.1, 0.9, 0.1)))
        ax[1].set_title(f"true defect ({int(np.count_nonzero(masks[i]))} px)", fontsize=8)
        ax[2].imshow(_overlay(images[i], dets[i].mask, (0.95, 0.1, 0.1)))
        for reg in dets[i].regions:
            x, y, w, h = reg.bbox
            ax[2].add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="yellow", linewidth=1))
        ax[2].set_title(f"predicted: {len(dets[i].regions)} region(s)", fontsize=8)
        im = ax[3].imshow(np.asarray(probs[i], np.float32), cmap="magma", vmin=0.0, vmax=1.0)
        ax[3].set_title("defect probability", fontsize=8)
        fig.colorbar(im, ax=ax[3], fraction=0.046, pad=0.02)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f"threshold {params.pixel_threshold:g}, min_area {params.min_area}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _read_columns(csv_path: Path) -> dict[str, np.ndarray]:
    """CSV -> column name -> float array (empty or non-numeric cells become NaN)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, np.ndarray] = {}
    for name in rows[0].keys() if rows else []:
        vals = []
        for row in rows:
            try:
                vals.append(float(row.get(name) or "nan"))
            except ValueError:
                vals.append(math.nan)
        cols[name] = np.asarray(vals, dtype=np.float64)
    return cols


def _plot(ax: plt.Axes, x: np.ndarray, y: np.ndarray, label: str) -> bool:
    ok = ~np.isnan(y) & ~np.isnan(x)
    if not ok.any():
        return False
    ax.plot(x[ok], y[ok], marker="o" if ok.sum() < 30 else None, markersize=3, label=label)
    return True


def save_training_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """Loss (train/val), validation metrics and learning rate against epoch, from the run's CSV.

    Plots whatever of the expected columns is present (a missing or empty column is skipped);
    extra numeric columns named image_* / pixel_* join the metrics panel.
    """
    cols = _read_columns(Path(csv_path))
    n = len(next(iter(cols.values()))) if cols else 0
    x = cols.get("epoch", np.arange(n, dtype=np.float64))
    fig, (ax_loss, ax_met, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    drawn_loss = [_plot(ax_loss, x, cols[c], c) for c in ("train_loss", "val_loss") if c in cols]
    metric_cols: list[str] = [c for c in ("pixel_iou", "image_f1", "image_accuracy") if c in cols]
    metric_cols += sorted(c for c in cols if c.startswith(("image_", "pixel_")) and c not in metric_cols
                          and not c.endswith(("_tp", "_fp", "_fn", "_tn")))
    drawn_met = [_plot(ax_met, x, cols[c], c) for c in metric_cols]
    drawn_lr = _plot(ax_lr, x, cols["lr"], "lr") if "lr" in cols else False
    positive_loss = all(np.nanmin(cols[c]) > 0 for c in ("train_loss", "val_loss")
                        if c in cols and not np.isnan(cols[c]).all())
    for ax, title, drawn in ((ax_loss, "loss", any(drawn_loss)), (ax_met, "validation metrics", any(drawn_met)),
                             (ax_lr, "learning rate", drawn_lr)):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if any(drawn_loss) and positive_loss:
        ax_loss.set_yscale("log")
    if any(drawn_met):
        ax_met.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


def save_errors_picture(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], probs: Sequence[np.ndarray],
                        params: PostprocessParams, rows: Sequence[dict[str, Any]], names: Sequence[str],
                        path: str | Path, max_rows: int = 24,
                        parts: Sequence[float] | None = None) -> Path | None:
    """The grid of every wrong part (missed defects first, then false alarms), or None if none is wrong.

    Why: "18 defective parts passed" says nothing about which; a quality engineer looks at them.
    """
    missed = [i for i, r in enumerate(rows) if r["defective"] and not r["predicted"]]
    alarms = [i for i, r in enumerate(rows) if not r["defective"] and r["predicted"]]
    chosen = (missed + alarms)[:max_rows]
    if not chosen:
        return None
    return save_validation_grid([images[i] for i in chosen], [masks[i] for i in chosen],
                                [probs[i] for i in chosen], params, path, max_rows=len(chosen),
                                names=[names[i] for i in chosen],
                                parts=None if parts is None else [parts[i] for i in chosen])
