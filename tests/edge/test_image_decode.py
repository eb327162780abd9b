"""One decoder for every reader of part images: hostile bytes get a specific refusal, never an OpenCV traceback."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.image_decode import ImageDecodeError, decode_image_bytes, read_image_file
from tests.daemon_proc import ROOT
from tests.faults.harness import encode, png_bomb


def test_images_decode_as_stored() -> None:
    deep = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    got = decode_image_bytes(encode(".png", deep))
    assert got.dtype == np.uint16 and np.array_equal(got, deep)
    bgra = np.dstack([np.full((8, 9), v, np.uint8) for v in (1, 2, 3, 4)])
    assert decode_image_bytes(np.frombuffer(encode(".png", bgra), np.uint8)).shape == (8, 9, 4)


@pytest.mark.parametrize(("blob", "words"), [
    (b"", "not a readable image (0 bytes)"),
    (b"hello, this is a text file\n", "not a readable image (27 bytes"),
    (encode(".png", np.full((50, 60), 9, np.uint8))[:40], "not a readable image (40 bytes"),
])
def test_what_is_not_an_image_is_refused_as_such(blob: bytes, words: str) -> None:
    with pytest.raises(ImageDecodeError, match="^" + re.escape(words)):
        decode_image_bytes(blob)


def test_a_bomb_is_refused_by_its_header_before_decoding() -> None:
    bomb = png_bomb(9000, 5000)  # 45 MP in ~45 kB, over the 40 MP default
    with pytest.raises(ImageDecodeError, match=r"9000x5000 = 45000000 pixels by its header, more than the limit of "
                                               r"40000000; not decoded"):
        decode_image_bytes(bomb)
    with pytest.raises(ImageDecodeError, match="more than the limit of 100;"):
        decode_image_bytes(encode(".png", np.zeros((20, 30), np.uint8)), max_pixels=100)


def test_formats_whose_header_is_not_read_stop_at_the_decoders_limit(tmp_path: Path) -> None:
    """A WebP's size is not parsed here: OpenCV's limit (read once at import, hence a fresh process) stops it."""
    webp = tmp_path / "part.png"  # a lying extension changes nothing: the bytes decide
    webp.write_bytes(encode(".webp", np.full((200, 300), 170, np.uint8)))
    code = textwrap.dedent(f"""
        import os
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = "10000"
        from edge.image_decode import ImageDecodeError, read_image_file
        try:
            read_image_file({str(webp)!r})
        except ImageDecodeError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == ("more than the decoder's limit of 10000 pixels (OPENCV_IO_MAX_IMAGE_PIXELS raises "
                                  "it); not decoded"), out.stderr
    assert read_image_file(webp).shape[:2] == (200, 300)  # under this process's 40 MP it is a fine image


def test_a_missing_file_is_an_oserror_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"nowhere\.png"):
        read_image_file(tmp_path / "nowhere.png")
    cv2.imwrite(str(tmp_path / "ok.png"), np.full((10, 12), 7, np.uint8))
    assert read_image_file(tmp_path / "ok.png").shape == (10, 12)
