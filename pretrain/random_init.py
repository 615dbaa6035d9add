"""The warning that a model is built without init weights: said when a run trains, not again when
the trained run's model is rebuilt (export, predict, --eval-only), whose trained weights are loaded
next. Kept apart from ``pretrain.weights`` so that the engine imports it without timm."""
from __future__ import annotations

import contextlib
import sys

_rebuilding_trained_run = False


@contextlib.contextmanager
def rebuilding_trained_run():
    """While a trained run's model is rebuilt (export, predict): a random init was said when it
    trained, and its trained weights are loaded next, so it is not said again."""
    global _rebuilding_trained_run
    before, _rebuilding_trained_run = _rebuilding_trained_run, True
    try:
        yield
    finally:
        _rebuilding_trained_run = before


def warn_random_init(message: str) -> None:
    """``warning: message`` on stderr when a model is built for training without init weights, by
    the first process of a launch only (every rank builds the model)."""
    import torch.distributed as dist

    if _rebuilding_trained_run or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    print(f"warning: {message}", file=sys.stderr)
