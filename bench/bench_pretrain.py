"""Pre-training cost of pad vs continual vs scratch on the same model and batch.

    python bench/bench_pretrain.py [--size base] [--batch 8] [--steps 6] [--img 224] [--device cuda]
                                   [--workers 1] [--precision bf16] [--paradigms pad continual] [--peak-tflops 989]

Runs the real trainer (``python -m pretrain train``, one process, fp32 on CPU or bf16 autocast on a
GPU) for each paradigm in a fresh process on synthetic shards, and prints the median step time
(first two steps excluded), the peak resident memory of the training process (CPU) or peak CUDA
memory (GPU), and the bytes of one checkpoint. Bars (issue 4): pad step <= 0.85x continual,
pad peak memory < continual, pad checkpoint <= 0.3x continual.

Model FLOPs per image are counted (torch's FlopCounterMode) on one forward + backward of each
paradigm's model with its own trainable set, so PAD's frozen encoder costs no weight gradients;
model FLOPs utilisation = FLOPs per image x images/s / the device's peak (``--peak-tflops``,
dense bf16; known for H100 / H200 / A100 when not given).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data_tools.build import build_shards  # noqa: E402
from data_tools.cli import DEFAULT_BUILD_CONFIG  # noqa: E402
from data_tools.config import load_config  # noqa: E402
from data_tools.sources import load_sources  # noqa: E402
from data_tools.synth import SynthConfig, write_corpus  # noqa: E402

CONFIGS = {"pad": "pad_vitb.yaml", "continual": "continual_vitb.yaml", "scratch": "scratch_vitb.yaml"}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM data sheets


def model_overrides(args) -> list[str]:
    return [f"model.encoder.size={args.size}", f"model.encoder.img_size=[{args.img},{args.img}]"]


def flops_per_image(name: str, args) -> float:
    """Forward + backward FLOPs of one training image for the paradigm (its trainable set only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.factory import build_model_from_config

    cfg = load_config(str(ROOT / "configs" / "pretrain" / CONFIGS[name]), model_overrides(args))
    model = build_model_from_config(cfg, device="meta")  # the paradigm's trainable set already marked
    imgs = torch.zeros(1, int(cfg.model.encoder.in_chans), args.img, args.img, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model(imgs)
        loss.backward()
    return float(counter.get_total_flops())


def peak_tflops(args) -> float | None:
    if args.peak_tflops or args.device != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_paradigm(name: str, shards: Path, work: Path, args) -> dict:
    run_dir = work / name
    cuda = args.device == "cuda"
    overrides = [
        f"data.shards=[{{path: {shards}}}]", *model_overrides(args), f"train.batch_size={args.batch}",
        "train.effective_batch=null", "train.accum_steps=1", "train.epochs=1", "optim.warmup_epochs=0",
        f"data.samples_per_epoch={args.batch * args.steps}", f"data.num_workers={args.workers}",
        f"train.precision={args.precision or ('bf16_autocast' if cuda else 'fp32')}",
        f"train.save_every_steps={args.steps}",
        "train.log_every_steps=1",
    ]
    code = ("import resource, subprocess, sys, json; "
            "r = subprocess.run(sys.argv[1:]); "
            "print(json.dumps({'rc': r.returncode, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "pretrain", "train", "--config",
           str(ROOT / "configs" / "pretrain" / CONFIGS[name]), "--run-dir", str(run_dir), *overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    last = out.stdout.strip().splitlines()[-1]
    usage = json.loads(last)
    if usage["rc"] != 0:
        raise RuntimeError(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = [args.batch / m["images_per_s"] for m in metrics[2:]]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    result = {"step_s": statistics.median(step_s), "peak_rss_mb": usage["maxrss_kb"] / 1024,
              "checkpoint_mb": dir_bytes(run_dir / "checkpoints" / tag) / 2**20,
              "images_per_s": statistics.median(m["images_per_s"] for m in metrics[2:])}
    if "cuda_peak_mb" in metrics[-1]:
        result["cuda_peak_mb"] = metrics[-1]["cuda_peak_mb"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps + the first two, excluded (>= 3)")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--workers", type=int, default=1, help="loader processes (a GPU step outruns one)")
    ap.add_argument("--precision", choices=("bf16_autocast", "bf16", "fp32"), default=None,
                    help="train.precision (default: bf16_autocast on a GPU, fp32 on a CPU)")
    ap.add_argument("--paradigms", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS),
                    help="pad and continual for the ratios")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error(f"--steps {args.steps}: the first two steps are not timed, so at least 3")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_corpus(work / "synth", SynthConfig(num_images=max(32, args.batch * 2), width=320, height=256))
        cfg = load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false", "shards.max_samples=16"])
        build_shards(load_sources(work / "synth" / "sources.yaml"), cfg, work / "shards", progress=False)
        results = {}
        for name in args.paradigms:  # each said as it ends: a run cut short keeps the ones before
            results[name] = run_paradigm(name, work / "shards", work, args)
            print(name, json.dumps(results[name]), flush=True)
    peak = peak_tflops(args)
    for name, r in results.items():
        r["gflops_per_image"] = flops_per_image(name, args) / 1e9
        r["achieved_tflops"] = r["gflops_per_image"] * r["images_per_s"] / 1e3
        if peak:
            r["mfu"] = r["achieved_tflops"] / peak
    summary = {
        "model": f"ViT-{args.size[0].upper()}/16 MAE, {args.img}x{args.img}, batch {args.batch}, {args.device}",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "peak_tflops": peak,
        "results": {k: {m: round(v, 3) for m, v in r.items()} for k, r in results.items()},
    }
    if "pad" in results and "continual" in results:
        pad, cont = results["pad"], results["continual"]
        memory = (pad.get("cuda_peak_mb", pad["peak_rss_mb"]) / cont.get("cuda_peak_mb", cont["peak_rss_mb"]))
        summary["pad_vs_continual"] = {"step_time": round(pad["step_s"] / cont["step_s"], 3),
                                       "peak_memory": round(memory, 3),
                                       "checkpoint": round(pad["checkpoint_mb"] / cont["checkpoint_mb"], 3)}
    print(json.dumps(summary, indent=1))
    r = summary.get("pad_vs_continual")
    if r:
        print(f"bars: step {r['step_time']} (<= 0.85), memory {r['peak_memory']} (< 1), "
              f"checkpoint {r['checkpoint']} (<= 0.3)")

if __name__ == "__main__":
    main()
