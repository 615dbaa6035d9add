"""Config schemas of the shard builder and its sources file, and the value types every stage's
schema shares."""
from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BeforeValidator, ConfigDict, Field, model_validator

from data_tools.config import Section
from data_tools.walk import split_pattern

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


# --- the sources file (``sources: [{name, root, glob, stride, ...}, ...]``) ---------------------------

BOX_FORMATS = ("coco", "yolo", "voc", "bbgt")  # what a source's (or a fine-tuning split's) boxes may be
SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
DEFAULT_GLOBS = ("**/*",)  # every file with an image extension, recursively


class SourceSection(Section):
    """Strict: a sources file is written by hand, and lax coercion misreads it silently
    (``stride: 2.7`` kept every 2nd frame, ``stride: true`` every one, ``classes: person`` six letters)."""
    model_config = ConfigDict(strict=True)  # merged with Section's: unknown keys refused, frozen


def number_as_text(value: Any) -> Any:
    """A folder or a label YAML reads as a number (``root: 2020``, ``classes: [0, 1]``) is its text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _below_root(pattern: str) -> str:
    if not pattern.strip() or os.path.isabs(pattern) or ".." in split_pattern(pattern):
        raise ValueError("must be a pattern below the root (`*.png`, `**/lwir/*.jpg`); for frames elsewhere, "
                         "move the root or add a source")
    return pattern


def four_sides(value: Any) -> Any:
    """``n`` is every side, ``[v, h]`` is (top and bottom, left and right)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * 4
    if isinstance(value, list):
        if len(value) not in (2, 4):
            raise ValueError(f"{len(value)} values")
        return (value[0], value[0], value[1], value[1]) if len(value) == 2 else tuple(value)
    return value


# Pixels cut off each side of a frame before anything reads it (DroneVehicle's 100 px white frame).
BorderCrop = Annotated[tuple[NonNegInt, NonNegInt, NonNegInt, NonNegInt], BeforeValidator(four_sides),
                       Field(description="an int >= 0, [v, h] or [top, bottom, left, right]")]
Text = Annotated[str, BeforeValidator(number_as_text)]
Labels = list[Text]
GlobPattern = Annotated[str, AfterValidator(_below_root)]


class SourceBoxesSchema(SourceSection):
    format: Literal[BOX_FORMATS]
    path: Annotated[Text, Field(description="the folder or file of the boxes")]
    suffix: str = ""
    classes: Annotated[Labels, Field(description="the labels in index order, [person, car]")] = []
    # labels whose boxes are ignore regions (KAIST's `people`), as COCO crowd boxes are
    ignore_classes: Annotated[Labels, Field(description="labels of ignore regions, [people]")] = []


class SourceMasksSchema(SourceSection):
    path: Annotated[Text, Field(description="the folder of the masks")]
    suffix: Annotated[str, Field(description="the end of the mask files' names, '_mask.png'")] = ".png"
    classes: Annotated[Labels, Field(description="the labels in index order, [background, person]")] = []


class SourceSchema(SourceSection):
    """One entry of a sources file."""
    name: Annotated[Text, Field(pattern=SOURCE_NAME, description="letters, digits, '_' or '-'")]
    root: Annotated[Text, Field(description="the folder of the frames")]
    globs: Annotated[list[GlobPattern], BeforeValidator(lambda v: v if isinstance(v, list) else [v]),
                     Field(min_length=1, validation_alias=AliasChoices("glob", "globs"))] = list(DEFAULT_GLOBS)
    stride: PosInt = 1
    sort: Literal["natural", "lexical"] = "natural"
    border_crop: BorderCrop = (0, 0, 0, 0)
    black_threshold: Annotated[float | None, Field(description="the largest value of a frame dropped as black")] = None
    expected_frames: PosInt | None = None
    channel: Annotated[NonNegInt | None, Field(description="0-based, in stored order B, G, R, A")] = None
    boxes: Annotated[SourceBoxesSchema | None, Field(description="{format: coco|yolo|voc|bbgt, path: ...}")] = None
    masks: Annotated[SourceMasksSchema | None, Field(description="{path: ..., suffix: ...}")] = None

    @model_validator(mode="before")
    @classmethod
    def _one_glob_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "glob" in data and "globs" in data:
            raise ValueError("give glob or globs, not both")
        return data
