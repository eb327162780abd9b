"""Export of a real (tiny, briefly trained) U-Net: parity, INT8 gate, package, round trip.

One module-scoped export is shared by most tests, so the file stays well under a minute on a
2-core machine. The model is trained for a few seconds on synthetic dark-blob parts, which it
learns reliably, so "INT8 agrees with FP32" is tested on a model that actually detects defects.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openvino as ov
import pytest
import torch

from edge.contract import InputSpec, PostprocessParams
from edge.cpu_check import run_check
from edge.inference import Inferencer
from edge.package import read_package
from tests.tiny_package import make_part
from training.core.checkpoint import CheckpointMeta, load_model, save_checkpoint
from training.core.data import load_dataset, split_dataset
from training.core.losses import decision_loss
from training.core.unet import UNetConfig, build_model
from training.release import export as ex
from training.release import quantize as q

ROOT = Path(__file__).resolve().parents[2]
SPEC = InputSpec(color="gray", tile=64, overlap=8, multiple_of=8, mean=(127.5,), std=(64.0,))
PARAMS = PostprocessParams(pixel_threshold=0.5, min_area=4, open_radius=0, close_radius=1)


def make_dataset(root: Path, n: int = 32, size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """Generic layout: half the parts carry one dark blob; the mask is exactly the blob."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(n):
        bad = i % 2 == 0
        img = make_part(size, defect=bad, seed=seed * 1000 + i)
        name = f"{'pit' if bad else 'good'}_{i:05d}"
        cv2.imwrite(str(root / "images" / f"{name}.png"), img)
        cv2.imwrite(str(root / "masks" / f"{name}.png"), ((img == 40) * 255).astype(np.uint8))
    return root


def make_checkpoint(path: Path, data: Path | None = None, steps: int = 120, seed: int = 0,
                    decision_head: bool = False, params: PostprocessParams = PARAMS) -> Path:
    """A tiny U-Net; trained briefly on `data` (32 px crops, 1 thread: fast and deterministic)."""
    torch.manual_seed(seed)
    cfg = UNetConfig(base_width=8, depth=3, max_width=32, dropout=0.0, decision_head=decision_head)
    model = build_model(cfg)
    if data is not None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        imgs = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((data / "images").glob("*.png"))]
        masks = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0 for p in sorted((data / "masks").glob("*.png"))]
        rng = np.random.default_rng(seed)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # ends calm: no late spike undoes it
        model.train()
        bad = [k for k, m in enumerate(masks) if m.any()]
        for _ in range(steps):
            xs, ys = [], []
            for j in range(8):
                k = int(rng.integers(len(imgs)))
                y0, x0 = (int(rng.integers(0, s - 32 + 1)) for s in imgs[k].shape)
                if j < 4 and bad:  # half of every batch shows a blob: a random 32 px crop mostly misses it
                    k = bad[int(rng.integers(len(bad)))]
                    cy, cx = (int(np.mean(v)) for v in np.nonzero(masks[k]))
                    y0, x0 = (int(np.clip(c - int(rng.integers(4, 28)), 0, s - 32)) for c, s in
                              zip((cy, cx), imgs[k].shape, strict=True))
                xs.append(imgs[k][y0 : y0 + 32, x0 : x0 + 32])
                ys.append(masks[k][y0 : y0 + 32, x0 : x0 + 32])
            x = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
            y = torch.from_numpy(np.stack(ys)[:, None].astype(np.float32))
            out = model(x)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, y, pos_weight=torch.tensor(5.0))
            if out.part is not None:
                loss = loss + decision_loss(out.part, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        torch.set_num_threads(threads)
    model.eval()
    meta = CheckpointMeta(name="tiny-unet", version="0.1.0", model_config=cfg, input_spec=SPEC,
                          postprocess=params, train_config={"val_fraction": 0.25, "seed": 0},
                          data_fingerprint="synthetic-test")
    return save_checkpoint(path, model, meta)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("export")
    data = make_dataset(tmp / "data")
    # half of each batch is cropped around a blob and the lr decays: with uniform crops and a flat lr the
    # result hung on the CPU's kernels (AVX2: recall 0.5 at 120 steps; an AMX Xeon: recall 1.0 at 120 steps,
    # 0.0 at 250, 0.25 at 400); now seeds 0-2 reach recall 1.0, IoU 1.0 at 120 and 250 steps on that Xeon
    ckpt = make_checkpoint(tmp / "run" / "best.pt", data, steps=250)
    out = tmp / "model"
    rc = ex.main(["--checkpoint", str(ckpt), "--out", str(out), "--calib-data", str(data),
                  "--calib-size", "64", "--version", "1.2.3"])
    assert rc == 0
    return {"tmp": tmp, "data": data, "ckpt": ckpt, "out": out}


def _ov_torch_gap(module: torch.nn.Module, pred: q.OVPredictor, x: np.ndarray) -> float:
    """Largest probability difference between the torch module and its OpenVINO conversion."""
    with torch.no_grad():
        pt = torch.sigmoid(module(torch.from_numpy(x)))[:, 0].numpy()
    return float(np.abs(pt - pred.infer_tiles(x)).max())


def test_openvino_fp32_matches_torch(exported: dict[str, Any]) -> None:
    module, meta = load_model(exported["ckpt"])
    pred = q.OVPredictor(ex.convert(module, meta), SPEC)
    image = cv2.imread(str(next((exported["data"] / "images").glob("pit_*.png"))), cv2.IMREAD_GRAYSCALE)
    tiles, _ = ex.preprocess(image, SPEC)
    rnd = np.random.default_rng(1).uniform(0, 255, (2, 1, 64, 64)).astype(np.float32)
    for x in (tiles, rnd, np.zeros_like(rnd), np.full_like(rnd, 255.0)):
        assert _ov_torch_gap(module, pred, x) < 1e-4


@pytest.mark.parametrize("options", [dict(space_to_depth=4), dict(upsample="nearest")], ids=str)
def test_model_options_convert_exactly(options: dict[str, Any]) -> None:
    """pixel_unshuffle and bilinear / nearest upsampling go through the PyTorch frontend unchanged
    (tile 64; stride 2**2 * 4 = 16 with space-to-depth), checked with random weights and pixels."""
    torch.manual_seed(0)
    module = build_model(UNetConfig(base_width=4, depth=2, max_width=16, **options)).eval()
    meta = type("Meta", (), {"input_spec": SPEC})()
    pred = q.OVPredictor(ex.convert(module, meta), SPEC)
    x = np.random.default_rng(2).uniform(0, 255, (2, 1, 64, 64)).astype(np.float32)
    assert _ov_torch_gap(module, pred, x) < 1e-4


def test_package_contents(exported: dict[str, Any]) -> None:
    out: Path = exported["out"]
    meta = read_package(out)
    assert meta.precision == "int8" and meta.version == "1.2.3" and meta.name == "tiny-unet"
    assert {"model.xml", "model.bin", "fp32/model.xml", "fp32/model.bin", "export_report.json"} <= set(meta.files)
    assert meta.input == SPEC and meta.postprocess == PARAMS
    assert meta.data_fingerprint == "synthetic-test"
    assert set(meta.tools) >= {"torch", "openvino", "nncf"}
    assert meta.extra["train_config"]["val_fraction"] == 0.25 and "model_config" in meta.extra
    gate = meta.metrics["gate"]
    assert gate["passed"] and gate["pixel_iou_drop"] <= 0.01 and not gate["missed_defective_parts"]
    # the shipped model really is quantized: its FakeQuantize count is recorded and matches the IR
    shipped = ov.Core().read_model(str(exported["out"] / "model.xml"))
    assert gate["quantizers"] == q.count_quantized(shipped) > 0
    assert q.count_quantized(ov.Core().read_model(str(exported["out"] / "fp32" / "model.xml"))) == 0
    for key in ("fp32", "int8"):
        assert {"pixel_iou", "image_f1", "image_recall", "n_images", "n_defective"} <= set(meta.metrics[key])
    assert meta.metrics["fp32"]["image_recall"] >= 0.8  # the model has really learned the blobs
    report = json.loads((out / "export_report.json").read_text())
    assert report["precision"] == "int8" and report["torch_vs_ov_fp32_max_abs"] < 1e-4
    assert set(report["speed_ms_per_tile"]) == {"fp32_ms", "int8_ms"}
    # the CPU check the daemon runs at load (edge.cpu_check): tiles with defects first, and on the
    # exporting machine the shipped INT8 model is within what it allows
    assert "cpu_check.npz" in meta.files and report["cpu_check"]["passed"] and report["cpu_check"]["tiles"] >= 2
    with np.load(out / "cpu_check.npz") as z:
        assert z["tiles"].dtype == np.uint8 and z["tiles"].shape[1:] == (1, SPEC.tile, SPEC.tile)
    check = run_check(out, Inferencer(out, num_requests=1))
    assert check is not None and check.passed and check.map_mean_diff == pytest.approx(
        report["cpu_check"]["map_mean_diff"], abs=1e-4)
    assert not shipped.has_rt_info(["model_info"])  # package.json is the one metadata source
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_int8_verdicts_agree_with_fp32(exported: dict[str, Any]) -> None:
    gate = read_package(exported["out"]).metrics["gate"]
    assert gate["n_images"] >= 8
    assert gate["verdict_disagreements"] / gate["n_images"] <= 0.1


def test_roundtrip_without_torch(exported: dict[str, Any]) -> None:
    """The daemon side loads the package without torch and reaches the verdicts export recorded."""
    ds = load_dataset(exported["data"])
    _, val = split_dataset(ds.samples, 0.25, 0)
    script = (
        "import json, sys, cv2\n"
        "from edge.inference import Inferencer\n"
        "inf = Inferencer(sys.argv[1])\n"
        "paths = json.loads(sys.argv[2])\n"
        "flags = [bool(inf.inspect(cv2.imread(p, cv2.IMREAD_GRAYSCALE)).regions) for p in paths]\n"
        "print(json.dumps({'flags': flags, 'torch': 'torch' in sys.modules}))\n"
    )
    paths = [str(s.image_path) for s in val]
    res = subprocess.run([sys.executable, "-c", script, str(exported["out"]), json.dumps(paths)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    truth = [bool(s.defective) for s in val]
    m = read_package(exported["out"]).metrics["int8"]
    tp = sum(f and t for f, t in zip(got["flags"], truth, strict=True))
    fp = sum(f and not t for f, t in zip(got["flags"], truth, strict=True))
    assert (tp, fp, len(paths)) == (m["image_tp"], m["image_fp"], m["n_images"])


def test_check_gate_rules() -> None:
    def ev(iou: float, flagged: list[bool]) -> q.Evaluation:
        return q.Evaluation({"pixel_iou": iou}, flagged, [True, True, False], ["a", "b", "c"])

    assert q.check_gate(ev(0.6, [True, True, False]), ev(0.595, [True, True, True]), 0.01)["passed"]
    bad_iou = q.check_gate(ev(0.6, [True, True, False]), ev(0.58, [True, True, False]), 0.01)
    assert not bad_iou["passed"] and "pixel IoU drops" in bad_iou["reason"]
    missed = q.check_gate(ev(0.6, [True, False, False]), ev(0.7, [False, False, False]), 0.01)
    assert not missed["passed"] and missed["missed_defective_parts"] == ["a"]


def test_gate_failure_falls_back_to_fp16(exported: dict[str, Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A model that fails the gate twice is shipped as FP16, loudly, with the reason recorded.

    The gate is forced to fail; plain and accuracy-controlled NNCF quantization run for real."""
    def failing_gate(ref: q.Evaluation, cand: q.Evaluation, max_drop: float) -> dict[str, Any]:
        return {**real_gate(ref, cand, max_drop), "passed": False, "reason": "forced by test"}

    real_gate = q.check_gate
    monkeypatch.setattr(q, "check_gate", failing_gate)
    out = tmp_path / "model"
    assert ex.main(["--checkpoint", str(exported["ckpt"]), "--out", str(out), "--calib-data",
                    str(exported["data"]), "--calib-size", "16"]) == 0
    meta = read_package(out)
    assert meta.precision == "fp16"
    gate = meta.metrics["gate"]
    assert gate["passed"] is False and gate["fallback"] == "fp16" and gate["reason"] == "forced by test"
    assert gate["method"] == "nncf.quantize_with_accuracy_control" and "plain_int8" in gate
    assert ex.AC_TARGET_SHARE < 1 and gate["accuracy_control_target_drop"] == pytest.approx(0.01 * ex.AC_TARGET_SHARE)
    assert "fp16" in meta.metrics and "int8" in meta.metrics
    assert gate["fallback_check"]["pixel_iou_drop"] <= 0.01  # FP16 itself is judged, not assumed fine
    assert "INT8 FAILED THE ACCURACY GATE" in capsys.readouterr().err


def test_failed_export_keeps_old_package(exported: dict[str, Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "package.json").write_text("{}")

    def boom(*a: Any, **k: Any) -> Any:
        raise ex.ExportError("quantizer exploded")

    monkeypatch.setattr(q, "quantize_int8", boom)
    assert ex.main(["--checkpoint", str(exported["ckpt"]), "--out", str(out), "--calib-data",
                    str(exported["data"]), "--calib-size", "16"]) == 2
    assert (out / "package.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_an_out_that_is_not_a_package_is_refused_before_any_work(exported: dict[str, Any], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A file or a folder of other things at --out: refused at once (it was refused after calibration and the
    gate), and left as it was."""
    def must_not_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(ex, "load_model", must_not_load)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "photo.png").write_bytes(b"x")
    for out in (tmp_path / "notes.txt", tmp_path / "folder"):
        assert ex.main(["--checkpoint", str(exported["ckpt"]), "--out", str(out), "--calib-data",
                        str(exported["data"])]) == 2
        assert f"{out} exists and is not a model package; choose another --out" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "folder" / "photo.png").read_bytes() == b"x"


def test_accuracy_control_budget_fits_the_time_or_falls_back() -> None:
    """Ranking plus reverting stay within the export's time budget; when one validation alone
    takes too long, accuracy control is skipped (0) so the export falls back at once."""
    from training.release.quantize import restorer_budget

    iterations, subset = restorer_budget(300.0, seconds_per_validation=10.0, n_quantized=23, n_val=190)
    assert 1 <= iterations <= 23 and 8 <= subset <= 190
    per_image = 10.0 / 190
    assert iterations * 10.0 + subset * per_image * 23 <= 300.0
    assert restorer_budget(300.0, seconds_per_validation=400.0, n_quantized=23, n_val=190) == (0, 0)


def test_decision_head_exports_a_second_output_through_int8(tmp_path: Path, exported: dict[str, Any]) -> None:
    """A model with a decision head: two named outputs, sigmoid in the graph, parity with torch for
    both, INT8 judged on part-level verdicts, both thresholds in the package; the one-output package of
    the module fixture keeps reading as before."""
    data = exported["data"]
    params = PostprocessParams(pixel_threshold=0.5, min_area=4, open_radius=0, close_radius=1, part_threshold=0.5)
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", data, steps=250, decision_head=True, params=params)
    out = tmp_path / "model"
    report = ex.export(ex.ExportRequest(ckpt, out, data, calib_size=64))
    assert report["torch_vs_ov_fp32_max_abs"] < 1e-4  # map and part probability alike
    meta = read_package(out)
    assert meta.postprocess.part_threshold == 0.5 and meta.postprocess.pixel_threshold == 0.5
    assert json.loads((out / "package.json").read_text())["postprocess"]["part_threshold"] == 0.5
    for xml in (out / "model.xml", out / "fp32" / "model.xml"):
        model = ov.Core().read_model(str(xml))
        assert [sorted(o.get_names()) for o in model.outputs] == [["probability"], ["part_probability"]]
        assert [list(o.get_partial_shape().to_shape()) for o in model.outputs] == [[1, 1, 64, 64], [1, 1]]
    gate = meta.metrics["gate"]
    assert gate["verdict_by"] == "part_score" and "part_score_max_abs_diff" in gate
    assert meta.metrics["fp32"]["part_threshold"] == 0.5
    assert meta.metrics["fp32"]["image_recall"] >= 0.8  # the head has learned the blobs
    from edge.inference import Inferencer

    inf = Inferencer(out, num_requests=1)
    assert inf.has_part
    image = cv2.imread(str(next((data / "images").glob("pit_*.png"))), cv2.IMREAD_GRAYSCALE)
    det = inf.inspect(image)
    assert det.part_score is not None and 0 <= det.part_score <= 1 and det.part_threshold == 0.5
    old = read_package(exported["out"])
    assert old.postprocess.part_threshold is None and "part_threshold" not in json.loads(
        (exported["out"] / "package.json").read_text())["postprocess"]
    assert not Inferencer(exported["out"], num_requests=1).has_part
