"""`python -m training review-export --state-dir DIR --out DATASET`: reviewed parts -> training data.

Reads the station page's review database (<state_dir>/ui.sqlite3) and the evidence folder, and
writes the generic layout that training/core/data.py reads (docs/data.md):

- a confirmed defect -> images/NAME + masks/NAME.png: the reviewer's box if one was drawn,
  else the station's own evidence mask;
- a false alarm -> images/NAME and no mask (a good part);
- an escape (a passed part that was bad) with a box -> a defect with the box as its mask;
  without a box it is NOT guessed: its frame goes to to_label/ and its row to to_label.csv.

The last review of a part is the one that counts. reviews.csv lists every exported part with
its reviewer and model version. The export is built in a temporary folder and renamed into
place, so DATASET is either the previous export or the new one, never half of each.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.image_decode import ImageDecodeError, read_image_file
from edge.ui.store import DB_NAME, StoreError, open_store_readonly

MANIFEST = "reviews.csv"
TO_LABEL = "to_label.csv"


@dataclass
class ExportSummary:
    defects: int = 0
    good: int = 0
    to_label: int = 0
    skipped: list[tuple[str, str]] | None = None  # (event id, why)

    def line(self) -> str:
        return (f"{self.defects} defect(s) with masks, {self.good} good part(s) (false alarms), "
                f"{self.to_label} escape(s) to label, {len(self.skipped or [])} skipped")


def sample_name(part_id: str, event_id: str) -> str:
    """A file name from a part id that may hold anything: safe characters only, plus the event id."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", part_id).strip("._")[:80] or "part"
    return f"{stem}-{event_id[:8]}"


def latest_reviews(db_file: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The last review of every reviewed event, and the evidence folder the page recorded."""
    db = open_store_readonly(db_file)
    try:
        rows = db.execute("SELECT r.* FROM reviews r JOIN (SELECT event_id, max(id) AS id FROM reviews "
                          "GROUP BY event_id) last ON r.id = last.id ORDER BY r.id").fetchall()
        meta = db.execute("SELECT value FROM meta WHERE key = 'evidence_dir'").fetchone()
    finally:
        db.close()
    return [dict(r) for r in rows], None if meta is None else str(meta[0])


def _evidence_file(root: Path, prefix: Any, kind: str) -> Path | None:
    """Like the page: only a well-formed prefix, only inside the evidence folder."""
    if not isinstance(prefix, str) or not re.match(r"^\d{4}-\d{2}-\d{2}/[0-9a-f-]{36}$", prefix):
        return None
    for ext in ("png", "jpg"):
        p = (root / f"{prefix}.{kind}.{ext}").resolve()
        if p.is_relative_to(root.resolve()) and p.is_file():
            return p
    return None


def _box_mask(width: int, height: int, box: list[int]) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    x, y, w, h = box
    mask[y : y + h, x : x + w] = 255
    return mask


def _label(r: dict[str, Any], event: dict[str, Any], root: Path, mask_path: Path) -> tuple[str, str]:
    """Where a reviewed part goes ("images" or "to_label") and where its mask came from ("" = a good
    part; for to_label, why it has none); writes the mask to `mask_path` when there is one."""
    box = json.loads(r["box"]) if r["box"] else None
    size = (int(event["image"]["width"]), int(event["image"]["height"]))
    if r["action"] == "false_alarm":
        return "images", ""
    if box is not None:
        cv2.imwrite(str(mask_path), _box_mask(*size, box))
        return "images", "box"
    if r["action"] == "confirm_fail":
        mask = _evidence_file(root, event.get("evidence"), "mask")
        try:  # the station wrote it, but a disk can corrupt it: a bad mask sends the part to labelling
            img = read_image_file(mask) if mask else None
        except (OSError, ImageDecodeError) as e:
            return "to_label", f"evidence mask unreadable ({e})"
        if img is None:
            return "to_label", "no evidence mask"
        if img.ndim != 2 or (img.shape[1], img.shape[0]) != size:
            return "to_label", (f"evidence mask is {img.shape}, not one channel of the frame's {size[0]}x{size[1]} "
                                "(a mask of the ROI only)")
        cv2.imwrite(str(mask_path), img)
        return "images", "evidence"
    return "to_label", "escape without a box"  # its defect is somewhere nobody marked


def export_reviews(db_file: Path, evidence_dir: Path | None, out: Path) -> ExportSummary:
    reviews, recorded = latest_reviews(db_file)
    root = evidence_dir or (Path(recorded) if recorded else db_file.parent / "evidence")
    summary = ExportSummary(skipped=[])
    assert summary.skipped is not None
    out = out.resolve()
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise StoreError(f"{out}: exists and is not an earlier review export (no {MANIFEST}); choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for sub in ("images", "masks", "to_label"):
            (tmp / sub).mkdir()
        manifest, to_label = [], []
        for r in reviews:
            event = json.loads(r["event"])
            name = sample_name(str(event.get("part_id", "")), r["event_id"])
            frame = _evidence_file(root, event.get("evidence"), "frame")
            if frame is None:
                summary.skipped.append((r["event_id"], "no frame in the evidence folder (not kept or deleted by "
                                        "the quota)"))
                continue
            dest, mask_source = _label(r, event, root, tmp / "masks" / f"{name}.png")
            target = tmp / dest / f"{name}{frame.suffix}"
            shutil.copyfile(frame, target)
            row = {"name": name, "event_id": r["event_id"], "part_id": event.get("part_id", ""),
                   "action": r["action"], "reviewer": r["reviewer"], "review_ts": r["ts"],
                   "model_version": r["model_version"], "station_verdict": event.get("verdict"),
                   "file": f"{dest}/{target.name}", "mask": mask_source}
            if dest == "to_label":
                to_label.append(row)
                summary.to_label += 1
            else:
                manifest.append(row)
                summary.defects += bool(mask_source)
                summary.good += not mask_source
        _write_csv(tmp / MANIFEST, manifest)
        _write_csv(tmp / TO_LABEL, to_label)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = ["name", "event_id", "part_id", "action", "reviewer", "review_ts", "model_version", "station_verdict",
              "file", "mask"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training review-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", required=True, type=Path, help=f"the station's state dir (holds {DB_NAME})")
    p.add_argument("--db", type=Path, help=f"review database (default STATE_DIR/{DB_NAME})")
    p.add_argument("--evidence-dir", type=Path, help="evidence folder (default: the one the page recorded)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (generic layout)")
    args = p.parse_args(argv)
    try:
        summary = export_reviews(args.db or args.state_dir / DB_NAME, args.evidence_dir, args.out)
    except (StoreError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {summary.line()}")
    for event_id, why in summary.skipped or []:
        print(f"  skipped {event_id}: {why}", file=sys.stderr)
    if summary.to_label:
        print(f"  label the frames in {args.out / 'to_label'} (listed in {TO_LABEL}) before training on them")
    return 0
