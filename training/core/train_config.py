"""The training config: YAML -> validated pydantic model, with `base:` inheritance and overrides.

Every field has a description and bounds; unknown keys are errors (`extra="forbid"`), and a
bad value is reported as ``FILE: section.field: message (got VALUE)`` so a typo in line 40 of
a recipe is found before a 20-minute run starts, not after.

A product recipe can start from another with ``base: default.yaml`` (relative to the file):
the base is loaded first and the file's sections are merged over it key by key, so
configs/train/magnetic-tile.yaml holds only what differs from the general recipe.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import TypeIs

from edge.config import ConfigError  # one error type for bad configs, station or training
from edge.yaml_guard import YamlShapeError, check_yaml_shape
from training.core.losses import LossName
from training.core.part_groups import compile_rule
from training.core.unet import Stem, Upsample, network_stride

AUTO = "auto"  # a field left to training.core.recipe_auto, resolved from the data when training starts
Auto = Literal["auto"]
T = TypeVar("T")


def is_auto(value: object) -> TypeIs[Auto]:
    """True for a field left to the recipe (narrows the type on both branches)."""
    return value == AUTO


def fixed(value: T | Auto, field: str) -> T:
    """The value of a field that training.core.recipe_auto.resolve_auto has resolved; using one it has not
    is a bug in the caller, named by the field."""
    if is_auto(value):
        raise ConfigError(f"{field} is still 'auto': training.core.recipe_auto.resolve_auto must resolve it first")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSection(_Section):
    root: str | None = Field(None, description="dataset folder (generic or MVTec layout); --data overrides")
    val_fraction: float = Field(0.2, ge=0.05, lt=0.9,
                                description="calibration share, stratified per category: the checkpoint, the "
                                            "thresholds and the INT8 gate are chosen on it")
    test_fraction: float = Field(0.2, ge=0.0, lt=0.9,
                                 description="held-out share that chooses nothing: the run reports its figures "
                                             "on it (0 = no test split, figures come from the calibration parts)")
    split_seed: int | None = Field(None, ge=0, description="seed of the split (null = `seed`): fix it to compare "
                                                           "model seeds on the same held-out parts")
    folds: int | None = Field(None, ge=2, le=20,
                              description="k-fold over physical parts: the held-out parts are fold `test_fold` "
                                          "of `folds` (replaces test_fraction). Runs over test_fold 0..folds-1 "
                                          "judge every part once (scripts/recipe_report.py --folds)")
    test_fold: int = Field(0, ge=0, description="which fold is held out when `folds` is set")
    train_share: float = Field(1.0, gt=0.0, le=1.0,
                               description="share of the training parts trained on (stratified, >= 1 per category); "
                                           "calibration and held-out parts stay as they are. Below 1 it draws a "
                                           "learning curve: do more parts of this product help?")
    strict: bool = Field(False, description="fail on any unreadable file instead of skipping it")
    parts: str | None = Field(None, description="regex on image names telling which images show one physical part "
                                                "(named group `part`, or `shot` + `seq` for bursts of shots); all "
                                                "images of a part stay on one side of the split, so held-out figures "
                                                "are not from parts trained on under another light "
                                                "(training/core/part_groups.py). null = every image its own part")

    @field_validator("parts")
    @classmethod
    def _parts_rule(cls, value: str | None) -> str | None:
        if value:
            compile_rule(value)
        return value or None


def _check_int(value: Any, field: str, lo: int, hi: int, multiple_of: int = 1) -> None:
    """Bounds of an int-or-auto field (pydantic's ge/le cannot apply to a union with a literal)."""
    if value == AUTO:
        return
    if not lo <= value <= hi or value % multiple_of:
        raise ValueError(f"{field} must be 'auto' or an integer in [{lo}, {hi}]"
                         + (f" and a multiple of {multiple_of}" if multiple_of > 1 else "") + f", got {value}")


class InputSection(_Section):
    color: Literal["auto", "gray", "bgr"] = Field("auto", description="model colour mode; auto = from the data")
    tile: int | Auto = Field(256, description="inference tile side (edge input shape); auto = from the part sizes")
    overlap: int = Field(32, ge=0, le=256, description="pixels shared by neighbouring inference tiles")
    scale: float | Auto = Field(1.0, description="frame -> model resolution (<1: more context per tile, less "
                                                 "detail); auto = from the smallest defects")
    mean: list[float] | None = Field(None, description="per-channel mean of raw pixels; default 127.5")
    std: list[float] | None = Field(None, description="per-channel std of raw pixels; default 64")

    @model_validator(mode="after")
    def _bounds(self) -> InputSection:
        _check_int(self.tile, "input.tile", 32, 2048, 16)
        if not is_auto(self.scale) and not 0.05 <= self.scale <= 1.0:
            raise ValueError(f"input.scale must be 'auto' or in [0.05, 1.0], got {self.scale}")
        return self


class ModelSection(_Section):
    base_width: int = Field(16, ge=4, le=128, description="channels of the first stage")
    depth: int = Field(4, ge=1, le=6, description="number of 2x downsamplings")
    max_width: int = Field(96, ge=8, le=1024, description="channel cap of the deep stages")
    separable: bool = Field(False, description="depthwise-separable convs (fewer FLOPs)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout in the bottleneck")
    deep_supervision: bool = Field(True, description="aux heads on coarse decoder stages (training only)")
    head_bias: float = Field(-4.0, description="initial logit bias: start near 'no defect'")
    space_to_depth: Literal[1, 2, 4, "auto"] = Field(
        1, description="auto = input scale / body scale (training.core.recipe_auto); "
                       "fold s x s pixel blocks into channels: the network runs at 1/s resolution but sees "
                       "every pixel (small defects survive, unlike input.scale)")
    stem: Stem = Field(
        "pixels", description="with space_to_depth > 1: 'pixels' = the s*s raw pixels of a block as channels; "
                              "'views' = their mean, min and max (mean = the area downscale, so it learns as "
                              "fast as input.scale = 1/s, while min/max keep a few-pixel defect's contrast); "
                              "views trains on coarse targets at 1/s")
    upsample: Upsample = Field(
        "bilinear", description="decoder upsampling; nearest trains faster on a CPU (no costly bilinear backward)")
    decision_head: bool = Field(
        False, description="light part classifier on the bottleneck features + pooled logits: a second model "
                           "output (part probability per tile) that decides the verdict at the edge")
    decision_detach: bool = Field(
        True, description="the decision head trains on detached inputs (gradient-flow adjustment, Bozic et al. "
                          "2021): its loss cannot pull the segmentation away from the masks")

    @property
    def stride(self) -> int:
        """Input sides (patches, tiles) must be multiples of this (an unresolved auto counts as 1:
        the resolver only picks a space_to_depth that fits explicit patch and tile sides)."""
        return network_stride(self.depth, 1 if is_auto(self.space_to_depth) else self.space_to_depth)


class PatchSection(_Section):
    size: int | Auto = Field(128, description="training patch side P (input pixels); auto = from the part sizes")
    batch_size: int = Field(16, ge=1, le=1024, description="patches per step (per DDP rank: divided)")
    per_epoch: int = Field(1024, ge=1, description="patches per epoch over all ranks")
    defect_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of defect-centred patches")
    hard_negative_fraction: float = Field(0.25, ge=0.0, le=1.0,
                                          description="share of hard-negative patches from good parts")
    jitter: float = Field(0.35, ge=0.0, le=0.5, description="max offset of the target from the centre, x P")
    mine_images: int = Field(64, ge=0, description="good training images re-predicted per epoch to mine")
    mine_per_image: int = Field(4, ge=1, description="false-positive peaks kept per mined image")
    mine_min_prob: float = Field(0.05, ge=0.0, lt=1.0, description="ignore peaks below this probability")
    pool_size: int = Field(512, ge=1, description="hard-negative pool capacity (strongest kept)")
    hard_positive_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="share of the defect patches centred on missed defect components "
                                          "(peak probability < 0.5), mined each epoch; 0 = off")
    mine_positive_images: int = Field(32, ge=0, le=4096,
                                      description="defective training images re-predicted per epoch to find "
                                                  "missed components (bounds the mining cost)")
    paste_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="share of the defect patches that are good surface with a small defect of "
                                         "another training part pasted in (training/core/paste.py); 0 = off")
    augment: Literal["none", "light", "default"] = Field("default", description="training.core.augment strength")
    workers: int = Field(0, ge=0, le=16, description="DataLoader workers (0 = in the training process)")

    @model_validator(mode="after")
    def _fractions(self) -> PatchSection:
        _check_int(self.size, "patches.size", 32, 1024, 16)
        if self.defect_fraction + self.hard_negative_fraction > 1.0:
            raise ValueError("defect_fraction + hard_negative_fraction must be <= 1")
        return self


class LossSection(_Section):
    name: LossName = Field("bce_dice", description="bce | dice | bce_dice | focal | focal_dice")
    pos_weight: float = Field(1.0, gt=0.0, le=1000.0, description="BCE weight of defect pixels")
    dice_weight: float = Field(1.0, ge=0.0, description="weight of the Dice term in *_dice")
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0, description="focal focusing parameter")
    focal_alpha: float | None = Field(0.25, ge=0.0, le=1.0, description="focal class balance (null = off)")
    aux_weight: float = Field(0.4, ge=0.0, description="weight of the averaged deep-supervision losses")
    image_weight: float = Field(0.0, ge=0.0, le=100.0,
                                description="weight of the per-patch peak-logit BCE (trains the part score)")
    decision_weight: float = Field(1.0, ge=0.0, le=100.0,
                                   description="weight of the decision head's BCE vs. 'this patch holds a defect "
                                               "pixel' (ignored without model.decision_head)")
    component_weight: float = Field(0.0, ge=0.0, le=100.0,
                                    description="weight of the BCE of each defect component's peak logit vs. "
                                                "'defect' (every small defect must peak, not just the patch's "
                                                "largest)")


class OptimSection(_Section):
    optimizer: Literal["adam", "adamw"] = Field("adamw", description="optimiser")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="(decoupled for adamw) weight decay")
    warmup: float = Field(0.05, ge=0.0, lt=1.0, description="warm-up share of the schedule (steps or time)")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="final lr = lr x this (cosine end)")
    grad_clip: float | None = Field(1.0, gt=0.0, description="clip the gradient norm (null = off)")
    ema: float | None = Field(
        None, ge=0.5, lt=1.0, description="decay of an exponential moving average of the weights (and BN "
                                          "statistics) that is validated and saved instead of the raw weights "
                                          "(null = off)")
    autocast: Literal["auto", "bf16", "off"] = Field(
        "auto", description="forward pass in bf16 (weights stay fp32); auto = where the CPU has bf16 units")


class ScheduleSection(_Section):
    epochs: int = Field(30, ge=1, description="max epochs (with a time budget: an upper bound)")
    time_budget_min: float | None = Field(None, gt=0.0, description="wall-clock budget; drives the lr")
    max_steps: int | None = Field(None, ge=1, description="step budget (--max-steps): the lr follows the steps; "
                                                          "with a time budget too, whichever ends first")
    usual_steps: int | Auto | None = Field(None,
                                           description="steps this recipe usually needs: a run whose measured speed "
                                                       "cannot reach them within the time budget gets a warning "
                                                       "(auto: from the patch size, see training.core.recipe_auto)")
    overhead_share: float = Field(0.1, gt=0.0, le=0.5,
                                  description="validation and mining may take at most this share of the run "
                                              "(they are skipped or spaced out to stay under it)")
    patience: int | None = Field(8, ge=1, description="stop after this many validations without a new best")
    val_every: int = Field(1, ge=1, description="validate every N epochs")
    val_every_s: float | Auto | None = Field(
        None, description="or: validate at the first epoch end N s after the last; auto = validation <= ~10 % "
                          "of the time (training.core.recipe_auto)")

    @model_validator(mode="after")
    def _positive(self) -> ScheduleSection:
        if self.val_every_s is not None and not is_auto(self.val_every_s) and not self.val_every_s > 0:
            raise ValueError(f"schedule.val_every_s must be > 0, 'auto' or null, got {self.val_every_s}")
        if self.usual_steps is not None:
            _check_int(self.usual_steps, "schedule.usual_steps", 1, 1 << 30)
        return self


class ValidationSection(_Section):
    tta: bool = Field(False, description="flip test-time augmentation in validation (4x slower)")
    min_recall: float = Field(0.97, gt=0.0, le=1.0,
                              description="calibration: required image recall (then the fewest false alarms)")
    score: dict[str, float] = Field(default_factory=lambda: {"pixel_iou": 1.0, "image_f1": 1.0, "image_ap": 1.0},
                                    description="'best' = sum of weight x metric at calibrated params")
    max_min_area: int | Auto | None = Field(
        None, description="largest min_area (frame px) calibration may choose: a larger one would drop the "
                          "regions of the smallest defects the product has (auto = half the 5th percentile of "
                          "the training defects' areas; null = the whole grid)")
    batch: int = Field(8, ge=1, description="tiles per forward pass")
    grid_images: int = Field(8, ge=0, le=64, description="rows (errors first) of the final val_grid.png")

    @model_validator(mode="after")
    def _bounds(self) -> ValidationSection:
        if self.max_min_area is not None:
            _check_int(self.max_min_area, "validation.max_min_area", 0, 1 << 20)
        return self


class LogSection(_Section):
    progress: bool = Field(True, description="tqdm progress bars")
    tensorboard: bool = Field(True, description="TensorBoard events in RUN_DIR/tb (if installed)")
    threads: int | None = Field(None, ge=1, description="torch threads per process (default: cores / ranks)")


class TrainConfig(_Section):
    """A training recipe. Sections mirror the YAML file."""

    name: str = Field("defect-unet", min_length=1, description="model name recorded in the checkpoint")
    version: str = Field("0.1.0", min_length=1, description="model version recorded in the checkpoint")
    seed: int = Field(0, ge=0, description="seed of the split, the patches and the weights")
    data: DataSection = Field(default_factory=DataSection)
    input: InputSection = Field(default_factory=InputSection)
    model: ModelSection = Field(default_factory=ModelSection)
    patches: PatchSection = Field(default_factory=PatchSection)
    loss: LossSection = Field(default_factory=LossSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    log: LogSection = Field(default_factory=LogSection)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        d = self.data
        if d.folds is None and d.val_fraction + d.test_fraction >= 0.9:
            raise ValueError("data.val_fraction + data.test_fraction must be < 0.9 (parts are needed for training)")
        if d.folds is not None and d.val_fraction + 1 / d.folds >= 0.9:
            raise ValueError(f"data.val_fraction + 1/data.folds ({1 / d.folds:.3f}) must be < 0.9 "
                             f"(parts are needed for training)")
        if d.folds is not None and d.test_fold >= d.folds:
            raise ValueError(f"data.test_fold must be < data.folds ({d.folds}), got {d.test_fold}")
        if d.folds is None and d.test_fold:
            raise ValueError("data.test_fold needs data.folds (k-fold over parts)")
        stride = self.model.stride  # unresolved autos are checked when training.core.recipe_auto resolves them
        for name, side in (("patches.size", self.patches.size), ("input.tile", self.input.tile)):
            if not is_auto(side) and side % stride:
                raise ValueError(f"patches.size and input.tile must be multiples of the network stride "
                                 f"2**model.depth * model.space_to_depth = {stride} ({name} is {side})")
        if self.model.decision_head and self.loss.decision_weight <= 0:
            raise ValueError("model.decision_head needs loss.decision_weight > 0: an untrained head would decide "
                             "the verdict (or set model.decision_head: false)")
        if not is_auto(self.input.tile) and self.input.overlap * 2 >= self.input.tile:
            raise ValueError("input.overlap must be < input.tile / 2")
        for key in self.validation.score:
            if key not in SCORE_METRICS:
                raise ValueError(f"validation.score: unknown metric {key!r} (one of {', '.join(SCORE_METRICS)})")
        return self

    def auto_fields(self) -> list[str]:
        """The fields still set to "auto" (empty once training.core.recipe_auto resolved them)."""
        fields = {"input.scale": self.input.scale, "input.tile": self.input.tile, "patches.size": self.patches.size,
                  "model.space_to_depth": self.model.space_to_depth, "schedule.val_every_s": self.schedule.val_every_s,
                  "schedule.usual_steps": self.schedule.usual_steps, "validation.max_min_area": self.validation.max_min_area}
        return [k for k, v in fields.items() if v == AUTO]

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain dict for best.yaml / the checkpoint (data.root left out: it is per machine)."""
        d = self.model_dump(mode="json")
        d["data"].pop("root", None)
        return d


SCORE_METRICS = ("pixel_iou", "pixel_f1", "pixel_precision", "pixel_recall", "image_f1", "image_accuracy",
                 "image_precision", "image_recall", "image_ap")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        text = path.read_text(encoding="utf-8")
        check_yaml_shape(text)
        raw = yaml.safe_load(text) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); a config is UTF-8 YAML") from None
    except YamlShapeError as e:
        raise ConfigError(e.at(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    return deep_merge(_read_yaml((path.parent / base).resolve(), (*seen, path)), raw)


_SHORT = reprlib.Repr()  # a wrong value is quoted, not dumped (a list of a million items is "[1, 2, 3, 4, ...]")
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 80, 80


def _format(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = f" (got {_SHORT.repr(err['input'])})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        lines.append(f"{source}: {loc}: {err['msg']}{got}")
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["optim.lr=0.001", "model.separable=true"] -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def config_from_dict(d: dict[str, Any], source: str = "<config>") -> TrainConfig:
    try:
        return TrainConfig.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Config file (or the built-in defaults if None) with overrides merged over it."""
    raw = _read_yaml(Path(path).resolve()) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        raw = deep_merge(raw, overrides)
        source += " (+ command-line overrides)"
    return config_from_dict(raw, source)
