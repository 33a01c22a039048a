"""Decode, validate and normalise one raw image: the per-image work, run in worker processes.

Consumes a ``DecodeTask`` (one raw file, where to write) and ``DecodeSettings`` (the
CleanConfig fields that change a per-image result). Produces an ``Analysis``: either a
removal reason (missing, corrupt, not_an_image, decompression_bomb, too_small,
bad_aspect_ratio) with its detail, or a ``DecodedImage`` whose normalised copy, fully decoded,
EXIF-rotated, first frame only, 8-bit RGB (transparency onto white, 16-bit scaled down) and
shrunk to ``max_side``, is written to ``<out>/<class>/<sha256>.<png|jpg>``.

Cost and memory are bounded by the normalised size, not the raw one: a JPEG is decoded by
libjpeg at the smallest 1/2–1/8 scale whose long side is still at least ``max_side`` (every
byte of it is still decoded, so a truncated file is still caught); the pixels are hashed in
strips; hashes, embeddings and quality scores are all measured on the normalised copy in
memory, which is written once and never read back.

``sha256`` hashes the decoded pixels before shrinking, after a prefix of the original size, so
every file that decodes to the same pixels shares it whatever its encoding. For a JPEG whose
long side is at least twice ``max_side`` those are the pixels of its reduced-scale decode.

Pillow's limits are process globals; they are set only for the duration of one decode and
restored afterwards, so a caller running clean in-process keeps its own settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import imagehash
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.clean.embed import encode_views
from pipeline.clean.quality import quality_scores
from pipeline.clean.records import Analysis, DecodedImage
from pipeline.files import atomic_path

if TYPE_CHECKING:  # not imported at run time: a worker process need not load every config model
    from pipeline.config import CleanConfig

# The normalised PNGs: zlib level 1 and the Up filter. On 256 px photos (bench/clean_throughput.py's
# set) libpng so encodes in 1.8 ms, Pillow at level 1 (adaptive filters) in 3.2 ms and at its
# default level 6 in 13 ms; the files are 3 % and 16 % larger. The pixels are the same.
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
# Shrinking to max_side (after a JPEG's reduced-scale decode, by a factor under 2): area
# averaging. On that photo set per image LANCZOS took 1.8 ms, BICUBIC 1.3, BILINEAR 0.6 and BOX
# 0.36, flagging 121 / 130 / 165 / 126 of 1,500 blurry and finding 53 / 53 / 53 / 54 groups.
RESAMPLE = Image.Resampling.BOX
PHASH_HIGHFREQ = 4  # imagehash.phash's default: the DCT runs on a (4 * hash_size)² thumbnail
EXIF_ORIENTATION = 0x0112
HASH_STRIP_BYTES = 4 * 2**20  # pixels hashed at a time: no second full-size copy of a huge image


@dataclass(frozen=True)
class DecodeSettings:
    """What a decode worker needs from CleanConfig; a cached Analysis is valid for one value."""

    min_width: int
    min_height: int
    max_aspect_ratio: float
    max_image_pixels: int
    max_side: int
    output_format: Literal["png", "jpeg", "auto"]
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
            decoded = decode(task.raw_file, task.settings)
            validate_size(*decoded.original_size, task.settings)
        except Rejected as rejected:
            return Analysis(task.key, rejected.status, rejected.detail)
        return Analysis(task.key, "ok", image=describe(decoded, task))


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


@dataclass
class Decoded:
    """A raw file's pixels, fully decoded (a JPEG maybe at reduced scale) and in RGB."""

    image: Image.Image
    frames: int
    original_size: tuple[int, int]  # from the header, after EXIF rotation
    source_format: str | None  # Pillow's name of the raw file's format ("JPEG", "PNG", ...)


def decode(raw_file: Path, settings: DecodeSettings) -> Decoded:
    """The decoded pixels of a raw file, with its frame count, size and format.

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
                # libjpeg's scaled IDCT: decodes every byte, but at the smallest 1/2–1/8
                # scale whose long side is still at least max_side (a 50 Mpx JPEG then needs
                # ~1 MB, not 150; a 640 px photo decodes at 320 px for a 256 px copy).
                opened.draft(opened.mode, _draft_box(width, height, settings.max_side))
            # Frames and tiles can be larger than the header says; Pillow checks those while
            # decoding, against our limit.
            Image.MAX_IMAGE_PIXELS = limit
            try:
                image, frames, orientation = _load(opened)
                size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
                return Decoded(image, frames, size, opened.format)
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


def _draft_box(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size to ask ``draft`` for: Pillow picks the largest scale that keeps both sides at
    least this, so only the long side is bounded (by max_side) and the short one by 1."""
    return (max_side, 1) if width >= height else (1, max_side)


def _load(opened: Image.Image) -> tuple[Image.Image, int, int]:
    """(RGB pixels, frame count, EXIF orientation: 5–8 swap the sides) of the first frame."""
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its limit; past our limit is a bomb either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        frames = getattr(opened, "n_frames", 1)
        opened.seek(0)
        opened.load()  # full decode: truncated data raises here, not at open()
        orientation = opened.getexif().get(EXIF_ORIENTATION, 1)
        # In place: with nothing to turn it leaves the pixels alone instead of copying them.
        ImageOps.exif_transpose(opened, in_place=True)
        return to_rgb(opened), frames, orientation


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


def describe(decoded: Decoded, task: DecodeTask) -> DecodedImage:
    """Hashes, embeddings and quality scores of a valid image; writes its normalised copy.

    Everything is measured on the one normalised copy held in memory (its grey version, and
    one pHash-sized thumbnail of that for the hash and its mirror); nothing is read back.
    """
    settings = task.settings
    width, height = decoded.original_size
    sha256 = pixel_sha256(decoded.image, f"{width}x{height}:".encode())
    output = decoded.image  # shrunk in place: the full-size pixels are not needed past the hash
    output.thumbnail((settings.max_side, settings.max_side), RESAMPLE)
    grey_image = output.convert("L")
    phash, phash_mirror = phashes(grey_image, settings.hash_size)
    grey = np.asarray(grey_image)
    output_format = written_format(settings.output_format, decoded.source_format)
    clean_path = f"{task.class_name}/{sha256}{'.jpg' if output_format == 'jpeg' else '.png'}"
    target = task.out / clean_path
    if not target.exists():
        data = encode(output, output_format, settings.jpeg_quality)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    embedding, mirror_embedding = encode_views(grey)
    return DecodedImage(
        sha256=sha256,
        phash=phash,
        phash_mirror=phash_mirror,
        original_width=width,
        original_height=height,
        width=output.width,
        height=output.height,
        frames=decoded.frames,
        clean_path=clean_path,
        embedding=embedding,
        mirror_embedding=mirror_embedding,
        scores=quality_scores(grey),
    )


def written_format(output_format: str, source_format: str | None) -> Literal["png", "jpeg"]:
    """The format of a normalised copy: ``clean.output_format``, where ``auto`` is JPEG for a
    JPEG source (already lossy: as PNG it is ~3x the bytes and ~8x the encode time) and PNG for
    every other (lossless sources stay lossless)."""
    if output_format == "auto":
        return "jpeg" if source_format == "JPEG" else "png"
    return "jpeg" if output_format == "jpeg" else "png"


def encode(image: Image.Image, output_format: Literal["png", "jpeg"], jpeg_quality: int) -> bytes:
    """The bytes of the normalised copy: PNG by libpng (OpenCV) at zlib level 1 with the Up
    filter, or JPEG by Pillow at ``jpeg_quality``."""
    if output_format == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        return buffer.getvalue()
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", bgr, PNG_PARAMS)
    if not ok:  # libpng fails only on sizes PNG cannot hold, which max_side rules out
        raise RuntimeError(f"OpenCV could not encode a {image.width}x{image.height} PNG")
    return data.tobytes()


def phashes(grey: Image.Image, hash_size: int) -> tuple[str, str]:
    """(pHash, pHash of the mirrored image) of a grey image, as imagehash's hex strings.

    imagehash.phash's first step, the ``4 * hash_size`` square thumbnail, is done once here and
    mirrored, so the two hashes cost one resize. Shrinking, it is OpenCV's area average rather
    than imagehash's LANCZOS: 0.09 ms instead of 0.32 per 256 px image, on average 2 of 256
    bits apart, and pass 1 on bench/clean_recall.py (seeds 0 and 1) the same (precision 1.000,
    recall 0.297 both ways). Enlarging (images under 64 px) it is imagehash's LANCZOS.
    """
    side = PHASH_HIGHFREQ * hash_size
    if grey.width >= side and grey.height >= side:
        pixels = cv2.resize(np.asarray(grey), (side, side), interpolation=cv2.INTER_AREA)
        small = Image.fromarray(pixels)
    else:
        small = grey.resize((side, side), Image.Resampling.LANCZOS)
    hashes = (
        imagehash.phash(view, hash_size=hash_size, highfreq_factor=PHASH_HIGHFREQ).hash
        for view in (small, ImageOps.mirror(small))
    )
    return tuple(hash_to_hex(bits) for bits in hashes)  # type: ignore[return-value]


def hash_to_hex(bits: np.ndarray) -> str:
    """imagehash's hex string of a boolean hash (its own ``str()`` loops over bits in Python)."""
    flat = bits.ravel()
    value = int.from_bytes(np.packbits(flat).tobytes(), "big") >> (-len(flat) % 8)
    return format(value, f"0{-(-len(flat) // 4)}x")


def pixel_sha256(image: Image.Image, prefix: bytes) -> str:
    """sha256 of ``prefix`` then the RGB bytes row by row, hashed a strip at a time."""
    digest = hashlib.sha256(prefix)
    rows = max(1, HASH_STRIP_BYTES // (3 * image.width))
    if rows >= image.height:
        digest.update(image.tobytes())
        return digest.hexdigest()
    for top in range(0, image.height, rows):
        bottom = min(top + rows, image.height)
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
