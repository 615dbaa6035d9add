"""Config schemas of the shard builder, and the value types every stage's schema shares."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from data_tools.config import Section

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]  # a probability or share, both ends allowed
Percentile = Annotated[float, Field(ge=0, le=100)]


class IntensitySchema(Section):
    uint16_mode: Literal["percentile", "range", "minmax"] = "percentile"
    percentiles: tuple[Percentile, Percentile] = (1.0, 99.0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.percentiles[0] >= self.percentiles[1]:
            raise ValueError(f"percentiles must rise, got {list(self.percentiles)}")
        return self


class ImageSchema(Section):
    min_side: PosInt
    grey_tolerance: NonNegInt
    skip_label_maps: bool = True


class ProposalSchema(Section):
    enabled: bool
    method: Literal["thermal_blobs", "thermal_blobs_fitted", "selective_search"]
    max_proposals: PosInt
    min_region_pixels: NonNegInt
    min_side: NonNegInt
    max_aspect: Annotated[float, Field(ge=1)]
    scale: PosFloat
    sigma: NonNegFloat
    min_size: NonNegInt
    max_side: PosInt | None
    blob_sides: list[PosInt]
    blob_backgrounds: list[Annotated[float, Field(gt=0, lt=1)]]
    blob_thresholds: list[PosFloat]
    blob_closings: list[tuple[PosInt, PosInt]]
    blob_merge_gap: NonNegInt
    blob_views: Annotated[list[Literal["linear", "equalized"]], Field(min_length=1)]
    blob_size_power: NonNegFloat
    blob_texture_weight: NonNegFloat
    nms_iou: Annotated[float, Field(gt=0, le=1)]
    ranker: Annotated[str, Field(min_length=1)] | None
    overlay_mask: bool

    @model_validator(mode="after")
    def _one_background_per_side(self):
        if len(self.blob_sides) != len(self.blob_backgrounds):
            raise ValueError("blob_sides and blob_backgrounds need one value each per scale")
        return self


class ShardsSchema(Section):
    encoding: Literal["raw", "png"]
    prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    max_samples: NonNegInt | None  # 0 / null: no limit
    max_bytes: NonNegInt | None
    png_compression: Annotated[int, Field(ge=0, le=9)]
    order: Literal["shuffled", "corpus"]
    seed: int


class BuildConfig(Section):
    """``configs/data/build.yaml``."""
    image: ImageSchema
    proposals: ProposalSchema
    shards: ShardsSchema
