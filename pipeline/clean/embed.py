"""What an image looks like to pass 2's neighbour search: a few blurred grey thumbnails.

Consumes the grey pixels of a normalised image (in the decode workers). Produces its
``VIEWS`` embeddings, each a unit-norm, zero-mean, blurred ``EMBEDDING_SIDE``² thumbnail, for
the image and for its mirror, packed as base64 float16 (the analysis log stores them):

- ``full``: the whole picture once uniform borders (letterboxing, padding) are trimmed.
- ``centre``: its central ``CENTRE`` fraction, which a 10 % crop, a 10° rotation or a small
  perspective change moves far less than the corners (measured on bench/clean_recall.py:
  the true copy is among the 10 nearest neighbours of the union of both views for 0.99 of
  (original, copy) pairs, against 0.82 for the unblurred, untrimmed whole-image thumbnail).
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

EMBEDDING_SIDE = 16
VIEWS = ("full", "centre")
CENTRE = 0.7  # fraction of each side kept by the centre view
BLUR_SIGMA = 1.0  # thumbnail pixels: tolerance to small shifts and rotations
TRIM_TOLERANCE = 8  # grey levels: how far from the corner colour a border may stray
TRIM_MIN_AREA = 0.3  # never trim an image to less than this fraction (a plain subject)


def content_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the picture inside uniform borders of the top-left
    corner's colour (letterbox bars); the whole image when there are none, or when what they
    frame is under TRIM_MIN_AREA of it (a plain subject)."""
    height, width = grey.shape
    content = np.abs(grey.astype(np.int16) - int(grey[0, 0])) > TRIM_TOLERANCE
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if not len(rows) or not len(cols):
        return 0, 0, width, height
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (bottom - top) * (right - left) < TRIM_MIN_AREA * grey.size:
        return 0, 0, width, height
    return left, top, right, bottom


def trim_borders(grey: np.ndarray) -> np.ndarray:
    """``grey`` without uniform borders of its top-left corner's colour (letterbox bars)."""
    left, top, right, bottom = content_box(grey)
    return grey[top:bottom, left:right]


def view_vectors(grey: np.ndarray) -> np.ndarray:
    """The ``VIEWS`` embeddings of a uint8 grey image, one row each (float32)."""
    trimmed = trim_borders(grey)
    height, width = trimmed.shape
    keep_h, keep_w = max(1, round(height * CENTRE)), max(1, round(width * CENTRE))
    top, left = (height - keep_h) // 2, (width - keep_w) // 2
    crops = (trimmed, trimmed[top : top + keep_h, left : left + keep_w])
    vectors = []
    for crop in crops:
        thumb = cv2.resize(crop, (EMBEDDING_SIDE, EMBEDDING_SIDE), interpolation=cv2.INTER_AREA)
        thumb = cv2.GaussianBlur(thumb.astype(np.float32), (0, 0), BLUR_SIGMA)
        vector = thumb.ravel()
        vector -= vector.mean()
        norm = float(np.linalg.norm(vector))
        vectors.append(vector / norm if norm > 0 else vector)
    return np.stack(vectors)


def encode_views(grey: np.ndarray) -> tuple[str, str]:
    """(views of the image, views of its mirror), each packed by ``encode_vector``."""
    mirror = np.ascontiguousarray(grey[:, ::-1])
    return encode_vector(view_vectors(grey)), encode_vector(view_vectors(mirror))


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype(np.float16).tobytes()).decode("ascii")


def decode_views(text: str) -> np.ndarray:
    """Inverse of ``encode_views``' packing: (len(VIEWS), EMBEDDING_SIDE²) float32."""
    flat = np.frombuffer(base64.b64decode(text), dtype=np.float16).astype(np.float32)
    return flat.reshape(len(VIEWS), EMBEDDING_SIDE * EMBEDDING_SIDE)
