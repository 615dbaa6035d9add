"""A seeded train / val split for datasets published without one (M3FD): two lists of frame
names, one per line, as the fine-tuning configs read them (``data.train_split`` / ``val_split``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.files import atomic_write_text, missing_folder
from data_tools.sources import IMAGE_EXTENSIONS, nested_images_note


def write_split(root: str | Path, images: str, val_fraction: float, seed: int = 0,
                names: tuple[str, str] = ("train.txt", "val.txt"), overwrite: bool = False) -> tuple[int, int]:
    """Shuffle the image stems of ``root/images`` with ``seed`` and write the first
    ``val_fraction`` of them to ``root/val.txt``, the rest to ``root/train.txt`` (each sorted).
    The same files, fraction and seed give the same lists on any machine. Returns (train, val)."""
    root = Path(root)
    folder = root / images
    if not folder.is_dir():
        raise FileNotFoundError(missing_folder(folder))
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    stems = sorted({p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS})
    if len(stems) < 2:
        raise ValueError(f"{folder} holds {len(stems)} image(s): nothing to split{nested_images_note([folder])}")
    outputs = [root / n for n in names]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist(s): pass --overwrite to replace")
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = max(1, min(len(stems) - 1, round(val_fraction * len(stems))))
    val = sorted(stems[i] for i in order[:n_val])
    train = sorted(stems[i] for i in order[n_val:])
    for path, items in zip(outputs, (train, val)):
        atomic_write_text(path, "\n".join(items) + "\n")
    return len(train), len(val)
