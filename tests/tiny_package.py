"""A tiny real OpenVINO model package built without torch, for edge tests.

The "network" marks pixels much darker than their surroundings as defects:
prob = sigmoid((local_mean - x - 40) / 6), with the local mean from a real 7x7 convolution.
Synthetic parts (light surface, dark defect blobs) therefore have a known true verdict, which
lets the daemon tests check verdicts end to end without training a model.

`part="max"` adds the second output of a model with a decision head, `part_probability` [1, 1]:
here 0.9 x the tile's highest map probability (a threshold above 0.9 passes every part);
`part="nan"` makes that output NaN (a broken head).
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from edge.contract import InputSpec, PackageMeta, PostprocessParams
from edge.package import sha256_file, write_package_json
from edge.sources.synthetic import synth_part


def build_dark_spot_model(tile: int = 64, ballast_mb: int = 0, part: str | None = None,
                          offset: float = 40.0) -> ov.Model:
    """`offset`: how much darker than its surroundings a pixel must be to score 0.5. `ballast_mb` adds
    a random weight matrix whose product is multiplied by 0: the output is the
    same, but every compiled copy of the model holds that much memory (so a leaked model shows in RSS)."""
    x = ops.parameter([1, 1, tile, tile], np.float32, name="image")
    k = np.full((1, 1, 7, 7), 1.0 / 49.0, dtype=np.float32)
    local = ops.convolution(x, ops.constant(k), [1, 1], [3, 3], [3, 3], [1, 1])
    diff = ops.subtract(ops.subtract(local, x), ops.constant(np.float32(offset)))
    if ballast_mb:
        cols = max(1, ballast_mb * (1 << 20) // 4 // (tile * tile))
        w = np.random.default_rng(0).standard_normal((tile * tile, cols)).astype(np.float32)
        proj = ops.matmul(ops.reshape(x, [1, tile * tile], False), ops.constant(w), False, False)
        zero = ops.multiply(ops.reduce_sum(proj, [1], True), ops.constant(np.float32(0.0)))
        diff = ops.add(diff, ops.reshape(zero, [1, 1, 1, 1], False))
    prob = ops.sigmoid(ops.divide(diff, ops.constant(np.float32(6.0))))
    prob.output(0).set_names({"prob"})
    if part is None:
        return ov.Model([prob], [x], "dark_spot")
    if part not in ("max", "nan"):
        raise ValueError(f"part must be None, 'max' or 'nan', got {part!r}")
    peak = ops.reshape(ops.reduce_max(prob, [2, 3], False), [1, 1], False)
    peak = ops.multiply(peak, ops.constant(np.float32(0.9)))
    if part == "nan":
        peak = ops.multiply(peak, ops.constant(np.float32(np.nan)))
    peak.output(0).set_names({"part_probability"})
    return ov.Model([prob, peak], [x], "dark_spot_with_part")


def make_tiny_package(out: Path, tile: int = 64, version: str = "1.0.0", name: str = "tiny-dark-spot",
                      min_area: int = 4, scale: float = 1.0, ballast_mb: int = 0, part: str | None = None,
                      part_threshold: float | None = None, pixel_threshold: float = 0.5,
                      precision: str = "fp32") -> Path:
    """Write a valid package folder (model.xml/.bin + package.json) and return it.

    `part`/`part_threshold`: a second (part) output and the threshold of the verdict (see the module)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ov.save_model(build_dark_spot_model(tile, ballast_mb, part), str(out / "model.xml"), compress_to_fp16=False)
    meta = PackageMeta(
        name=name,
        version=version,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        precision=precision,
        input=InputSpec(color="gray", tile=tile, overlap=8, multiple_of=16, mean=(0.0,), std=(1.0,), scale=scale),
        postprocess=PostprocessParams(pixel_threshold=pixel_threshold, min_area=min_area, open_radius=0, close_radius=1,
                                      part_threshold=part_threshold),
        files={f: sha256_file(out / f) for f in ("model.xml", "model.bin")},
        metrics={},
        data_fingerprint="synthetic",
        tools={"openvino": ov.__version__},
    )
    write_package_json(out, meta)
    return out


def make_part(size: tuple[int, int] = (96, 128), defect: bool = False, seed: int = 0) -> np.ndarray:
    """A light textured part; with `defect`, one dark blob of about 40 px (the edge's synthetic source)."""
    return synth_part(size[0], size[1], defect, np.random.default_rng(seed))
