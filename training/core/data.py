"""Datasets on disk: layout detection, checks at load, reading samples, the train/val split.

Two layouts are recognised (see docs/data.md):

- generic: ``DIR/images/NAME.{png,jpg,jpeg,bmp,tif,tiff}`` + ``DIR/masks/NAME.png``.
  A mask pixel > 0 is a defect. **A missing mask means a good part** (all-zero mask).
- MVTec AD (one category folder): ``DIR/train/good/*.png``, ``DIR/test/<type>/*.png``,
  ``DIR/ground_truth/<type>/<stem>_mask.png``; ``test/good`` has no masks.

Every file is read once at load so that broken data is found before training starts, not
in epoch 7. Problems that make a sample unusable are recorded in `Dataset.skipped` (or raise
with ``strict=True``); oddities that do not are recorded in `Dataset.warnings`.
No torch here: the module stays cheap to import for tools and tests.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.image_decode import ImageDecodeError, decode_image_bytes
from edge.preprocess import FrameError, to_model_color
from training.core.part_groups import part_ids

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GENERIC_HELP = "generic layout: DIR/images/NAME.png|jpg|... with optional DIR/masks/NAME.png"
MVTEC_HELP = "MVTec AD layout: DIR/train/good/*.png, DIR/test/<type>/*.png, DIR/ground_truth/<type>/<stem>_mask.png"


class DataError(ValueError):
    """The data cannot be used as it is; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Sample:
    """One image of the dataset and where its defect mask is (None = good part)."""

    name: str  # unique id: generic = file stem, MVTec = f"{split}_{type}_{stem}"
    image_path: Path
    mask_path: Path | None
    category: str  # "good" or the defect type
    defective: bool | None  # set at load from the layout or by reading the mask


@dataclass
class Dataset:
    """Checked samples plus what was left out (`skipped`) or looked odd (`warnings`)."""

    root: Path
    layout: str  # "generic" | "mvtec"
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, message)
    _digests: dict[Path, str] = field(default_factory=dict, repr=False, compare=False)

    def fingerprint(self) -> str:
        """sha256 over the sorted sample names and file contents; paths and mtimes don't count,
        so a copy of the data elsewhere has the same fingerprint and an edited mask does not."""
        h = hashlib.sha256(b"defect-dataset-v1\n")
        for s in sorted(self.samples, key=lambda s: s.name):
            mask = self._digest(s.mask_path) if s.mask_path is not None else "-"
            h.update(f"{s.name}\t{self._digest(s.image_path)}\t{mask}\n".encode())
        return h.hexdigest()

    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._digests[path]

    def summary(self) -> str:
        """One line for logs, e.g. "946 images (289 defective, 657 good), 0 skipped"."""
        bad = sum(1 for s in self.samples if s.defective)
        text = f"{len(self.samples)} images ({bad} defective, {len(self.samples) - bad} good), {len(self.skipped)} skipped"
        return text + (f", {len(self.warnings)} warnings" if self.warnings else "")


# --------------------------------------------------------------------------- reading


def _decode(path: Path, data: bytes | None = None) -> np.ndarray:
    """Decode a file as it is stored (no EXIF rotation, so image and mask stay aligned)."""
    try:
        buf = path.read_bytes() if data is None else data
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e
    try:
        return decode_image_bytes(buf)
    except ImageDecodeError as e:
        raise DataError(f"{path}: {e}") from None


def read_image(path: Path, color: str) -> np.ndarray:
    """uint8 HxW (gray) or HxWx3 (bgr), converted exactly as the daemon converts frames."""
    try:
        return to_model_color(_decode(Path(path)), color)
    except FrameError as e:
        raise DataError(f"{path}: {e}") from e


def _mask_values(path: Path, arr: np.ndarray) -> np.ndarray:
    """Stored mask -> HxW array; colour masks count a pixel as defect if any colour channel is > 0.

    A 4-channel mask's alpha is opacity, not a label: an opaque mask (alpha 255 everywhere, as labelling tools
    export RGBA) would otherwise be a defect over the whole image. Only a mask whose colour is black throughout
    while its alpha varies is read from the alpha (tools that paint the label as transparency).
    """
    if arr.ndim == 3 and arr.shape[2] == 4:
        colour, alpha = arr[:, :, :3].max(axis=2), arr[:, :, 3]
        arr = colour if colour.any() or alpha.min() == alpha.max() else alpha
    elif arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise DataError(f"{path}: mask must be a single image, got shape {arr.shape}")
    return arr


def read_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """uint8 {0,1} mask of the given (height, width); None (good part) gives zeros."""
    if path is None:
        return np.zeros(shape, np.uint8)
    m = _mask_values(Path(path), _decode(Path(path)))
    if m.shape != tuple(shape):
        raise DataError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return (m > 0).astype(np.uint8)


def load_sample(sample: Sample, color: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask {0,1}) of one sample."""
    image = read_image(sample.image_path, color)
    return image, read_mask(sample.mask_path, image.shape[:2])


# --------------------------------------------------------------------------- loading


class _Loader:
    """Collects samples, skips and warnings while walking one dataset folder."""

    def __init__(self, root: Path, strict: bool) -> None:
        self.root, self.strict = root, strict
        self.samples: list[Sample] = []
        self.skipped: list[tuple[str, str]] = []
        self.warnings: list[tuple[str, str]] = []
        self.digests: dict[Path, str] = {}

    def skip(self, path: Path, reason: str) -> None:
        if self.strict:
            raise DataError(f"{path}: {reason}")
        self.skipped.append((str(path), reason))

    def read(self, path: Path) -> tuple[np.ndarray | None, str]:
        """Decode a file once, remembering its digest for the fingerprint; (None, why) if unusable."""
        try:
            data = path.read_bytes()
            arr = _decode(path, data)
        except (DataError, OSError) as e:
            return None, str(e).removeprefix(f"{path}: ")
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            return None, f"unsupported image shape {arr.shape}"
        if arr.dtype not in (np.uint8, np.uint16):
            return None, f"unsupported pixel type {arr.dtype} (8 or 16 bit expected)"
        self.digests[path] = hashlib.sha256(data).hexdigest()
        return arr, ""

    def add(self, name: str, image_path: Path, mask_path: Path | None, category: str | None) -> None:
        """Check one image (and mask) and add it; category None = derive it from the mask."""
        img, why = self.read(image_path)
        if img is None:
            self.skip(image_path, why)
            return
        defective = False
        if mask_path is not None:
            raw, why = self.read(mask_path)
            if raw is None:
                self.skip(mask_path, f"{why}; its image {image_path.name} is skipped too")
                return
            m = _mask_values(mask_path, raw)
            if m.shape != img.shape[:2]:
                self.skip(mask_path, f"mask is {m.shape[1]}x{m.shape[0]} but its image is "
                                     f"{img.shape[1]}x{img.shape[0]}; both are skipped")
                return
            values = np.unique(m)
            if values.size > 2:
                self.warnings.append((str(mask_path), f"mask has {values.size} distinct values (lossy?); "
                                                      "every pixel > 0 counts as defect"))
            defective = bool(values[-1] > 0)
        if category is None:  # generic layout: the name prefix names the defect type
            category = (name.split("_", 1)[0] if "_" in name else "defect") if defective else "good"
        elif category != "good" and not defective:
            self.warnings.append((str(image_path), f"in defect folder {category!r} but its mask is empty"))
        self.samples.append(Sample(name, image_path, mask_path, category, defective))


NOT_A_FILE = "not a regular file (a dangling link, a folder, a FIFO or a device)"


def _entries(folder: Path, ld: _Loader | None = None) -> tuple[list[Path], list[Path]]:
    """(visible regular files, links followed; every other visible entry), each sorted. Hidden files such as
    .DS_Store are not data.

    With `ld`, the other entries are skipped with the reason: never read (a FIFO would block the scan), never
    silently gone.
    """
    if not folder.is_dir():
        return [], []
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    others = [p for p in entries if not p.is_file()]
    if ld is not None:
        for p in others:
            ld.skip(p, f"{NOT_A_FILE}; not read")
    return files, others


def _files(folder: Path, ld: _Loader | None = None) -> list[Path]:
    return _entries(folder, ld)[0]


def _load_generic(ld: _Loader) -> None:
    images = _generic_images(ld)
    masks, unusable = _generic_masks(ld, images)
    for stem, path in images.items():
        if stem in unusable:  # a mask is there but cannot be read: not a good part
            ld.skip(path, f"its mask {unusable[stem].parent.name}/{unusable[stem].name} is {NOT_A_FILE}")
            continue
        ld.add(stem, path, masks.get(stem), None)
    _warn_misnamed(ld)


def _generic_images(ld: _Loader) -> dict[str, Path]:
    """images/ by stem; other files and a second file of a stem are skipped with the reason."""
    images: dict[str, Path] = {}
    for p in _files(ld.root / "images", ld):
        if p.suffix.lower() not in IMAGE_EXTS:
            ld.skip(p, f"not an image file (expected one of {', '.join(IMAGE_EXTS)})")
        elif p.stem in images:
            ld.skip(p, f"duplicate name: {images[p.stem].name} has the same stem")
        else:
            images[p.stem] = p
    return images


def _generic_masks(ld: _Loader, images: dict[str, Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    """(masks/ by stem, one per image: the documented .png wins; the others are skipped with the reason,
    stems whose only mask entry is not a regular file: their images are skipped, not counted as good)."""
    masks: dict[str, Path] = {}
    files, others = _entries(ld.root / "masks", ld)
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTS:
            ld.skip(p, "not an image file")
        elif p.stem not in images:
            ld.skip(p, "mask without an image (no images/" + p.stem + ".*)")
        elif p.stem in masks and p.suffix.lower() != ".png":
            ld.skip(p, f"second mask for {p.stem}; {masks[p.stem].name} is used")
        else:
            if p.stem in masks:  # prefer the documented .png over other formats
                ld.skip(masks[p.stem], f"second mask for {p.stem}; {p.name} is used")
            masks[p.stem] = p
    return masks, {p.stem: p for p in others if p.stem in images and p.stem not in masks}


def _warn_misnamed(ld: _Loader) -> None:
    """A name that says "crack_..." with an empty mask is counted as good, as the rule says,
    but it is more often a labelling slip than a good part: say so."""
    defect_prefixes = {s.category for s in ld.samples if s.defective}
    for s in ld.samples:
        prefix = s.name.split("_", 1)[0]
        if not s.defective and "_" in s.name and prefix in defect_prefixes:
            ld.warnings.append((str(s.mask_path or s.image_path),
                                f"named like defect type {prefix!r} but its mask is empty; counted as good"))


def _load_mvtec(ld: _Loader) -> None:
    gt_dir = ld.root / "ground_truth"
    used_masks: set[Path] = set()
    for split in ("train", "test"):
        split_dir = ld.root / split
        types = sorted(d for d in split_dir.iterdir() if d.is_dir()) if split_dir.is_dir() else []
        for tdir in types:
            for p in _files(tdir, ld):
                if p.suffix.lower() not in IMAGE_EXTS:
                    ld.skip(p, "not an image file")
                    continue
                name = f"{split}_{tdir.name}_{p.stem}"
                if tdir.name == "good":
                    ld.add(name, p, None, "good")
                    continue
                mask = gt_dir / tdir.name / f"{p.stem}_mask.png"
                if not mask.is_file():
                    ld.skip(p, f"defect image without mask (expected {mask})")
                    continue
                used_masks.add(mask)
                ld.add(name, p, mask, tdir.name)
    for mask in (p for d in sorted(gt_dir.glob("*")) if d.is_dir() for p in _files(d)):
        if mask not in used_masks:
            ld.skip(mask, "mask without an image")


def detect_layout(root: Path) -> str:
    """'generic' or 'mvtec' by the folders present; DataError if neither (or both)."""
    generic = (root / "images").is_dir()
    mvtec = (root / "train").is_dir() or (root / "test").is_dir()
    if generic and mvtec:
        raise DataError(f"{root}: has both images/ and train/ or test/; cannot tell the layout apart")
    if generic:
        return "generic"
    if mvtec:
        return "mvtec"
    hint = ""
    if any((d / "train").is_dir() for d in root.iterdir() if d.is_dir()):
        hint = " (this looks like the MVTec root: pass one category folder, e.g. DIR/bottle)"
    raise DataError(f"{root}: not a dataset folder{hint}. Expected the {GENERIC_HELP}, or the {MVTEC_HELP}")


def load_dataset(root: str | Path, strict: bool = False) -> Dataset:
    """Find, read and check every image and mask under `root`.

    strict=True turns every skip into a DataError (for CI on curated data); warnings never raise.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    layout = detect_layout(root)
    ld = _Loader(root, strict)
    (_load_generic if layout == "generic" else _load_mvtec)(ld)
    if not ld.samples:
        why = f"; {len(ld.skipped)} file(s) skipped, first: {ld.skipped[0][0]}: {ld.skipped[0][1]}" if ld.skipped else ""
        raise DataError(f"{root}: no usable images found{why}. Expected the "
                        f"{GENERIC_HELP if layout == 'generic' else MVTEC_HELP}")
    ld.samples.sort(key=lambda s: s.name)
    return Dataset(root, layout, ld.samples, ld.skipped, ld.warnings, ld.digests)


def merge_datasets(base: Dataset, extra: Dataset) -> Dataset:
    """The union of two checked datasets (e.g. the original data and `training review-export`'s
    reviewed parts), for fine-tuning on both. Sample names must not clash: one name, one part."""
    names = {s.name for s in base.samples}
    clash = sorted(s.name for s in extra.samples if s.name in names)
    if clash:
        raise DataError(f"{extra.root}: {len(clash)} sample name(s) also in {base.root}, first {clash[0]!r}; "
                        "rename them (review-export names end in the event id)")
    return Dataset(base.root, base.layout, sorted(base.samples + extra.samples, key=lambda s: s.name),
                   base.skipped + extra.skipped, base.warnings + extra.warnings, {**base._digests, **extra._digests})


# --------------------------------------------------------------------------- split


def _stratum_seed(seed: int, key: str) -> int:
    return zlib.crc32(f"{seed}/{key}".encode())


def _sample_key(s: Sample) -> tuple[str, str]:
    return (s.name, str(s.image_path))


def _strata(samples: list[Sample], parts: str | None) -> dict[str, list[list[Sample]]]:
    """Physical parts (each a list of its images) per stratum, strata and parts in a fixed order.

    A stratum is good/defective x category; categories with a single part are pooled per
    good/defective so they still count (see `split_dataset`).
    """
    ids, _ = part_ids(samples, parts)
    units: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        units[ids[s.name]].append(s)
    groups: dict[tuple[bool, str], list[list[Sample]]] = defaultdict(list)
    for members in units.values():
        members.sort(key=_sample_key)
        bad = any(s.defective for s in members)
        groups[(bad, next((s.category for s in members if s.defective), members[0].category))].append(members)
    strata: dict[str, list[list[Sample]]] = defaultdict(list)
    for (bad, cat), unit_list in groups.items():
        strata[f"{bad}/{cat}" if len(unit_list) > 1 else f"{bad}/*pooled*"].extend(unit_list)
    return {key: sorted(strata[key], key=lambda u: _sample_key(u[0])) for key in sorted(strata)}


def _shuffled_strata(samples: list[Sample], seed: int, parts: str | None) -> dict[str, list[list[Sample]]]:
    """`_strata`, each stratum's parts shuffled with its own seed from its key: the one draw behind the
    split, the folds and the training subset, independent of sample order and of other strata."""
    return {key: [units[i] for i in np.random.default_rng(_stratum_seed(seed, key)).permutation(len(units))]
            for key, units in _strata(samples, parts).items()}


def split_dataset(
    samples: list[Sample], val_fraction: float = 0.2, seed: int = 0, parts: str | None = None
) -> tuple[list[Sample], list[Sample]]:
    """(train, val), each sorted by name; stratified by good/defective and by category.

    The units drawn are physical parts: with a `parts` rule (training/core/part_groups.py) all
    images of one part land on the same side, and the strata count parts, not images; without
    one every image is its own part. Categories with a single part are pooled per
    good/defective so they still count. Each stratum is shuffled with its own seed from its
    key, so the result does not depend on the order of `samples`, and a new category does not
    reshuffle the others. Every stratum with >= 2 parts gives >= 1 to validation and keeps >= 1
    for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train: list[Sample] = []
    val: list[Sample] = []
    for units in _shuffled_strata(samples, seed, parts).values():
        n = len(units)
        n_val = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        for unit in units[:n_val]:
            val.extend(unit)
        for unit in units[n_val:]:
            train.extend(unit)
    return sorted(train, key=_sample_key), sorted(val, key=_sample_key)


def fold_dataset(samples: list[Sample], folds: int, fold: int, seed: int = 0,
                 parts: str | None = None) -> tuple[list[Sample], list[Sample]]:
    """(rest, held-out fold `fold` of `folds`), each sorted by name: k-fold over physical parts.

    Why: one held-out draw of ~20 % judges few parts (Magnetic-Tile: 46 tiles, 13 defective), so
    which tiles land there moves the figures more than most recipe changes do. Over fold = 0 ..
    folds-1 every part is held out exactly once. Stratified like `split_dataset`: each stratum's
    parts are shuffled with their own seed and dealt round-robin, the deal continuing across
    strata, so every fold gets its share of each category and fold sizes differ by at most one part.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got fold {fold} of {folds}")
    rest: list[Sample] = []
    held: list[Sample] = []
    dealt = 0
    for units in _shuffled_strata(samples, seed, parts).values():
        for unit in units:
            (held if dealt % folds == fold else rest).extend(unit)
            dealt += 1
    return sorted(rest, key=_sample_key), sorted(held, key=_sample_key)


@dataclass(frozen=True)
class Split:
    """Training parts, calibration parts (`val`: checkpoint, thresholds and the INT8 gate are
    chosen on them) and held-out test parts that choose nothing, so their figures are honest."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]


TEST_SALT = 7919  # the test draw uses its own stream, so changing val_fraction leaves it alone
SUBSET_SALT = 104729  # and so does the training subset of `train_share`


def split_holdout(samples: list[Sample], val_fraction: float = 0.2, test_fraction: float = 0.0,
                  seed: int = 0, parts: str | None = None, folds: int | None = None, test_fold: int = 0,
                  train_share: float = 1.0) -> Split:
    """Three-way stratified split: test first (seeded apart), then val from the rest.

    `val_fraction` and `test_fraction` are shares of ALL samples. With `test_fraction` 0 the
    result is exactly `split_dataset(samples, val_fraction, seed)` plus an empty test list, so
    runs and packages made before the test split existed reproduce their splits unchanged.
    `parts` keeps each physical part's images on one side of both draws (see `split_dataset`).
    With `folds` the test parts are fold `test_fold` of a k-fold over parts (`fold_dataset`) and
    `test_fraction` is unused: runs over every fold judge every part once. `train_share` < 1 then
    keeps that share of the training parts (stratified, seeded apart) and leaves val and test alone,
    so runs at several shares are judged on the same parts.
    """
    if not 0.0 < train_share <= 1.0:
        raise ValueError(f"train_share must be in (0, 1], got {train_share}")
    if folds is not None:
        if not 0.0 < val_fraction < 1.0 - 1.0 / folds:
            raise ValueError(f"val_fraction ({val_fraction}) + 1/folds ({1 / folds:.3f}) must be < 1")
        rest, test = fold_dataset(samples, folds, test_fold, seed + TEST_SALT, parts)
        train, val = split_dataset(rest, val_fraction / (1.0 - 1.0 / folds), seed, parts)
    elif not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction ({val_fraction}) + test_fraction ({test_fraction}) must be < 1")
    elif test_fraction == 0:
        train, val = split_dataset(samples, val_fraction, seed, parts)
        test = []
    else:
        rest, test = split_dataset(samples, test_fraction, seed + TEST_SALT, parts)
        train, val = split_dataset(rest, val_fraction / (1.0 - test_fraction), seed, parts)
    if train_share < 1.0:
        train = subsample_parts(train, train_share, seed + SUBSET_SALT, parts)
    return Split(train, val, test)


def subsample_parts(samples: list[Sample], share: float, seed: int, parts: str | None = None) -> list[Sample]:
    """`share` of the physical parts of each stratum (at least one), all images of a part, sorted by name."""
    kept: list[Sample] = []
    for units in _shuffled_strata(samples, seed, parts).values():
        for unit in units[:max(1, round(len(units) * share))]:
            kept.extend(unit)
    return sorted(kept, key=_sample_key)


def split_of_run(samples: list[Sample], train_config: Mapping[str, Any]) -> Split:
    """Redraw a training run's split from the `train_config` its checkpoint and package carry.

    `evaluate --split` and `export` use it, so the parts a run held out stay held out, whatever
    split options the run used (runs from before an option existed lack its key: its default).
    """
    folds = train_config.get("folds")
    return split_holdout(samples, float(train_config.get("val_fraction", 0.2)),
                         float(train_config.get("test_fraction", 0.0)), int(train_config.get("seed", 0)),
                         train_config.get("parts"), None if folds is None else int(folds),
                         int(train_config.get("test_fold") or 0), float(train_config.get("train_share", 1.0)))


def describe_split(train_config: Mapping[str, Any]) -> str:
    """The split options of a run, for messages that say which parts were meant."""
    tc = train_config
    held = (f"test fold {tc.get('test_fold') or 0} of {tc['folds']}" if tc.get("folds")
            else f"test_fraction={tc.get('test_fraction', 0.0)}")
    share = float(tc.get("train_share", 1.0))
    return (f"val_fraction={tc.get('val_fraction', 0.2)}, {held}, seed={tc.get('seed', 0)}, parts={tc.get('parts')}"
            + (f", train_share={share}" if share < 1.0 else ""))
