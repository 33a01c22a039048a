"""The ``clean:`` section (pipeline/clean/)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
)

from pipeline.config.base import (
    NonNegativeFloat,
    _Section,
)

QualityFlag = Literal["blurry", "dark", "bright", "low_information", "odd_aspect_ratio", "odd_size"]


class CleanConfig(_Section):
    """clean: validation, normalisation, quality flags, duplicate grouping (pipeline/clean/)."""

    # validation and normalisation
    min_width: Annotated[int, Field(ge=1)] = 16
    min_height: Annotated[int, Field(ge=1)] = 16
    max_aspect_ratio: Annotated[float, Field(ge=1)] = 10.0
    max_image_pixels: Annotated[int, Field(ge=1)] = 50_000_000
    max_side: Annotated[int, Field(ge=8)] = 256
    output_format: Literal["auto", "png", "jpeg"] = "auto"
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95
    # pass 1: perceptual hash
    near_dup_hash_size: Annotated[int, Field(ge=4, le=32)] = 16
    near_dup_max_distance: Annotated[int, Field(ge=0)] = 24
    near_dup_mirrored: bool = True
    near_duplicates: Literal["drop", "group"] = "drop"
    # pass 2: embedding neighbours confirmed by ORB + RANSAC
    second_pass: bool = True
    second_pass_neighbours: Annotated[int, Field(ge=1, le=100)] = 12
    second_pass_min_similarity: Annotated[float, Field(ge=-1, le=1)] = 0.0
    orb_features: Annotated[int, Field(ge=50, le=10_000)] = 500
    orb_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.75
    orb_min_inliers: Annotated[int, Field(ge=4)] = 6
    orb_min_correlation: Annotated[float, Field(ge=-1, le=1)] = 0.8
    orb_min_overlap: Annotated[float, Field(ge=0, le=1)] = 0.7
    dense_fallback: bool = True
    duplicate_groups: Literal["connected", "star"] = "connected"
    # label conflicts and quality flags
    label_conflicts: Literal["drop", "keep_first"] = "drop"
    drop_flags: list[QualityFlag] = []
    blurry_below: NonNegativeFloat = 10.0
    dark_below: Annotated[float, Field(ge=0, le=1)] = 0.15
    bright_above: Annotated[float, Field(ge=0, le=1)] = 0.95
    low_information_below: Annotated[float, Field(ge=0, le=8)] = 1.0
    odd_aspect_ratio_above: Annotated[float, Field(ge=1)] = 2.5
    odd_size_factor: Annotated[float, Field(gt=1)] = 10.0
    workers: Annotated[int, Field(ge=0, le=256)] = 0
    dask_address: str | None = None
    # a class with fewer kept images fails the stage (after writing its outputs); 0 = off
    min_images_per_class: Annotated[int, Field(ge=0)] = 20

    @field_validator("near_dup_max_distance")
    @classmethod
    def _distance_fits_hash(cls, distance: int, info: ValidationInfo) -> int:
        # Field-level, so the error names clean.near_dup_max_distance itself.
        bits = info.data.get("near_dup_hash_size", 8) ** 2
        if distance >= bits // 2:
            raise ValueError(f"must be < {bits // 2} (half the {bits}-bit hash)")
        return distance
