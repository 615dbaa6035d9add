"""Config schema of pre-training, and the encoder and training-loop sections fine-tuning shares."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from data_tools.config import Section
from data_tools.schema import Fraction, IntensitySchema, NonNegFloat, NonNegInt, PosFloat, PosInt

Beta = Annotated[float, Field(ge=0, lt=1)]
Dropout = Annotated[float, Field(ge=0, lt=1)]


class EncoderSchema(Section):
    size: Literal["tiny", "small", "base", "large", "huge"]
    img_size: tuple[PosInt, PosInt]  # (height, width)
    patch_size: PosInt
    in_chans: Literal[1, 3]
    embed_dim: PosInt | None
    depth: PosInt | None
    num_heads: PosInt | None
    mlp_ratio: PosFloat
    drop_path: Dropout

    @field_validator("img_size", mode="before")
    @classmethod
    def _height_and_width(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):  # as "512 crops" is written
            raise ValueError(f"give [height, width], e.g. [{value},{value}] for {value} x {value} inputs")
        return value

    @model_validator(mode="after")
    def _whole_patches(self):
        if any(side % self.patch_size for side in self.img_size):
            raise ValueError(f"img_size {list(self.img_size)} must be a multiple of patch_size {self.patch_size}")
        return self


class LoopSchema(Section):
    """The ``train`` keys of the shared training loop (pre-training and fine-tuning)."""
    seed: NonNegInt
    batch_size: PosInt  # per process
    accum_steps: PosInt
    effective_batch: PosInt | None
    grad_clip: NonNegFloat  # 0: no clipping
    precision: Literal["bf16_autocast", "bf16", "fp32"]
    zero_stage: Literal[0, 1, 2, 3]
    save_every_steps: PosInt
    keep_last: PosInt
    log_every_steps: PosInt
    record_samples: bool
    nonfinite: Literal["stop", "skip", "rollback"]
    nonfinite_max_consecutive: PosInt
    loss_spike_factor: Annotated[float, Field(gt=1)] | None
    loss_spike_window: PosInt


class DecoderSchema(Section):
    dim: PosInt
    depth: PosInt
    num_heads: PosInt
    mlp_ratio: PosFloat


class PadSchema(Section):
    hidden: PosInt
    dropout: Dropout
    scale: Literal["concat", "sum", "side", "gside", "fixed", "layer"]
    fixed_scale: NonNegFloat
    scale_freeze_fraction: Fraction


class PretrainModelSchema(Section):
    encoder: EncoderSchema
    decoder: DecoderSchema
    adapter: Literal["pad", "none"]
    pad: PadSchema
    paradigm: Literal["pad", "continual", "scratch"]
    mask_ratio: Annotated[float, Field(gt=0, lt=1)]
    norm_pix_loss: bool
    train_decoder_embed: bool


class InitSchema(Section):
    checkpoint: str | None
    allow_missing: bool


class OptimSchema(Section):
    """The ``optim:`` section of both stages: AdamW and its schedule. Each stage adds how it sets
    the peak lr and the warm-up (pre-training: per 256 images and in epochs, as MAE)."""
    betas: tuple[Beta, Beta]
    weight_decay: NonNegFloat
    layer_decay: Annotated[float, Field(gt=0, le=1)] | None
    min_lr: NonNegFloat


class PretrainOptimSchema(OptimSchema):
    blr: PosFloat  # lr = blr x effective batch / 256 (MAE)
    warmup_epochs: NonNegFloat


class ShardSetSchema(Section):
    path: Annotated[str, Field(min_length=1)]
    weight: PosFloat = 1.0


class RoISchema(Section):
    p: Fraction
    tries: PosInt
    min_proposal_side: NonNegInt
    center_jitter: NonNegFloat
    scale_min: PosFloat
    scale_max: PosFloat
    min_crop_side: PosInt
    big_area_ratio: Fraction
    fallback_scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]]
    fallback_ratio: tuple[PosFloat, PosFloat]

    @model_validator(mode="after")
    def _ranges_rise(self):
        for name, (lo, hi) in (("scale_min / scale_max", (self.scale_min, self.scale_max)),
                               ("fallback_scale", self.fallback_scale), ("fallback_ratio", self.fallback_ratio)):
            if lo > hi:
                raise ValueError(f"{name} must not fall, got {lo} > {hi}")
        return self


class PretrainDataSchema(Section):
    shards: list[ShardSetSchema]

    @field_validator("shards", mode="before")
    @classmethod
    def _folders_with_weights(cls, value):
        """A folder given as it is typed (``data.shards=shards/``) is named with the form to give."""
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if any(isinstance(item, str) for item in items):
            form = ", ".join(f"{{path: {item}}}" if isinstance(item, str) else "..." for item in items)
            raise ValueError(f"a list of shard folders, each with its sampling weight: data.shards='[{form}]' "
                             "(weight 1 when left out)")
        return value
    samples_per_epoch: PosInt | None
    num_workers: NonNegInt
    prefetch_factor: PosInt
    pin_memory: bool | None
    shuffle_buffer: NonNegInt
    hflip: Fraction
    mean: float
    std: PosFloat
    roi: RoISchema
    intensity: IntensitySchema


class PretrainTrainSchema(LoopSchema):
    epochs: PosFloat  # fractions allowed: steps = int(epochs x steps per epoch)
    preview_every_steps: NonNegInt  # 0: never
    preview_frames: PosInt


class PretrainConfig(Section):
    """``configs/pretrain/*.yaml``."""
    model: PretrainModelSchema
    init: InitSchema
    optim: PretrainOptimSchema
    data: PretrainDataSchema
    train: PretrainTrainSchema

    @model_validator(mode="after")
    def _warmup_inside(self):
        if self.optim.warmup_epochs > self.train.epochs:
            raise ValueError(f"optim.warmup_epochs {self.optim.warmup_epochs} exceeds train.epochs {self.train.epochs}")
        return self
