"""Checkpoints load as tensors and plain data only: a pickle that names code is refused, never run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training.core.checkpoint import CHECKPOINT_FORMAT, CheckpointError, read_checkpoint
from training.core.train_utils import rng_state, set_rng_state


class _Payload:
    """What a hostile checkpoint carries: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "best.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": {}, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"best\.pt: holds Python objects beyond tensors and plain data"):
        read_checkpoint(path)
    assert not marker.exists()


def test_random_state_travels_as_plain_data_and_restores_every_generator(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "last.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "training_state": {"rng": rng_state()}}, path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(read_checkpoint(path)["training_state"]["rng"])  # loads with weights_only=True
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
