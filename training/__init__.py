"""Training side: data, augmentation, U-Net, training, validation, calibration, export."""
