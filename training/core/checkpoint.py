"""Self-describing checkpoints: a checkpoint rebuilds its model, preprocessing and thresholds alone.

Like nanoGPT's, a checkpoint carries the model arguments and the training config; unlike a bare
state dict it also carries what the edge needs (input spec, calibrated postprocessing, metrics,
data fingerprint), which export copies into the model package.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge.contract import InputSpec, PostprocessParams
from training.core.unet import UNet, UNetConfig, build_model

CHECKPOINT_FORMAT = "defect-unet-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """The checkpoint file cannot be used; the message names the file and the problem."""


@dataclass
class CheckpointMeta:
    """Everything but the tensors."""

    name: str
    version: str
    model_config: UNetConfig
    input_spec: InputSpec
    postprocess: PostprocessParams
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    train_config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    created: str = ""


def save_checkpoint(path: str | Path, model: UNet, meta: CheckpointMeta,
                    training_state: dict[str, Any] | None = None) -> Path:
    """Write atomically (tmp + rename): a crash mid-save never leaves a truncated best.pt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "name": meta.name,
        "version": meta.version,
        "created": meta.created or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_config": meta.model_config.to_dict(),
        "input_spec": meta.input_spec.to_dict(),
        "postprocess": meta.postprocess.to_dict(),
        "metrics": meta.metrics,
        "data_fingerprint": meta.data_fingerprint,
        "train_config": meta.train_config,
        "epoch": meta.epoch,
        "step": meta.step,
        "state_dict": module.state_dict(),
        "training_state": training_state or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, checked for format; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:  # weights_only: tensors and plain data; a pickle that names other code is refused, never run
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: holds Python objects beyond tensors and plain data, which loading would run as code; refused. "
            f"Checkpoints of this project hold none (a last.pt written before its random state was stored as plain "
            f"numbers cannot be resumed). {first}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e.__class__.__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} file (written by 'python -m training train')")
    return payload


def meta_from_payload(payload: dict[str, Any]) -> CheckpointMeta:
    return CheckpointMeta(
        name=payload.get("name", "defect-unet"),
        version=payload.get("version", "0.0.0"),
        model_config=UNetConfig.from_dict(payload["model_config"]),
        input_spec=InputSpec.from_dict(payload["input_spec"]),
        postprocess=PostprocessParams.from_dict(payload["postprocess"]),
        metrics=payload.get("metrics", {}),
        data_fingerprint=payload.get("data_fingerprint", ""),
        train_config=payload.get("train_config", {}),
        epoch=int(payload.get("epoch", 0)),
        step=int(payload.get("step", 0)),
        created=payload.get("created", ""),
    )


def load_model(path: str | Path) -> tuple[UNet, CheckpointMeta]:
    """Public entry point: a checkpoint file -> (torch module in eval mode, its metadata)."""
    payload = read_checkpoint(path)
    try:
        meta = meta_from_payload(payload)
        model = build_model(meta.model_config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint: {e}") from e
    model.eval()
    return model, meta
