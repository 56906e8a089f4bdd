"""Pictures in, one way: decoding (dtype to float in [0, 1], alpha compositing), reading a
file, and area resampling. Used by the image fit, the video fit and the NeRF loaders.

>>> import numpy as np
>>> rgba = np.array([[[255, 0, 0, 128]]], dtype=np.uint8)     # half-transparent red
>>> decode_image(rgba, background=(0.0, 0.0, 1.0)).round(3).tolist()
[[[0.502, 0.0, 0.498]]]
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np

Background = Union[float, Sequence[float]]


def to_unit_float(arr: np.ndarray) -> np.ndarray:
    """Integer pixels scaled by their dtype's maximum (8 or 16 bit), floats as they are;
    float32 either way."""
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    return arr.astype(np.float32)


def decode_image(arr: np.ndarray, background: Background = 1.0, rgb: bool = False
                 ) -> np.ndarray:
    """A decoded picture ``[H, W]`` or ``[H, W, C]`` (C = 1 to 4, any dtype) -> float32
    ``[H, W, C']`` in [0, 1].

    A last channel of alpha (gray+alpha, RGBA) is composited on ``background`` (a gray level or
    an RGB triple in [0, 1]): ``colour * alpha + background * (1 - alpha)``. ``C'`` is 1 or 3;
    ``rgb=True`` makes gray pictures RGB. Raises ``ValueError`` for any other shape.
    """
    img = to_unit_float(arr)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.size == 0 or not 1 <= img.shape[2] <= 4:
        raise ValueError(f"expected a 2-D gray, RGB or RGBA picture, got an array of shape "
                         f"{tuple(np.shape(arr))}")
    bg = np.asarray(background, dtype=np.float32).reshape(1, 1, -1)
    if img.shape[2] in (2, 4):
        colour, alpha = img[..., :-1], img[..., -1:]
        if colour.shape[2] == 1 and bg.shape[2] == 3:
            colour = np.repeat(colour, 3, axis=2)
        img = colour * alpha + bg * (1.0 - alpha)
    if rgb and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.clip(img, 0.0, 1.0)


def read_image(path: str, background: Background = 1.0, rgb: bool = False) -> np.ndarray:
    """The picture in file ``path`` (PNG, JPEG, BMP, TIFF, GIF ...; 8 or 16 bit), decoded by
    OpenCV, through :func:`decode_image`.

    Raises ``FileNotFoundError`` when there is no such file and ``ValueError`` when it cannot
    be decoded as a picture; both messages name the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image file: {path}")
    import cv2

    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)       # keeps 16-bit colour, unlike Pillow
    if arr is None:
        raise ValueError(f"{path} cannot be read as an image; use PNG or JPEG")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):       # OpenCV's BGR(A) -> RGB(A)
        arr = arr[..., [2, 1, 0, 3][:arr.shape[2]]]
    try:
        return decode_image(arr, background, rgb)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def resize_area(img: np.ndarray, W: int, H: int) -> np.ndarray:
    """``img [H0, W0, C]`` resampled to ``[H, W, C]`` by area averaging (OpenCV INTER_AREA:
    each output pixel is the mean of the input area it covers); the input itself when the
    size is unchanged."""
    if img.shape[0] == H and img.shape[1] == W:
        return img
    import cv2

    out = cv2.resize(img, (int(W), int(H)), interpolation=cv2.INTER_AREA)
    return out[..., None] if out.ndim == 2 else out
