"""What building a fine-tuning backbone from a checkpoint costs: how many times the weights file is
read, the seconds of ``finetune.weights.backbone_for`` and the process's peak resident memory.

A method may look into the file before the backbone is built (IV-tuning: is it the authors'
``ViT_prompt`` release? PAD: which adapters does the release carry?) and again to load it.

    python bench/bench_weights_read.py [--size base] [--img 224] [--method ivtuning] [--format mae]

``--format mae``: an MAE pre-training checkpoint (``{'model': state}``, as MAE's and PAD's scripts
save); ``timm``: a bare state dict. The file is written to a temporary folder first (not timed).
The peak memory is the whole process's (torch's own import included; mapped file pages count while
resident, though the kernel may drop them); the file is written by a child process, so its tensors
are not counted.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import pretrain.weights  # noqa: E402
from finetune.models.backbone import BackboneConfig  # noqa: E402
from finetune.weights import backbone_for  # noqa: E402
from pretrain.models.vit import EncoderConfig, build_encoder  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--method", default="ivtuning")
    parser.add_argument("--modality", default=None, help="default: both for ivtuning, ir otherwise")
    parser.add_argument("--format", choices=("mae", "timm"), default="mae")
    parser.add_argument("--write", help=argparse.SUPPRESS)  # the child process that writes the file
    args = parser.parse_args()
    encoder = EncoderConfig(size=args.size, img_size=(args.img, args.img))
    if args.write:
        torch.manual_seed(0)
        state = build_encoder(encoder).state_dict()
        torch.save({"model": state} if args.format == "mae" else state, args.write)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pth"
        subprocess.run([sys.executable, __file__, "--size", args.size, "--img", str(args.img),
                        "--format", args.format, "--write", str(path)], check=True)
        size_mb = path.stat().st_size / 2**20
        reads = []
        original = pretrain.weights.read_state_dict

        def counted(p):
            reads.append(p)
            return original(p)

        pretrain.weights.read_state_dict = counted  # the loaders import it from the module at call time
        modality = args.modality or ("both" if args.method == "ivtuning" else "ir")
        cfg = BackboneConfig(method=args.method, modality=modality, encoder=encoder, checkpoint=str(path))
        before = peak_rss_mb()
        start = time.perf_counter()
        backbone = backbone_for(cfg)
        seconds = time.perf_counter() - start
        print(f"method {args.method}, {args.size} at {args.img} px, {args.format} file {size_mb:.0f} MB: "
              f"read {len(reads)} time(s), backbone_for {seconds:.2f} s, "
              f"peak RSS {before:.0f} -> {peak_rss_mb():.0f} MB, loaded {backbone.load_report.loaded} tensors, "
              f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
