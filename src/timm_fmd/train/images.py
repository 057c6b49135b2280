"""Decoding: any image PIL opens, as the faithful 8-bit RGB image every transform expects.

``Image.open(f).convert('RGB')`` (timm's reader) is right for 8-bit images but not for the rest: PIL
clips integer images of more than 8 bits at 255 (a 16-bit grayscale PNG of values 1,799-57,311
becomes all white) and truncates float images. :func:`to_rgb` therefore

* scales integer images of more than 8 bits by their bit depth: ``round(v * 255 / (2**bits - 1))``,
  ``v / 257`` for 16 bits (``I;16*``, and ``I``: 16 bits, or the TIFF's ``BitsPerSample``;
  Pillow's PGM reader already rescales other ``maxval`` to 16 bits);
* takes float images (``F``) as values in [0, 1]: ``round(v * 255)``;
* leaves every 8-bit mode to PIL's own conversion, the one a user's inference code with timm's
  transforms applies (``1``: 0/255; ``L``: grey replicated; ``P``/``PA``: the palette colour;
  ``LA``/``RGBA``/``RGBX``: the colour, alpha dropped; ``La``/``RGBa``: premultiplied alpha
  undone, then dropped; ``CMYK``: PIL's profile-free formula; ``YCbCr``: ITU-R BT.601;
  ``LAB``: CIE L*a*b* to sRGB; ``HSV``);
* refuses, with a ``ValueError`` naming the file, what has no faithful 8-bit RGB: negative or
  out-of-range integers, float values outside [0, 1] or not finite, and modes PIL does not convert.

Deliberately not done, as in timm's reader and torchvision's ``decode_image`` default, so that
training sees the pixels inference code sees: EXIF orientation is not applied, ICC profiles are
not applied, and a multi-frame file gives its first frame. 16-bit-per-channel colour PNGs and TIFFs
arrive from Pillow's decoder already reduced to 8 bits (the high byte, within one level of
``v / 257``).
"""
from __future__ import annotations

import os
import warnings
from typing import IO, Optional, Union

import numpy as np
from PIL import Image

__all__ = ['load_rgb', 'to_rgb']

# 8-bit modes whose PIL conversion to RGB is the faithful one (see the module docstring)
_PIL_MODES = frozenset({'RGB', '1', 'L', 'P', 'PA', 'LA', 'RGBA', 'RGBX', 'RGBa', 'CMYK', 'YCbCr', 'LAB', 'HSV'})
_WIDE_INT_MODES = frozenset({'I', 'I;16', 'I;16L', 'I;16B', 'I;16N'})
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT = 258, 339


def load_rgb(source: Union[str, os.PathLike, IO[bytes]], name: Optional[str] = None) -> Image.Image:
    """Open and fully decode an image file as 8-bit RGB (see the module docstring for each mode).

    Args:
        source: a path or a binary file object.
        name: how errors name the file (default: the path, or the file object's ``name``).

    Raises:
        ValueError: naming the file, when it cannot be decoded or has no faithful 8-bit RGB form.
    """
    name = name or str(getattr(source, 'name', source))
    try:
        with Image.open(source) as img:
            img.load()  # decode now: a truncated file fails here, not in a transform
            return to_rgb(img, name)
    except ValueError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise ValueError(f'cannot decode image {name!r}: {type(e).__name__}: {e}') from e


def to_rgb(img: Image.Image, name: str = '<image>') -> Image.Image:
    """``img`` as an 8-bit RGB image; ``name`` names it in errors (see the module docstring)."""
    mode = img.mode
    if mode in _PIL_MODES:
        with warnings.catch_warnings():  # P with byte transparency: PIL suggests RGBA; the colour is what we keep
            warnings.filterwarnings('ignore', message='Palette images with Transparency', category=UserWarning)
            return img.convert('RGB')
    if mode == 'La':
        return img.convert('LA').convert('RGB')
    if mode in _WIDE_INT_MODES:
        return _gray(_scale_int(img, name))
    if mode == 'F':
        return _gray(_scale_float(img, name))
    raise ValueError(f'image {name!r} has mode {mode!r}, which timm-fmd cannot convert to 8-bit RGB faithfully; '
                     f'convert it to RGB first')


def _int_range(img: Image.Image) -> tuple:
    """``(lowest, highest)`` value the samples of a wide integer image may take."""
    tags = getattr(img, 'tag_v2', None)  # TIFF: the file states its sample depth and signedness
    if tags is not None and _TIFF_BITS_PER_SAMPLE in tags:
        bits = tags[_TIFF_BITS_PER_SAMPLE]
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        signed = tags.get(_TIFF_SAMPLE_FORMAT, 1) in (2, (2,))
        return 0, 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    return 0, 2 ** 16 - 1  # I;16*, and I from PNG / PGM (16-bit samples)


def _scale_int(img: Image.Image, name: str) -> np.ndarray:
    values = np.asarray(img).astype(np.int64)
    low, high = _int_range(img)
    if values.size and (values.min() < low or values.max() > high):
        raise ValueError(f'image {name!r} ({img.mode}) has values {values.min()}..{values.max()} outside its '
                         f'{high.bit_length()}-bit range {low}..{high}: no faithful 8-bit form')
    return (values * 510 + high) // (2 * high)  # round(v * 255 / high), half up, in exact integers


def _scale_float(img: Image.Image, name: str) -> np.ndarray:
    values = np.asarray(img, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size < values.size or (finite.size and (finite.min() < 0.0 or finite.max() > 1.0)):
        found = f'{finite.min():.6g}..{finite.max():.6g}' if finite.size else 'no finite values'
        if finite.size < values.size:
            found += f' and {values.size - finite.size} NaN/inf'
        raise ValueError(f'image {name!r} (float mode F) has values {found}; float images must lie in [0, 1]')
    return np.floor(values * 255 + 0.5)  # round half up, as the integer path


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8)).convert('RGB')  # a 2-D uint8 array is mode L
