"""The demo's summary: accuracy, throughput and latency from the verdicts received over MQTT,
contact sheets of failed / missed parts, and the console report (stage 6 of `training.demo.run`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from training.demo.station import Part, Received


# ----------------------------------------------------------------------------------- scoring
def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
            "max": round(float(a.max()), 2)}


def score(parts: Sequence[Part], results: dict[str, Received], by_part: dict[str, str],
          sent: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """Everything the summary says about the conveyor run, from the events received over MQTT."""
    events = {pid: results[eid].event for pid, eid in by_part.items()}
    recv = {pid: results[eid].received_ts for pid, eid in by_part.items()}
    sent_ids = {pid for pid, _ in sent}
    counts = {"pass": 0, "fail": 0, "error": 0}
    tp = fn = fp = tn = 0
    for p in parts:
        ev = events.get(p.part_id)
        if ev is None:
            continue
        v = ev["verdict"]
        counts[v] = counts.get(v, 0) + 1
        flagged = v == "fail"
        if p.defective:
            tp, fn = tp + flagged, fn + (not flagged)  # an error on a defective part is not a catch
        else:
            fp, tn = fp + flagged, tn + (v == "pass")
    n_def = sum(p.defective for p in parts if p.part_id in events)
    n_good = sum(not p.defective for p in parts if p.part_id in events)
    received = len(events)
    lat = [float(ev["timings_ms"]["capture_to_result"]) for ev in events.values()]
    e2e = [(recv[pid] - float(ev["capture_ts"])) * 1000 for pid, ev in events.items()]
    t_first = min((t for _, t in sent), default=0.0)
    t_last = max(recv.values(), default=t_first)
    span = max(1e-6, t_last - t_first)
    per_type: dict[str, dict[str, int]] = {}
    for p in parts:
        ev = events.get(p.part_id)
        if ev is not None:
            d = per_type.setdefault(p.truth, {"parts": 0, "fail": 0})
            d["parts"] += 1
            d["fail"] += ev["verdict"] == "fail"
    return {
        "parts_sent": len(sent), "parts_received": received,
        "events_lost": len(sent_ids - set(events)), "unexpected_events": len(set(events) - sent_ids),
        "counts": counts,
        "truth": {"good": n_good, "defective": n_def},
        "accuracy": {
            "image_accuracy": round((tp + tn) / received, 4) if received else None,
            "defect_recall": round(tp / n_def, 4) if n_def else None,
            "false_alarms": fp, "false_alarm_rate": round(fp / n_good, 4) if n_good else None,
            "missed_defects": fn, "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
            "per_truth": per_type,
        },
        "throughput_parts_per_s": round(received / span, 2),
        "window_s": round(span, 2),
        "latency_ms": {"capture_to_result": percentiles(lat), "file_to_mqtt": percentiles(e2e)},
    }


# ----------------------------------------------------------------------------------- pictures
def contact_sheet(parts: Sequence[Part], events: dict[str, dict[str, Any]], evidence_root: Path, done: Path,
                  png: Path, title: str, max_tiles: int = 40, cols: int = 8) -> int:
    """Tiles of parts with the predicted defect overlay (red: mask + boxes) and the truth outline
    (green); the daemon's own evidence mask when there is one, else the event's boxes alone."""
    tiles = [t for t in (_tile(p, events[p.part_id], evidence_root, done) for p in parts[:max_tiles])
             if t is not None]
    if not tiles:
        return 0
    th, tw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    cols = min(cols, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    pad = 4
    sheet = np.full((40 + rows * (th + pad), cols * (tw + pad) + pad, 3), 255, np.uint8)
    cv2.putText(sheet, title, (pad, 26), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = 40 + r * (th + pad), pad + c * (tw + pad)
        sheet[y : y + t.shape[0], x : x + t.shape[1]] = t
    png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(png), sheet)
    return len(tiles)


def _tile(p: Part, ev: dict[str, Any], evidence_root: Path, done: Path) -> np.ndarray | None:
    """One part's tile: the image with the predicted overlay and the true outline, and a caption
    (None: the image is gone from both the hot folder's done/ and the conveyor's staging)."""
    img = cv2.imread(str(done / f"{p.part_id}.png"), cv2.IMREAD_UNCHANGED)
    if img is None:
        img = cv2.imread(str(p.file), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    pred = None
    if ev.get("evidence"):
        m = cv2.imread(str(evidence_root / f"{ev['evidence']}.mask.png"), cv2.IMREAD_GRAYSCALE)
        if m is not None and m.shape[:2] == img.shape[:2]:
            pred = m > 0
    if pred is not None:
        img[pred] = (0.45 * img[pred] + 0.55 * np.array([0, 0, 255])).astype(np.uint8)
    for r in ev.get("regions", []):
        x, y, w, h = (int(v) for v in r["bbox"])
        cv2.rectangle(img, (x - 2, y - 2), (x + w + 1, y + h + 1), (0, 0, 255), 1)
    if p.mask_file is not None:
        tm = cv2.imread(str(p.mask_file), cv2.IMREAD_GRAYSCALE)
        if tm is not None:
            contours, _ = cv2.findContours((tm > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(img, contours, -1, (0, 220, 0), 1)
    scale = max(1, 192 // max(img.shape[:2]))
    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    caption = np.full((34, img.shape[1], 3), 255, np.uint8)
    cv2.putText(caption, f"{p.part_id} {ev['verdict']}", (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1,
                cv2.LINE_AA)
    ok = (ev["verdict"] == "fail") == p.defective
    cv2.putText(caption, f"truth {p.truth}, {len(ev.get('regions', []))} reg", (3, 28), cv2.FONT_HERSHEY_SIMPLEX,
                0.42, (0, 120, 0) if ok else (0, 0, 200), 1, cv2.LINE_AA)
    return np.vstack([img, caption])


# ----------------------------------------------------------------------------------- console
def fmt_lat(p: dict[str, float | None]) -> str:
    if p["p50"] is None:
        return "n/a"
    return f"p50 {p['p50']:.1f} / p95 {p['p95']:.1f} / p99 {p['p99']:.1f} ms (max {p['max']:.1f})"


def print_summary(s: dict[str, Any], say: Any) -> None:
    c, a = s["conveyor"]["counts"], s["conveyor"]["accuracy"]
    cv = s["conveyor"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    gate = s["model"].get("gate") or {}
    fallback = f"; INT8 failed its accuracy gate ({gate.get('reason')})" if gate.get("fallback") else ""
    lines = [
        f"model              {s['model'].get('name')} {s['model'].get('version')} ({s['model'].get('precision')}"
        f"{fallback})",
        f"parts              {cv['parts_sent']} sent ({cv['truth']['good']} good, {cv['truth']['defective']} defective)"
        f", {cv['parts_received']} verdicts received over MQTT",
        f"verdicts           pass {c.get('pass', 0)}, fail {c.get('fail', 0)}, error {c.get('error', 0)}",
        f"image accuracy     {pct(a['image_accuracy'])}",
        f"defect recall      {pct(a['defect_recall'])} ({a['confusion']['tp']} of {cv['truth']['defective']} "
        f"defective parts failed; {a['missed_defects']} missed)",
        f"false alarms       {a['false_alarms']} of {cv['truth']['good']} good parts ({pct(a['false_alarm_rate'])})",
        f"throughput         {cv['throughput_parts_per_s']:.1f} parts/s over {cv['window_s']:.1f} s "
        f"(conveyor pace {'unpaced' if not s['settings']['rate'] else str(s['settings']['rate']) + ' parts/s'})",
        f"latency            capture->result {fmt_lat(cv['latency_ms']['capture_to_result'])}",
        f"                   file->MQTT (incl. hot-folder settle) {fmt_lat(cv['latency_ms']['file_to_mqtt'])}",
        f"events lost        {cv['events_lost']} (duplicates dropped by event id: {cv['duplicates']})",
        f"daemon exit        {s['daemon_exit_code']} after SIGTERM",
        f"wall time          {s['wall_time_s']:.0f} s (stages: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in s["stage_seconds"].items())
        + f"; load average {s['load_average_start']:.1f} at start, {s['load_average'][0]:.1f} at end, "
        f"{s['cpus']} CPUs)",
    ]
    for k, v in s["pictures"].items():
        if v:
            lines.append(f"{k:<18} {v}")
    say("\n".join("   " + line for line in lines))


