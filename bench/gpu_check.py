"""Every stage on a GPU, in one short run: what the CPU test suite cannot show.

    python bench/gpu_check.py --data ../shared/data --out gpu_check/ [--scale paper|tiny] [--only a,b]

Checks (each a fresh process of the project's CLIs, as a user runs them; figures into summary.json):
- pretrain_resume: PAD pre-training under DeepSpeed (bf16 autocast on a GPU), uninterrupted against
  SIGKILLed after step 6 and resumed from step 4: the largest difference of any trainable weight and
  whether the samples were the same; then the backbone export.
- det: IV-tuning (infrared + visible) Faster R-CNN fine-tuning from that backbone on real MSRS pairs
  laid out as MSRS ships, then COCO evaluation and `finetune predict` on the held-out pairs.
- seg: Mona (infrared) UperNet fine-tuning on real SIRST frames, then mIoU.
- Step time, data-wait fraction and peak CUDA memory of each run, from its metrics.jsonl.
`--scale paper` runs the ViT-B configs (pad_vitb, det_vitb, seg_vitb) at their own input sizes and
batches; `--scale tiny` the tiny configs on the CPU (a dry run of this script). The learned figures
(AP, mIoU) after a few dozen steps from random init only show that evaluation ran.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCALES = {
    "paper": dict(pretrain="pad_vitb.yaml", det="det_vitb.yaml", seg="seg_vitb.yaml", pt_batch=64,
                  ft_steps=40, synth=(512, 320, 256), ft_extra=()),
    "tiny": dict(pretrain="tiny.yaml", det="det_tiny.yaml", seg="seg_sirst_tiny.yaml", pt_batch=4,
                 ft_steps=6, synth=(48, 160, 128),
                 ft_extra=("model.encoder.depth=2",)),  # the tiny pre-training config's depth
}


def run(log, name: str, cmd: list[str], timeout: int, env_extra: dict | None = None) -> tuple[int, float]:
    """One CLI call, its output appended to the log; (exit status, seconds)."""
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))  # wheels put on the path kept
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    t0 = time.time()
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    seconds = time.time() - t0
    log.write(f"===== {name}: exit {rc} after {seconds:.1f} s\n")
    log.flush()
    print(f"{name}: exit {rc} after {seconds:.1f} s", flush=True)
    return rc, seconds


def step_figures(run_dir: Path, skip: int = 2) -> dict:
    """Median images/s and data-wait fraction over the logged steps after the first `skip`; peak CUDA memory."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "images_per_s" in r][skip:] or [r for r in rows if "images_per_s" in r]
    if not steps:
        return {}
    out = {"images_per_s": round(statistics.median(r["images_per_s"] for r in steps), 2),
           "data_wait_fraction": round(statistics.median(r["data_wait_fraction"] for r in steps), 3),
           "last_loss": steps[-1]["loss"]}
    peaks = [r["cuda_peak_mb"] for r in rows if "cuda_peak_mb" in r]
    if peaks:
        out["cuda_peak_mb"] = round(max(peaks))
    return out


def synth_shards(log, work: Path, scale: dict) -> Path:
    num, width, height = scale["synth"]
    py = sys.executable
    run(log, "synth", [py, "-m", "data_tools", "synth", "--out", str(work / "synth"), "--num", str(num),
                       "--width", str(width), "--height", str(height)], 120)
    run(log, "build", [py, "-m", "data_tools", "build", "--sources", str(work / "synth" / "sources.yaml"),
                       "--out", str(work / "shards"), "--workers", "8", "shards.max_samples=64"], 120)
    return work / "shards"


def check_pretrain_resume(log, work: Path, scale: dict, summary: dict) -> Path | None:
    import torch

    shards = synth_shards(log, work, scale)
    batch, steps = scale["pt_batch"], 12
    config = ROOT / "configs" / "pretrain" / scale["pretrain"]
    base = [sys.executable, "-m", "pretrain", "train", "--config", str(config),
            f"data.shards=[{{path: {shards}}}]", f"train.batch_size={batch}", "train.effective_batch=null",
            "train.accum_steps=1", "train.epochs=1", "optim.warmup_epochs=0", f"data.samples_per_epoch={batch * steps}",
            "train.save_every_steps=4", "train.log_every_steps=1", "train.record_samples=true", "data.num_workers=6"]
    clean, killed = work / "pt_clean", work / "pt_killed"
    rc_clean, s_clean = run(log, "pretrain", base + ["--run-dir", str(clean)], 150)
    rc_kill, _ = run(log, "pretrain_killed", base + ["--run-dir", str(killed)], 150,
                     {"IRPT_FAULT_SIGKILL_AFTER_STEP": "6"})
    rc_resume, _ = run(log, "pretrain_resumed", base + ["--run-dir", str(killed)], 150)
    result = {"exit": [rc_clean, rc_kill, rc_resume], "seconds": round(s_clean, 1), **step_figures(clean)}
    tag = f"step{steps:08d}"
    a_path, b_path = (d / "checkpoints" / tag / "mp_rank_00_model_states.pt" for d in (clean, killed))
    if a_path.exists() and b_path.exists():
        a = torch.load(a_path, weights_only=True, map_location="cpu")["module"]
        b = torch.load(b_path, weights_only=True, map_location="cpu")["module"]
        diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
        result["resume_max_abs_diff"] = max(diffs.values())
        result["resume_bit_identical"] = all(torch.equal(a[k], b[k]) for k in a)
        result["resume_same_samples"] = (clean / "samples_rank0.jsonl").read_text() == \
            (killed / "samples_rank0.jsonl").read_text()
        loss = {d.name: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
                         if '"loss"' in x][-3:] for d in (clean, killed)}
        result["last_losses"] = loss
    backbone = work / "backbone.pth"
    export = [sys.executable, "-m", "pretrain", "export", str(clean), "--out", str(backbone)]
    rc_export, _ = run(log, "export", export, 100)
    result["export_exit"] = rc_export
    summary["pretrain_resume"] = result
    return backbone if rc_export == 0 else None


def msrs_as_shipped(src: Path, dst: Path, held_out: int = 4) -> None:
    """MSRS's {train,test}/{ir,vi,labels_ir} layout from the flat sample: the last `held_out` pairs
    are the test split."""
    names = sorted(p.stem for p in (src / "ir").glob("*.png"))
    for split, chosen in (("train", names[:-held_out]), ("test", names[-held_out:])):
        for sub, ext in (("ir", ".png"), ("vi", ".png"), ("labels_ir", ".txt")):
            (dst / split / sub).mkdir(parents=True, exist_ok=True)
            for n in chosen:
                os.symlink((src / sub / f"{n}{ext}").resolve(), dst / split / sub / f"{n}{ext}")


def finetune_cmd(task: str, config: str, run_dir: Path, scale: dict, backbone: Path | None, *overrides) -> list:
    init = [f"init.checkpoint={backbone}"] if backbone else []
    return [sys.executable, "-m", "finetune", task, "--config", str(ROOT / "configs" / "finetune" / config),
            "--run-dir", str(run_dir), f"train.steps={scale['ft_steps']}", "train.log_every_steps=1",
            f"train.save_every_steps={scale['ft_steps']}", "optim.warmup_steps=5", "data.num_workers=4", *init,
            *scale["ft_extra"], *overrides]


def check_det(log, work: Path, data: Path, scale: dict, backbone: Path | None, summary: dict) -> None:
    root = work / "MSRS"
    msrs_as_shipped(data / "msrs20", root)
    run_dir = work / "det"
    preset = "presets/msrs_det.yaml" if scale is SCALES["paper"] else scale["det"]
    extra = [] if scale is SCALES["paper"] else [
        "data.layout=pairs", "data.split_dirs={train: train, val: test}", "data.train_split=null",
        "data.val_split=null",
        "data.dirs={ir: '{split}/ir', vi: '{split}/vi', label: null, image: null}",
        "data.boxes={format: yolo, path: '{split}/labels_ir'}", "data.classes=[person,bicycle,car]"]
    cmd = finetune_cmd("det", preset, run_dir, scale, backbone, f"data.root={root}", *extra)
    rc, seconds = run(log, "det", cmd, 240)
    result = {"exit": rc, "seconds": round(seconds, 1), **step_figures(run_dir)}
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        result.update({k: m[k] for k in ("AP", "AP50", "frames") if k in m})
    pred = work / "pred"
    rc_pred, _ = run(log, "predict", [sys.executable, "-m", "finetune", "predict", str(run_dir), "--ir",
                                      str(root / "test" / "ir"), "--vi", str(root / "test" / "vi"), "--out", str(pred)],
                     120)
    result["predict_exit"] = rc_pred
    result["predict_files"] = len(list(pred.rglob("*"))) if pred.exists() else 0
    summary["det"] = result


def check_seg(log, work: Path, data: Path, scale: dict, backbone: Path | None, summary: dict) -> None:
    run_dir = work / "seg"
    sirst = data / "sirst"
    overrides = [f"data.root={sirst}", "model.method=mona", "model.modality=ir"]
    if scale is SCALES["paper"]:
        overrides += ["data.layout=pairs", "data.dirs={ir: images, vi: null, label: masks}",
                      "data.label_suffix=_pixels0",
                      "data.train_split=idx_427/trainval.txt", "data.val_split=idx_427/test.txt",
                      "data.classes=[background,target]", "data.binary_labels=true"]
    rc, seconds = run(log, "seg", finetune_cmd("seg", scale["seg"], run_dir, scale, backbone, *overrides), 240)
    result = {"exit": rc, "seconds": round(seconds, 1), **step_figures(run_dir)}
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        result.update({k: m[k] for k in ("mIoU", "frames") if k in m})
    summary["seg"] = result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the shared real data (msrs20/, sirst/)")
    ap.add_argument("--out", required=True, help="summary.json and log.txt go here")
    ap.add_argument("--work", default=None, help="scratch folder (default: OUT/work, removed at the end)")
    ap.add_argument("--scale", choices=tuple(SCALES), default="paper")
    ap.add_argument("--only", default="pretrain_resume,det,seg")
    args = ap.parse_args()
    out, data, scale = Path(args.out), Path(args.data).resolve(), SCALES[args.scale]
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary = {"torch": torch.__version__, "device": device, "scale": args.scale}
    only = set(args.only.split(","))
    with open(out / "log.txt", "w") as log:
        backbone = check_pretrain_resume(log, work, scale, summary) if "pretrain_resume" in only else None
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if "det" in only:
            check_det(log, work, data, scale, backbone, summary)
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if "seg" in only:
            check_seg(log, work, data, scale, backbone, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
