"""Training side, in three rooms that never import in the wrong direction:

- `training.core`: what it takes to train a model (data, augmentation, U-Net, losses, the loop,
  validation and threshold calibration, checkpoints);
- `training.release`: the model's way out (INT8 quantization, export to a model package, bench)
  and the way reviewed parts come back (review-export); it imports core, never the reverse;
- `training.demo`: the whole product end to end, driving both training and the edge daemon.

`python -m training COMMAND` (training/__main__.py) dispatches to each command's `main`.
"""
