"""Image bytes -> array, the one way every part of the project decodes a part image.

The daemon's folder source, `edge inspect`, the golden set and training's data reader all decode
files through `decode_image_bytes`, so a hostile file gets the same specific refusal everywhere instead
of an OpenCV assertion and a traceback: an image whose header announces more pixels than the
limit is refused before a byte is decoded (`image_size` reads only the header), and OpenCV's own
limit (OPENCV_IO_MAX_IMAGE_PIXELS, set in edge/__init__.py) stops the formats whose header is not
parsed here. Each message reads after "<file> is " and after "<file>: ".
"""

from __future__ import annotations

import os
from typing import Literal

import cv2
import numpy as np

from edge import DECODER_MAX_PIXELS

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HEADER_BYTES = 1 << 20  # JPEG metadata segments may come before the size


class ImageDecodeError(ValueError):
    """The bytes are not an image that can be decoded here; the message says why (without the file's name)."""


def decoder_limit() -> int:
    """OpenCV's decoder limit in pixels (the environment variable it read at import, or our default)."""
    try:
        return int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", DECODER_MAX_PIXELS))
    except ValueError:
        return DECODER_MAX_PIXELS


def decode_image_bytes(data: bytes | np.ndarray, max_pixels: int | None = None, *, header: bool = True) -> np.ndarray:
    """Decode as stored (no EXIF rotation; depth and channels unchanged).

    Raises ImageDecodeError when the bytes are empty, not an image, or an image of more than
    `max_pixels` (default: the decoder's limit) by its header or by OpenCV's own check.
    `header=False` skips the header check for a caller that has made its own (the folder source).
    """
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        raise ImageDecodeError("not a readable image (0 bytes)")
    limit = decoder_limit() if max_pixels is None else max_pixels
    size = image_size(buf) if header else None
    if size is not None and size[0] * size[1] > limit:
        raise ImageDecodeError(f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels by its header, more than the "
                               f"limit of {limit}; not decoded")
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(e):
            raise ImageDecodeError(f"more than the decoder's limit of {decoder_limit()} pixels "
                                   "(OPENCV_IO_MAX_IMAGE_PIXELS raises it); not decoded") from None
        raise ImageDecodeError(f"not a readable image ({buf.size} bytes; the decoder failed: "
                               f"{str(e).strip().splitlines()[-1][:200]})") from None
    if image is None:
        raise ImageDecodeError(f"not a readable image ({buf.size} bytes: empty, truncated or an unsupported format)")
    return image


def read_image_file(path: str | os.PathLike[str]) -> np.ndarray:
    """`decode_image_bytes` of a file; OSError when it cannot be read."""
    return decode_image_bytes(np.fromfile(os.fspath(path), dtype=np.uint8))


def image_size(blob: bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, BMP, TIFF or PNM file; None if unknown.

    Reads only the header (the first MiB), so an image's memory cost is known before it is decoded.
    """
    head = blob[:_HEADER_BYTES]
    data = head.tobytes() if isinstance(head, np.ndarray) else bytes(head)
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM" and len(data) >= 26:
            if int.from_bytes(data[14:18], "little") == 12:  # OS/2 header: 16-bit sizes
                return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
            return (abs(int.from_bytes(data[18:22], "little", signed=True)),
                    abs(int.from_bytes(data[22:26], "little", signed=True)))
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
        if data[:1] == b"P" and data[1:2] in b"123456":
            return _pnm_size(data)
    except (IndexError, ValueError):
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The size in the first start-of-frame segment, walking the markers before it."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in _JPEG_SOF:
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first image file directory."""
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    ifd = int.from_bytes(data[4:8], order)
    n = int.from_bytes(data[ifd : ifd + 2], order)
    dims: dict[int, int] = {}
    for k in range(n):
        e = ifd + 2 + 12 * k
        tag, kind = int.from_bytes(data[e : e + 2], order), int.from_bytes(data[e + 2 : e + 4], order)
        if tag in (256, 257):
            size = 2 if kind == 3 else 4
            dims[tag] = int.from_bytes(data[e + 8 : e + 8 + size], order)
    return (dims[256], dims[257]) if len(dims) == 2 else None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    """Width and height: the second and third tokens of the header (comments skipped)."""
    tokens: list[bytes] = []
    for line in data[:1024].split(b"\n"):
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 3:
            return int(tokens[1]), int(tokens[2])
    return None
