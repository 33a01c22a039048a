"""Quality: the scores a worker measures on each normalised image, and the flags they raise.

Consumes the grey pixels of a normalised image (``quality_scores``, run in the decode
workers) and, once every image is decoded, the ``ImageRecord`` list (``flag_all``). Produces
each image's flags, cleanvision-style: blurry, dark, bright, low_information,
odd_aspect_ratio, odd_size. Flagged images are only listed in issues.csv unless
``clean.drop_flags`` names the flag.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.clean.records import ImageRecord, QualityScores

if TYPE_CHECKING:
    from pipeline.config import CleanConfig

QUALITY_FLAGS = ("blurry", "dark", "bright", "low_information", "odd_aspect_ratio", "odd_size")


def quality_scores(grey: np.ndarray) -> QualityScores:
    """Brightness percentiles, entropy and sharpness of a uint8 grey image."""
    counts = np.bincount(grey.ravel(), minlength=256)
    probabilities = counts[counts > 0] / grey.size
    return QualityScores(
        # Percentiles, as cleanvision does: an image is dark when even its bright pixels are.
        brightness_p99=round(histogram_percentile(counts, 99) / 255.0, 4),
        brightness_p05=round(histogram_percentile(counts, 5) / 255.0, 4),
        entropy=round(float(-(probabilities * np.log2(probabilities)).sum()), 4),
        sharpness=round(float(cv2.Laplacian(grey, cv2.CV_64F).var()), 2),
    )


def histogram_percentile(counts: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) of the values a histogram counts,
    without sorting them: the two order statistics around the rank come from its cumsum."""
    cumulative = np.cumsum(counts)
    rank = q / 100.0 * (int(cumulative[-1]) - 1)
    below = int(np.floor(rank))
    low, high = np.searchsorted(cumulative, [below, below + 1], side="right")
    # At q = 100 there is no value above (high is past the end) and the weight is 0.
    high = min(int(high), len(counts) - 1)
    return float(low + (rank - below) * (high - int(low)))


@dataclass(frozen=True)
class FlagThresholds:
    blurry_below: float
    dark_below: float
    bright_above: float
    low_information_below: float
    odd_aspect_ratio_above: float
    odd_size_factor: float

    @classmethod
    def from_config(cls, cfg: CleanConfig) -> FlagThresholds:
        return cls(
            blurry_below=cfg.blurry_below,
            dark_below=cfg.dark_below,
            bright_above=cfg.bright_above,
            low_information_below=cfg.low_information_below,
            odd_aspect_ratio_above=cfg.odd_aspect_ratio_above,
            odd_size_factor=cfg.odd_size_factor,
        )


def flags_of(record: ImageRecord, limits: FlagThresholds, median_area: float) -> tuple[str, ...]:
    """The quality flags ``record`` raises, in QUALITY_FLAGS order."""
    image, scores = record.image, record.image.scores
    width, height = image.original_width, image.original_height
    checks = {
        "blurry": scores.sharpness < limits.blurry_below,
        "dark": scores.brightness_p99 < limits.dark_below,
        "bright": scores.brightness_p05 > limits.bright_above,
        "low_information": scores.entropy < limits.low_information_below,
        "odd_aspect_ratio": max(width, height) / min(width, height) > limits.odd_aspect_ratio_above,
        "odd_size": median_area > 0
        and not 1 / limits.odd_size_factor <= record.area / median_area <= limits.odd_size_factor,
    }
    return tuple(flag for flag in QUALITY_FLAGS if checks[flag])


def flag_all(records: list[ImageRecord], limits: FlagThresholds) -> list[ImageRecord]:
    """``records`` with their flags set; odd_size is relative to this data set's median area."""
    median_area = float(np.median([r.area for r in records])) if records else 0.0
    return [replace(r, flags=flags_of(r, limits, median_area)) for r in records]
