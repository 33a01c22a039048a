"""Decode, validate and normalise one raw image: the per-image work, run in worker processes.

Consumes a ``DecodeTask`` (one raw file, where to write) and ``DecodeSettings`` (the
CleanConfig fields that change a per-image result). Produces an ``Analysis``: either a
removal reason (missing, corrupt, not_an_image, decompression_bomb, too_small,
bad_aspect_ratio) with its detail, or a ``DecodedImage`` whose normalised copy, fully decoded,
EXIF-rotated, first frame only, 8-bit RGB (transparency onto white, 16-bit scaled down) and
shrunk to ``max_side``, is written to ``<out>/<class>/<sha256>.<png|jpg>``.

Cost and memory are bounded by the normalised size, not the raw one: a JPEG is decoded by
libjpeg at the smallest 1/2–1/8 scale still at least ``max_side`` (every byte of it is still
decoded, so a truncated file is still caught); the pixels are hashed in strips; hashes,
embeddings and quality scores are all measured on the normalised copy.

Pillow's limits are process globals; they are set only for the duration of one decode and
restored afterwards, so a caller running clean in-process keeps its own settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import imagehash
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.clean.embed import encode_views
from pipeline.clean.quality import quality_scores
from pipeline.clean.records import Analysis, DecodedImage
from pipeline.config import CleanConfig
from pipeline.files import atomic_path

# zlib level of the normalised PNGs: at 256 px level 1 encodes 4x faster than Pillow's default
# (6) for files 7% larger; the pixels are the same.
PNG_COMPRESS_LEVEL = 1
HASH_STRIP_ROWS = 256  # rows hashed at a time: no second full-size copy of a huge image


@dataclass(frozen=True)
class DecodeSettings:
    """What a decode worker needs from CleanConfig; a cached Analysis is valid for one value."""

    min_width: int
    min_height: int
    max_aspect_ratio: float
    max_image_pixels: int
    max_side: int
    output_format: Literal["png", "jpeg"]
    jpeg_quality: int
    hash_size: int

    @classmethod
    def from_config(cls, cfg: CleanConfig) -> DecodeSettings:
        return cls(
            min_width=cfg.min_width,
            min_height=cfg.min_height,
            max_aspect_ratio=cfg.max_aspect_ratio,
            max_image_pixels=cfg.max_image_pixels,
            max_side=cfg.max_side,
            output_format=cfg.output_format,
            jpeg_quality=cfg.jpeg_quality,
            hash_size=cfg.near_dup_hash_size,
        )


@dataclass(frozen=True)
class DecodeTask:
    key: str
    raw_file: Path
    class_name: str
    out: Path  # data/clean
    settings: DecodeSettings


class Rejected(Exception):
    """A raw file that is not a usable image; ``status`` is the removal reason."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def analyse_batch(tasks: tuple[DecodeTask, ...]) -> list[Analysis]:
    """``analyse_image`` of each task: one round trip to a worker for many small images."""
    return [analyse_image(task) for task in tasks]


def analyse_image(task: DecodeTask) -> Analysis:
    """Validate, normalise and describe one raw image; write its normalised copy.

    Returns an Analysis. Never raises for a bad image: bad input is a result, not an error.
    """
    # Pillow's own limit stays off while the valid image is resized and hashed too: a caller's
    # lower limit must not fail an image clean.max_image_pixels accepts.
    with strict_pillow():
        try:
            image, frames, original_size = decode(task.raw_file, task.settings)
            validate_size(*original_size, task.settings)
        except Rejected as rejected:
            return Analysis(task.key, rejected.status, rejected.detail)
        return Analysis(task.key, "ok", image=describe(image, frames, original_size, task))


@contextlib.contextmanager
def strict_pillow() -> Iterator[None]:
    """Pillow with truncated files refused and its own pixel limit off (ours is checked from
    the header); the caller's values come back on exit."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _too_many_pixels(width: int, height: int, limit: int) -> Rejected:
    return Rejected(
        "decompression_bomb",
        f"too_many_pixels: {width}x{height} = {width * height} > clean.max_image_pixels {limit}",
    )


def decode(raw_file: Path, settings: DecodeSettings) -> tuple[Image.Image, int, tuple[int, int]]:
    """(RGB image, frame count, size after EXIF rotation) of a fully decoded raw file.

    Raises Rejected for a missing, empty, unreadable or over-large file.
    """
    if not raw_file.is_file():
        raise Rejected("missing", f"{raw_file} does not exist")
    if raw_file.stat().st_size == 0:
        raise Rejected("corrupt", "empty file (0 bytes)")
    limit = settings.max_image_pixels
    try:
        with strict_pillow(), Image.open(raw_file) as opened:
            width, height = opened.size  # from the header: nothing is decoded yet
            if width * height > limit:
                raise _too_many_pixels(width, height, limit)
            if opened.format == "JPEG":
                # libjpeg's scaled IDCT: decodes every byte, but at 1/2–1/8 scale when even
                # that is at least max_side (a 50 Mpx JPEG then needs ~1 MB, not 150).
                opened.draft(opened.mode, (settings.max_side, settings.max_side))
            # Frames and tiles can be larger than the header says; Pillow checks those while
            # decoding, against our limit.
            Image.MAX_IMAGE_PIXELS = limit
            try:
                image, frames = _load(opened)
                return image, frames, _rotated((width, height), opened)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                detail = (
                    f"too_many_pixels: a frame or tile of the {width}x{height} image is over "
                    f"clean.max_image_pixels {limit}"
                )
                raise Rejected("decompression_bomb", detail) from None
    except UnidentifiedImageError:
        raise Rejected("not_an_image", "Pillow cannot identify the file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}") from None


def _load(opened: Image.Image) -> tuple[Image.Image, int]:
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its limit; past our limit is a bomb either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        frames = getattr(opened, "n_frames", 1)
        opened.seek(0)
        opened.load()  # full decode: truncated data raises here, not at open()
        return to_rgb(ImageOps.exif_transpose(opened)), frames


def _rotated(size: tuple[int, int], opened: Image.Image) -> tuple[int, int]:
    """The header's size after EXIF rotation (orientations 5–8 swap the sides)."""
    orientation = opened.getexif().get(0x0112, 1)
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def validate_size(width: int, height: int, settings: DecodeSettings) -> None:
    """Raises Rejected (too_small, bad_aspect_ratio) for sizes the settings do not accept."""
    if width < settings.min_width or height < settings.min_height:
        raise Rejected(
            "too_small",
            f"{width}x{height} is under {settings.min_width}x{settings.min_height}",
        )
    aspect = max(width, height) / min(width, height)
    if aspect > settings.max_aspect_ratio:
        raise Rejected(
            "bad_aspect_ratio",
            f"{width}x{height}: aspect ratio {aspect:.1f} > {settings.max_aspect_ratio}",
        )


def describe(
    image: Image.Image, frames: int, original_size: tuple[int, int], task: DecodeTask
) -> DecodedImage:
    """Hashes, embeddings and quality scores of a valid image; writes its normalised copy."""
    settings = task.settings
    width, height = original_size
    sha256 = pixel_sha256(image, f"{width}x{height}:".encode())
    output = image  # shrunk in place: the full-size pixels are not needed past the hash
    output.thumbnail((settings.max_side, settings.max_side), Image.Resampling.LANCZOS)
    phash = imagehash.phash(output, hash_size=settings.hash_size)
    phash_mirror = imagehash.phash(ImageOps.mirror(output), hash_size=settings.hash_size)
    grey = np.asarray(output.convert("L"))
    suffix = ".png" if settings.output_format == "png" else ".jpg"
    clean_path = f"{task.class_name}/{sha256}{suffix}"
    target = task.out / clean_path
    if not target.exists():
        with atomic_path(target) as tmp:
            if settings.output_format == "png":
                output.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            else:
                output.save(tmp, format="JPEG", quality=settings.jpeg_quality)
    embedding, mirror_embedding = encode_views(grey)
    return DecodedImage(
        sha256=sha256,
        phash=str(phash),
        phash_mirror=str(phash_mirror),
        original_width=width,
        original_height=height,
        width=output.width,
        height=output.height,
        frames=frames,
        clean_path=clean_path,
        embedding=embedding,
        mirror_embedding=mirror_embedding,
        scores=quality_scores(grey),
    )


def pixel_sha256(image: Image.Image, prefix: bytes) -> str:
    """sha256 of ``prefix`` then the RGB bytes row by row, hashed a strip at a time."""
    digest = hashlib.sha256(prefix)
    for top in range(0, image.height, HASH_STRIP_ROWS):
        bottom = min(top + HASH_STRIP_ROWS, image.height)
        digest.update(image.crop((0, top, image.width, bottom)).tobytes())
    return digest.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's own I→L conversion clips at 255, turning a 16-bit photo white; scale instead.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode != "RGB":
        # CMYK, YCbCr, LAB, L, 1: Pillow's converters are right for these.
        image = image.convert("RGB")
    return image
