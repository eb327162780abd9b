"""Edge runtime: everything a line PC runs at inference time. Never imports torch or training."""

import os

__version__ = "0.1.0"

# OpenCV's own decoder limit. OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 is first
# imported, and its default (2**30 pixels, 3 GB as BGR) is far beyond what a station can hold.
# source.max_pixels is checked against the file header before decoding, but only for the
# formats edge.sources.folder can parse (PNG, JPEG, BMP, TIFF, PNM); a WebP, JPEG 2000 or GIF
# bomb (named .png or not) is stopped by this limit instead. It equals source.max_pixels'
# default; a station with a larger max_pixels sets the variable in its unit (Environment=).
# Set here because `python -m edge` imports this package before anything imports cv2.
DECODER_MAX_PIXELS = 40_000_000
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DECODER_MAX_PIXELS))
