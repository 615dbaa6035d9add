"""The detection backbone with global attention in every block against ViTDet's (windows of 14
patches, 4 global blocks, decomposed relative positions; PAD's FLIR setting): seconds per
forward + backward of one frame, and the attention-logit entries of one forward where they are
materialised (ViTDet's code does; a fused attention kernel does not, and ours folds the relative
positions into the queries and keys rather than building them as a bias).

    python bench/bench_det_backbone.py [--size base] [--img 1024] [--batch 1] [--repeats 3] [--device cpu]
                                       [--variants global vitdet]

Prints one line per variant, with the process's peak resident memory so far (run one variant per
process to compare it).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from finetune.models.backbone import Backbone, BackboneConfig  # noqa: E402
from pretrain.models.vit import EncoderConfig  # noqa: E402

VARIANTS = {"global": dict(), "vitdet": dict(window_size=14, decomposed_rel_pos=True)}


def attention_logits(backbone: Backbone, batch: int) -> int:
    """Entries of the attention-logit tensors of one forward (every block, every head, every window)."""
    gh, gw = backbone.encoder.patch_embed.grid_size
    total = 0
    for block in backbone.encoder.blocks:
        if block.window:
            windows = -(-gh // block.window) * -(-gw // block.window)
            tokens = block.window ** 2
        else:
            windows, tokens = 1, gh * gw + backbone.num_prefix
        total += batch * windows * block.attn.num_heads * tokens ** 2
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base")
    parser.add_argument("--img", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast, as the configs train on a GPU")
    args = parser.parse_args()
    encoder = EncoderConfig(size=args.size, img_size=(args.img, args.img))
    for name in args.variants:
        extra = VARIANTS[name]
        torch.manual_seed(0)
        backbone = Backbone(BackboneConfig(method="full", modality="ir", encoder=encoder, **extra)).to(args.device)
        x = torch.randn(args.batch, 1, args.img, args.img, device=args.device)
        times, cuda = [], args.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.bf16):
                out = backbone(x)[-1]
            out.float().square().mean().backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            backbone.zero_grad(set_to_none=True)
        logits = attention_logits(backbone, args.batch)
        memory = (f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if cuda else
                  f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB")
        print(f"{name:7s} ViT-{args.size} {args.img}px batch {args.batch} on {args.device}"
              f"{' bf16' if args.bf16 else ''}: "
              f"{statistics.median(times[1:]):.3f} s forward + backward (median of {args.repeats}); "
              f"attention logits {logits / 1e6:.0f} M entries ({logits * 4 / 2 ** 30:.2f} GiB in fp32); "
              f"{memory}")


if __name__ == "__main__":
    main()
