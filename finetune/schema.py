"""Config schemas of segmentation and detection fine-tuning."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from data_tools.config import Section
from data_tools.schema import (BOX_FORMATS, BorderCrop, Fraction, IntensitySchema, NonNegFloat, NonNegInt, PosFloat,
                               PosInt)
from pretrain.schema import Dropout, EncoderSchema, InitSchema, LoopSchema, OptimSchema


class MonaSchema(Section):
    hidden: PosInt
    dropout: Dropout
    gamma_init: NonNegFloat


class IVTuningSchema(Section):
    hidden: PosInt
    prompt_hidden: PosInt
    generator_hidden: PosInt
    dropout: Dropout


class SegHeadSchema(Section):
    type: str = "upernet"  # a registered head (finetune.models.seg_heads): upernet, segformer, linear
    channels: PosInt
    aux_channels: PosInt
    aux_weight: NonNegFloat
    aux_level: Annotated[int, Field(ge=0, le=3)]
    dropout: Dropout
    class_weight: list[NonNegFloat] | None

    @field_validator("type")
    @classmethod
    def _registered(cls, name: str) -> str:
        from finetune.models.seg_heads import get_seg_head
        get_seg_head(name)
        return name


class DetHeadSchema(Section):
    detector: str  # a registered torchvision detector (finetune.models.detector.DETECTORS)
    channels: PosInt
    score_threshold: Fraction
    detections_per_image: PosInt
    roi_samples_per_image: PosInt
    anchor_sizes: Annotated[list[PosInt], Field(min_length=5, max_length=5)] | None  # p2..p6
    # Faster R-CNN's heads; null: ViTDet's for Faster R-CNN (conv, 2), the detector's own for the others.
    # Absent (configs of runs saved before these existed): torchvision's, as DetHeadConfig's defaults.
    box_head: Literal["mlp", "conv"] | None = None  # torchvision's two 1024 fc | ViTDet's 4 conv (LN) + 1 fc
    rpn_convs: PosInt | None = None  # 3x3 convs before the RPN's outputs
    # Faster R-CNN's training rules; null: detectron2's as ViTDet trains; torchvision's: 1/9, 2000, false
    box_loss_beta: NonNegFloat | None = None  # smooth-L1 beta of both box losses (null: 0, i.e. L1)
    rpn_post_nms_train: PosInt | None = None  # proposals kept per training image after the RPN's NMS (null: 1000)
    aligned_roi_pool: bool | None = None  # detectron2's ROIAlignV2 (null: true); false: torchvision's RoIAlign

    @field_validator("detector")
    @classmethod
    def _registered(cls, detector: str) -> str:
        from finetune.models.detector import DETECTORS
        DETECTORS.get(detector)
        return detector

    @model_validator(mode="after")
    def _rcnn_heads_for_faster_rcnn(self):
        rcnn_only = ("box_head", "rpn_convs", "box_loss_beta", "rpn_post_nms_train", "aligned_roi_pool")
        given = [k for k in rcnn_only if getattr(self, k) is not None]
        if self.detector != "faster_rcnn" and given:
            raise ValueError(f"{' / '.join(given)} shape Faster R-CNN's heads; detector {self.detector!r} has "
                             f"its own: set {' '.join(f'model.head.{k}=null' for k in given)}")
        return self


class _ModelSchema(Section):
    method: str  # a registered method (finetune.models.methods)
    modality: Literal["ir", "vi", "both"]
    encoder: EncoderSchema
    out_indices: list[NonNegInt] | None
    mona: MonaSchema
    ivtuning: IVTuningSchema
    rel_pos_bias: bool = False  # BEiT's relative position bias in every block (PAD's / MAE's segmentation)
    layer_scale: PosFloat | None = None  # BEiT's layer scale, its initial value (PAD's segmentation: 1.0)
    window_size: NonNegInt = 0  # ViTDet's window attention, patches a side (PAD's FLIR: 14); 0: global everywhere
    global_blocks: list[NonNegInt] | None = None  # blocks that stay global; null: the last of each quarter
    decomposed_rel_pos: bool = False  # ViTDet's decomposed relative position embedding in every block

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        from finetune.models.methods import get_method
        get_method(method)  # raises with the registered names
        return method

    @model_validator(mode="after")
    def _modality_fits_the_method(self):
        from finetune.models.backbone import check_block_extras, check_modality
        check_modality(self.method, self.modality)
        check_block_extras(self.method, self.rel_pos_bias, self.layer_scale, self.decomposed_rel_pos)
        return self

    @model_validator(mode="after")
    def _global_blocks_exist(self):
        from pretrain.models.vit import VIT_SIZES
        depth = self.encoder.depth or VIT_SIZES[self.encoder.size][1]
        if self.global_blocks is not None and max(self.global_blocks, default=0) >= depth:
            raise ValueError(f"global_blocks {self.global_blocks} must index the encoder's {depth} blocks")
        return self

    @model_validator(mode="after")
    def _two_patches_a_side(self):
        # the heads' coarsest level (stride 32) max-pools the patch grid by 2
        enc = self.encoder
        if min(enc.img_size) < 2 * enc.patch_size:
            raise ValueError(f"encoder.img_size {list(enc.img_size)} must be at least 2 patches "
                             f"({2 * enc.patch_size} px) a side: the heads' stride-32 level halves the patch grid")
        return self


class SegModelSchema(_ModelSchema):
    head: SegHeadSchema

    @model_validator(mode="after")
    def _the_neck_reads_four_maps(self):
        from finetune.models.seg_heads import get_seg_head
        head = get_seg_head(self.head.type)
        if head.neck and self.out_indices is not None and len(self.out_indices) != 4:
            raise ValueError(f"out_indices {self.out_indices}: the neck under {head.title} turns 4 block outputs into "
                             f"strides 4 / 8 / 16 / 32; give 4 (one block 4 times reads that block alone: "
                             f"[11, 11, 11, 11]), or head.type=linear, which reads any number")
        return self


class DetModelSchema(_ModelSchema):
    head: DetHeadSchema


class FinetuneInitSchema(InitSchema):
    pad_scale: Literal["sum", "side", "gside"] | None


class DirsSchema(Section):
    ir: str | None
    vi: str | None
    label: str | None
    image: str | None


class SegAugmentSchema(Section):
    ratio_range: tuple[PosFloat, PosFloat]
    hflip: Fraction
    photometric: bool
    photometric_ir: bool = False
    cat_max_ratio: Annotated[float, Field(gt=0, le=1)] = 1.0


class DetAugmentSchema(Section):
    scale_range: tuple[PosFloat, PosFloat]
    hflip: Fraction
    photometric: bool


BoxFormat = Literal[BOX_FORMATS]


class BoxesSchema(Section):
    format: BoxFormat
    path: str | None


class ValBoxesSchema(Section):
    """The validation split's boxes where they are published apart from the training boxes (KAIST's
    improved test annotations); ``format`` null: ``boxes.format``."""
    format: BoxFormat | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _path_given(self):
        if self.format and not self.path:
            raise ValueError("data.val_boxes.format is set but not data.val_boxes.path (the validation boxes)")
        return self


class SplitDirsSchema(Section):
    train: str | None
    val: str | None


class NameSuffixesSchema(Section):
    ir: str
    vi: str


class _DataSchema(Section):
    layout: Literal["pairs", "mfnet"]
    root: str | None
    split_dirs: SplitDirsSchema  # what {split} stands for in dirs, split lists and boxes.path
    dirs: DirsSchema
    name_suffixes: NameSuffixesSchema  # end of the file stems after the frame name
    label_suffix: str
    train_split: str | None
    val_split: str | None
    classes: Annotated[list[str], Field(min_length=1)]
    classes_file: str | None = None  # YAML whose `names` fill classes (Ultralytics' data.yaml); relative: data.root
    intensity: IntensitySchema
    num_workers: NonNegInt

    @model_validator(mode="after")
    def _each_class_once(self):
        twice = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if twice:  # a label of that name would always take the first index; the other would never train
            raise ValueError(f"data.classes names {', '.join(twice)} more than once: one name per class")
        return self


class SegDataSchema(_DataSchema):
    ignore_index: int
    binary_labels: bool
    img_scale: tuple[PosInt, PosInt] | None = None  # (long, short), mmsegmentation's Resize img_scale
    augment: SegAugmentSchema


class DetDataSchema(_DataSchema):
    boxes: BoxesSchema
    val_boxes: ValBoxesSchema = ValBoxesSchema()
    ignore_classes: list[str] = []  # labels whose boxes are ignore regions (KAIST: people, cyclist, person?)
    # a label as the files write it -> the class of data.classes (or data.ignore_classes) it is: datasets
    # that spell a class several ways (DroneVehicle: feright car, feright, truvk)
    class_aliases: dict[str, str] = {}
    border_crop: BorderCrop = (0, 0, 0, 0)  # cut off every frame first (DroneVehicle: 100); boxes move with it
    augment: DetAugmentSchema

    @model_validator(mode="after")
    def _ignored_apart_from_classes(self):
        both = sorted(set(self.ignore_classes) & set(self.classes))
        if both:
            raise ValueError(f"data.ignore_classes and data.classes both name {both}: a box is an object or an "
                             "ignore region, not both")
        return self

    @model_validator(mode="after")
    def _aliases_name_classes(self):
        named = set(self.classes) | set(self.ignore_classes)
        if nowhere := sorted({v for v in self.class_aliases.values() if v not in named}):
            raise ValueError(f"data.class_aliases renames labels to {nowhere}, which neither data.classes nor "
                             "data.ignore_classes names")
        if both := sorted(set(self.class_aliases) & named):
            raise ValueError(f"data.class_aliases renames {both}, which data.classes or data.ignore_classes names: "
                             "a label is a class or another spelling of one, not both")
        return self


class FinetuneOptimSchema(OptimSchema):
    lr: PosFloat
    warmup_steps: NonNegInt  # polynomial decay to min_lr from step 0, linear warm-up on it (mmcv's poly)
    poly_power: PosFloat
    # instead of the polynomial decay: lr x step_gamma at each of these steps, or shares of train.steps
    # (floats in (0, 1)): detectron2's multi-step, ViTDet's
    milestones: list[PosInt | float] | None = None
    step_gamma: Fraction = 0.1

    @field_validator("milestones")
    @classmethod
    def _ascending(cls, milestones):
        if milestones is None:
            return milestones
        steps = all(isinstance(m, int) for m in milestones)
        shares = all(isinstance(m, float) and 0 < m < 1 for m in milestones)
        if not (steps or shares):
            raise ValueError("milestones must be all steps (integers >= 1) or all shares of train.steps (between 0 "
                             "and 1)")
        if milestones != sorted(set(milestones)):
            raise ValueError("milestones must be ascending, each once")
        return milestones


class FinetuneTrainSchema(LoopSchema):
    steps: PosInt


class EvalSchema(Section):
    every_steps: NonNegInt  # evaluate every n training steps (and keep a ``best`` checkpoint); 0: at the end only


class SegEvalSchema(EvalSchema):
    stride: PosInt | tuple[PosInt, PosInt] | None  # sliding windows: one stride, or (height, width)
    windows_per_batch: PosInt
    overlays: NonNegInt


class DetEvalSchema(EvalSchema):
    overlays: NonNegInt
    overlay_score: Fraction
    # objects shorter (frame pixels) / more occluded (VOC <occlusion>) / within `border` pixels of the
    # frame's edge are scored as ignore regions
    min_height: NonNegFloat = 0.0
    max_occlusion: NonNegInt | None = None
    border: NonNegFloat = 0.0


class SegConfig(Section):
    """``configs/finetune/seg_*.yaml``."""
    model: SegModelSchema
    init: FinetuneInitSchema
    data: SegDataSchema
    optim: FinetuneOptimSchema
    train: FinetuneTrainSchema
    eval: SegEvalSchema

    @model_validator(mode="after")
    def _class_weights_and_windows_fit(self):
        weights, classes = self.model.head.class_weight, self.data.classes
        if weights is not None and len(weights) != len(classes):
            raise ValueError(f"model.head.class_weight has {len(weights)} values for the {len(classes)} classes of "
                             f"data.classes ({', '.join(classes)}): one per class, in their order")
        from finetune.models.segmentor import slide_stride

        window = self.model.encoder.img_size
        stride = slide_stride(self.eval.stride, window)
        if stride[0] > window[0] or stride[1] > window[1]:
            raise ValueError(f"eval.stride {list(stride)} is larger than the sliding window "
                             f"(model.encoder.img_size {list(window)}): pixels between windows would get no "
                             "prediction")
        return self


class DetConfig(Section):
    """``configs/finetune/det_*.yaml``."""
    model: DetModelSchema
    init: FinetuneInitSchema
    data: DetDataSchema
    optim: FinetuneOptimSchema
    train: FinetuneTrainSchema
    eval: DetEvalSchema
