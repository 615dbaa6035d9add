"""Where a pre-training step's time goes: the bare model step (forward, backward, AdamW; no
DeepSpeed, no loader) at several batch sizes, and the operators that take the most GPU and host
time in one step.

    python bench/bench_pretrain_step.py [--config pad_vitb.yaml] [--batches 64 128 256] [--steps 10]
                                        [--device cuda] [--profile-batch 128]

If images/s grows with the batch, the step is bound by the host issuing kernels (Python and
launch overhead), not by the GPU's arithmetic; the trainer's own images/s (bench/bench_pretrain.py)
against the bare step's is what DeepSpeed, the loader and the run's bookkeeping cost.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data_tools.config import load_config  # noqa: E402
from pretrain.factory import build_model_from_config  # noqa: E402


def model_and_optimizer(config: str, device: str):
    cfg = load_config(str(ROOT / "configs" / "pretrain" / config))
    torch.manual_seed(0)
    model = build_model_from_config(cfg, device=device)  # its paradigm's trainable set already marked
    params = [p for p in model.parameters() if p.requires_grad]
    return cfg, model, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)


def step(model, optimizer, imgs, device: str) -> None:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss, _, _ = model(imgs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(model, optimizer, imgs, device: str, steps: int) -> float:
    """Median seconds per step, each step ended by a synchronisation (as the trainer's loss read does)."""
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        step(model, optimizer, imgs, device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="pad_vitb.yaml")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile-batch", type=int, default=128, help="0: no profile")
    args = ap.parse_args()
    cfg, model, optimizer = model_and_optimizer(args.config, args.device)
    shape = (int(cfg.model.encoder.in_chans), *[int(v) for v in cfg.model.encoder.img_size])
    for batch in args.batches:
        imgs = torch.randn(batch, *shape, device=args.device)
        seconds = timed(model, optimizer, imgs, args.device, args.steps)
        print(f"{args.config} batch {batch} on {args.device}: {seconds * 1e3:.1f} ms per bare step, "
              f"{batch / seconds:.0f} images/s", flush=True)
    if args.profile_batch:
        from torch.profiler import ProfilerActivity, profile

        imgs = torch.randn(args.profile_batch, *shape, device=args.device)
        step(model, optimizer, imgs, args.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step(model, optimizer, imgs, args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        print(events.table(sort_by=sort, row_limit=18, max_name_column_width=60))
        if args.device == "cuda":
            busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 3
            kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / 3
            print(f"GPU busy per step: {busy / 1e3:.1f} ms in {kernels:.0f} kernels")


if __name__ == "__main__":
    main()
