"""Training a model: data, augmentation, U-Net, losses, the loop, validation, calibration, checkpoints.

Imports only edge/ (the shared pre- and post-processing and verdict rules), never training.release or
training.demo.
"""
