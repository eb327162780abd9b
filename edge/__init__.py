"""Edge runtime: everything a line PC runs at inference time. Never imports torch or training."""

__version__ = "0.1.0"
