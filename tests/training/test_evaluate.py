"""evaluate_predictions by hand, the evaluate CLI on a tiny checkpoint and package, pictures."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.contract import InputSpec, PostprocessParams
from tests.tiny_package import make_part
from training.core.evaluate import evaluate_predictions, main
from training.core.pictures import save_training_curves, save_validation_grid

REQUIRED = ("image_accuracy", "image_precision", "image_recall", "image_f1", "image_ap", "pixel_precision",
            "pixel_recall", "pixel_f1", "pixel_iou", "n_images", "n_defective", "pixel_threshold", "min_area",
            "image_tp", "image_fp", "image_fn", "image_tn", "pixel_tp", "pixel_fp", "pixel_fn", "pixel_tn")


def test_evaluate_predictions_by_hand() -> None:
    z = np.zeros((20, 20), np.float32)
    hit, hit_mask = z.copy(), np.zeros((20, 20), np.uint8)
    hit[2:6, 2:6] = 0.9  # 16 px predicted
    hit_mask[2:6, 2:8] = 1  # 24 px true -> tp 16, fn 8
    alarm = z.copy()
    alarm[10:13, 10:13] = 0.7  # good part, 9 px false alarm
    miss_mask = np.zeros((20, 20), np.uint8)
    miss_mask[0:2, 0:2] = 1  # defect the model misses: fn 4
    miss = z.copy()
    miss[0, 0] = 0.3
    params = PostprocessParams(pixel_threshold=0.5, min_area=4, close_radius=0)
    m = evaluate_predictions([hit, alarm, miss], [hit_mask, np.zeros_like(hit_mask), miss_mask], params)
    assert set(REQUIRED) <= set(m)
    assert (m["image_tp"], m["image_fp"], m["image_fn"], m["image_tn"]) == (1, 1, 1, 0)
    assert (m["pixel_tp"], m["pixel_fp"], m["pixel_fn"]) == (16, 9, 12)
    assert m["pixel_iou"] == pytest.approx(16 / 37)
    assert m["image_f1"] == pytest.approx(0.5)
    # scores 0.9 (+), 0.7 (-), 0.3 (+): AP = 0.5 * 1 + 0.5 * 2/3
    assert m["image_ap"] == pytest.approx(5 / 6)
    assert (m["n_images"], m["n_defective"], m["min_area"]) == (3, 2, 4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generic layout: images/ + masks/ (mask = the dark blob make_part paints)."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(6):
        img = make_part(defect=i % 2 == 0, seed=i)
        cv2.imwrite(str(root / "images" / f"part{i}.png"), img)
        cv2.imwrite(str(root / "masks" / f"part{i}.png"), ((img < 100) * 255).astype(np.uint8))
    return root


def test_cli_on_tiny_package(tiny_package: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    grid = tmp_path / "grid.png"
    rc = main(["--model", str(tiny_package), "--data", str(dataset), "--json", str(out),
               "--grid", str(grid), "--min-area", "5", "--no-progress"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(REQUIRED) <= set(result)
    assert result["model_kind"] == "package" and result["min_area"] == 5
    assert result["n_images"] == 6 and result["n_defective"] == 3
    assert result["image_recall"] == 1.0 and result["image_accuracy"] == 1.0
    assert result["image_accuracy_bound"] == 1.0  # no threshold could do better than the shipped one
    assert len(result["per_image"]) == 6
    assert grid.stat().st_size > 0
    taken = tmp_path / "taken"  # a folder at --json: refused before inference (it failed after, leaving taken.tmp)
    taken.mkdir()
    assert main(["--model", str(tiny_package), "--data", str(dataset), "--json", str(taken), "--no-progress"]) == 2
    assert not (tmp_path / "taken.tmp").exists()


def test_cli_compares_with_a_baseline(tiny_package: Path, dataset: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--baseline: the model in service and the candidate on the same (reviewed) parts, side by side."""
    out = tmp_path / "cmp.json"
    rc = main(["--model", str(tiny_package), "--baseline", str(tiny_package), "--data", str(dataset),
               "--json", str(out), "--min-area", "100000", "--no-progress"])  # the candidate misses every defect
    assert rc == 0
    cmp = json.loads(out.read_text())["vs_baseline"]
    assert cmp["metrics"]["image_recall"]["baseline"] == 1.0 and cmp["metrics"]["image_recall"]["new"] == 0.0
    assert len(cmp["broken"]) == 3 and cmp["fixed"] == []
    assert "verdicts fixed by the new model: 0, broken: 3" in capsys.readouterr().out


def test_cli_on_tiny_checkpoint_val_split(dataset: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from training.core.checkpoint import CheckpointMeta, save_checkpoint
    from training.core.unet import UNetConfig, build_model

    torch.manual_seed(0)
    cfg = UNetConfig(base_width=4, depth=2, max_width=8)
    meta = CheckpointMeta(name="tiny", version="0.0.1", model_config=cfg,
                          input_spec=InputSpec(tile=64, overlap=8), postprocess=PostprocessParams(),
                          train_config={"val_fraction": 0.5, "seed": 0})
    ckpt = save_checkpoint(tmp_path / "tiny.pt", build_model(cfg), meta)
    out = tmp_path / "m.json"
    rc = main(["--model", str(ckpt), "--data", str(dataset), "--json", str(out), "--split", "val",
               "--no-progress"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(REQUIRED) <= set(result)
    assert result["model_kind"] == "checkpoint" and result["split"] == "val"
    assert 0 < result["n_images"] < 6
    assert result["image_ap"] is None or 0.0 <= result["image_ap"] <= 1.0  # NaN is written as null


def test_cli_bad_model_and_bad_data_exit_2(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_model.pt"
    assert main(["--model", str(missing), "--data", str(dataset), "--json", str(tmp_path / "a.json")]) == 2
    assert str(missing) in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["--model", str(junk), "--data", str(dataset), "--json", str(tmp_path / "a.json")]) == 2
    assert str(junk) in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()


def test_training_curves_plot_what_is_there(tmp_path: Path) -> None:
    csv_path = tmp_path / "log.csv"
    csv_path.write_text("epoch,step,time_s,lr,train_loss,val_loss,image_f1,pixel_iou\n"
                        "1,10,1.0,0.001,0.9,0.8,0.5,0.2\n2,20,2.0,0.0005,0.5,,,\n3,30,3.0,0.0001,0.3,0.4,0.9,0.6\n")
    assert save_training_curves(csv_path, tmp_path / "c.png").stat().st_size > 0
    sparse = tmp_path / "sparse.csv"
    sparse.write_text("epoch,train_loss\n1,0.5\n")
    assert save_training_curves(sparse, tmp_path / "s.png").stat().st_size > 0


def test_validation_grid_puts_errors_first(tmp_path: Path) -> None:
    img = np.full((16, 16), 128, np.uint8)
    good_mask, bad_mask = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    bad_mask[4:8, 4:8] = 1
    p_fp = np.zeros((16, 16), np.float32)
    p_fp[1:4, 1:4] = 0.9
    probs = [np.zeros((16, 16), np.float32), p_fp, np.zeros((16, 16), np.float32)]
    path = save_validation_grid([img] * 3, [good_mask, good_mask, bad_mask], probs, PostprocessParams(),
                                tmp_path / "g.png", max_rows=2)
    assert path.stat().st_size > 0
    from training.core.pictures import pick_rows

    assert pick_rows([False, False, True], [False, True, False], [0.1, 0.9, 0.2], 2) == [2, 1]


def test_cli_judges_a_part_output_by_part_threshold(dataset: Path, tmp_path: Path) -> None:
    """A package with a part output: verdicts follow part_threshold, image AP ranks by the part score,
    and --part-threshold overrides it (a threshold above every score passes every part)."""
    from tests.tiny_package import make_tiny_package

    pkg = make_tiny_package(tmp_path / "pkg", part="max", part_threshold=0.5)
    out = tmp_path / "m.json"
    assert main(["--model", str(pkg), "--data", str(dataset), "--json", str(out), "--no-progress",
                 "--grid", str(tmp_path / "g.png")]) == 0
    result = json.loads(out.read_text())
    assert result["part_threshold"] == 0.5 and result["image_recall"] == 1.0 and result["image_accuracy"] == 1.0
    assert all("part_score" in row for row in result["per_image"])
    assert all(row["score"] == row["part_score"] for row in result["per_image"])
    assert main(["--model", str(pkg), "--data", str(dataset), "--json", str(out), "--no-progress",
                 "--part-threshold", "0.95"]) == 0
    high = json.loads(out.read_text())
    assert high["image_recall"] == 0.0 and high["pixel_iou"] == result["pixel_iou"]  # regions unchanged


def test_ap_ranks_by_the_regions_when_they_decide(dataset: Path, tmp_path: Path) -> None:
    """A part output without a part_threshold does not decide: image AP ranks parts by the region
    score the station judges by, and the part output's AP is reported on its own."""
    from tests.tiny_package import make_tiny_package

    pkg = make_tiny_package(tmp_path / "pkg", part="max", part_threshold=None)
    out = tmp_path / "m.json"
    assert main(["--model", str(pkg), "--data", str(dataset), "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["part_threshold"] is None and "image_ap_part_output" in result
    rows = result["per_image"]
    assert all("part_score" in row for row in rows)
    assert all(row["score"] < 0.5 or row["n_regions"] > 0 for row in rows)  # the region score, not the head's
    assert any(row["score"] != row["part_score"] for row in rows)


def test_cli_on_a_checkpoint_with_a_decision_head(dataset: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from training.core.checkpoint import CheckpointMeta, save_checkpoint
    from training.core.unet import UNetConfig, build_model

    torch.manual_seed(0)
    cfg = UNetConfig(base_width=4, depth=2, max_width=8, decision_head=True)
    meta = CheckpointMeta(name="tiny", version="0.0.1", model_config=cfg, input_spec=InputSpec(tile=64, overlap=8),
                          postprocess=PostprocessParams(part_threshold=0.5), train_config={})
    ckpt = save_checkpoint(tmp_path / "head.pt", build_model(cfg), meta)
    out = tmp_path / "m.json"
    assert main(["--model", str(ckpt), "--data", str(dataset), "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["part_threshold"] == 0.5 and result["n_images"] == 6
    assert all(0.0 <= row["part_score"] <= 1.0 for row in result["per_image"])


def test_errors_are_also_counted_per_physical_part_under_a_parts_rule() -> None:
    """Five exposures of one tile are one tile: a miss in two of them is one tile with a miss."""
    from training.core.data import Sample
    from training.core.evaluate import errors_by_physical_part

    names = ["crack_exp1_num_10", "crack_exp2_num_20", "crack_exp3_num_30", "free_exp1_num_40", "free_exp2_num_50",
             "free_exp1_num_60"]
    samples = [Sample(n, Path(f"/x/{n}.png"), None, n.split("_")[0], n.startswith("crack")) for n in names]
    verdicts = [False, True, False, True, False, False]  # the tile missed in 2 of 3; one good tile flagged once
    rows = [{"defective": s.defective, "predicted": v} for s, v in zip(samples, verdicts, strict=True)]
    b = errors_by_physical_part(rows, samples, r"_exp(?P<shot>\d+)_num_(?P<seq>\d+)$")
    assert b is not None
    assert (b["parts"], b["defective_parts"], b["good_parts"]) == (3, 1, 2)
    assert (b["defective_parts_with_a_miss"], b["good_parts_with_a_false_alarm"]) == (1, 1)
    assert errors_by_physical_part(rows, samples, None) is None
