"""The fine-tuning methods of the backbone, by name.

A method is one module that registers a :class:`Method`: the adapters it attaches to the encoder's
blocks, the input module that replaces the plain patch embedding (if any), the image streams it
takes and which backbone parameters train. :class:`~finetune.models.backbone.Backbone` knows no
method by name; adding LoRA or AdaptFormer is one new file that calls :func:`register` (imported
below so that the built-in methods are always there).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from data_tools.registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    # Attach block adapters to the encoder: ``attach(encoder, backbone_config)``.
    attach: Callable[[nn.Module, object], None] | None = None
    # The input side, replacing the patch embedding: ``input_module(encoder, backbone_config)``, a
    # module with ``tokens(encoder, ir, vi, ctx) -> patch tokens`` (position embedding added).
    input_module: Callable[[nn.Module, object], nn.Module] | None = None
    # What trains in the backbone: "all" (the encoder, its adapters and input module), "none", or
    # "own" (only this method's adapters, under ``.<name>.``, and its input module).
    trains: str = "own"
    modalities: tuple[str, ...] = ("ir", "vi")  # "both": the infrared and the visible image together
    # Its authors' own weight files (finetune.weights calls these; None: the generic readers).
    # ``resolve_release(cfg)``: the config a non-export checkpoint implies (e.g. adapters rebuilt from
    # its tensors). ``load_release(backbone, cfg)``: a LoadReport if the file is the method's own
    # format (loaded), None to fall back to the plain encoder reader.
    resolve_release: Callable[[object], object] | None = None
    load_release: Callable[[nn.Module, object], object] | None = None
    needs_adapter: str | None = None  # an export must carry this adapter (pad: a PAD export)

    def __post_init__(self):
        if self.trains not in ("all", "none", "own"):
            raise ValueError(f"method {self.name}: trains must be all, none or own, got {self.trains!r}")


METHODS: Registry[Method] = Registry("fine-tuning method", "method")


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def method_names() -> tuple[str, ...]:
    return METHODS.names()


def get_method(name: str) -> Method:
    return METHODS.get(name)


# The baselines the papers compare with; PAD fine-tunes a pre-training export whole (its adapters
# come with the weights, so it attaches nothing here).
register(Method("full", "every encoder parameter trains", trains="all"))
register(Method("frozen", "the encoder is frozen; only the task head trains", trains="none"))
def _pad_release(cfg):
    """PAD's own release: its adapters are rebuilt from its tensors (``init.pad_scale`` names a
    d-input predictor's variant)."""
    import dataclasses

    from pretrain.weights import has_pad_author_keys, pad_config_from_state, read_state_dict

    sd = read_state_dict(cfg.checkpoint) if cfg.checkpoint else {}
    if not has_pad_author_keys(sd):
        said = (f"; {cfg.checkpoint} is neither (no export JSON, {Path(cfg.checkpoint).with_suffix('.json').name}, "
                "beside it; no adapter tensors with PAD's names in it)" if cfg.checkpoint else "")
        raise ValueError("method 'pad' needs init.checkpoint = a backbone exported by `python -m pretrain export` "
                         f"or a PAD pre-training checkpoint{said}")
    settings = dataclasses.asdict(pad_config_from_state(sd, cfg.pad_scale))
    return dataclasses.replace(cfg, carried_adapters=(("pad", settings),))


register(Method("pad", "a PAD pre-training export with its adapters, fine-tuned whole", trains="all",
                resolve_release=_pad_release, needs_adapter="pad"))

# The adapter methods register themselves on import.
import finetune.models.ivtuning  # noqa: E402,F401
import finetune.models.mona  # noqa: E402,F401
