"""``python -m data_tools`` (or ``irpt-data``): build, verify, summary, reencode, preview, proposals-eval,
proposals-fit, split, synth."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from data_tools.config import CONFIG_DIR, int_in, load_config, out_file, out_folder, override_arg
from data_tools.command import run_command
from data_tools.cpus import usable_cpus
from data_tools.manifest import read_manifest

DEFAULT_BUILD_CONFIG = CONFIG_DIR / "data" / "build.yaml"


def _read_sources(args: argparse.Namespace) -> list:
    from data_tools.sources import SourceError, load_sources, select_sources, source_from_shortcut

    sources = load_sources(args.sources, getattr(args, "sources_root", None)) if args.sources else []
    sources += [source_from_shortcut(s) for s in args.source]
    if not sources:
        raise SourceError("no sources: pass --sources FILE.yaml and/or --source NAME=PATH")
    only = getattr(args, "only", None)
    return select_sources(sources, [n.strip() for n in only.split(",") if n.strip()]) if only else sources


def _dry_run(sources, out: Path) -> int:
    """What each source gives a build, from its folders and annotation files alone: no frame is
    read and nothing is written (a corpus of 178k frames is checked in seconds, not hours)."""
    from data_tools.build import discover_corpus
    from data_tools.sources import check_roots

    check_roots(sources)  # every missing root at once, as the build says it
    corpus = discover_corpus(sources, out)
    ends = [*list(corpus.offsets.values())[1:], len(corpus.items)]
    for s, start, end in zip(sources, corpus.offsets.values(), ends):
        d = corpus.discoveries[s.name]
        annotated = sum(bool(len(boxes)) or mask is not None for _, boxes, mask in corpus.per_item_ann[start:end])
        stride = f", 1 in {s.stride} of each folder" if s.stride > 1 else ""
        expected = ""
        if s.expected_frames is not None:
            expected = f"; expected_frames {s.expected_frames:,}" + (
                " (more than found: a folder missing or named otherwise?)" if s.expected_frames > end - start else "")
        print(f"  {s.name}: {end - start:,} frame(s) (of {d.matched:,} matched{stride}), {annotated:,} with "
              f"annotations{expected}")
    print(f"dry run: {len(corpus.items):,} frame(s) from {len(sources)} source(s), "
          f"{len(corpus.orphan_issues)} annotation file issue(s); no frame read, nothing written to {out}")
    return 0


def _colour_folders(converted: list[dict]) -> list[str]:
    """One warning per source with colour frames, naming the folder holding most of them: visible photos
    in an infrared corpus, where the folders' names did not tell (no infrared-named folder beside them),
    or pseudo-coloured infrared, which luma suits."""
    by_source: dict[str, Counter] = {}
    for c in converted:
        if c["kind"] == "colour_converted_to_luma":
            by_source.setdefault(c["source"], Counter())[c["path"].rpartition("/")[0] or "."] += 1
    lines = []
    for source, folders in by_source.items():
        folder, n = folders.most_common(1)[0]
        lines.append(f"warning: source '{source}': {sum(folders.values()):,} colour frame(s) read as their luma, "
                     f"{n:,} of them in {folder}/: if they are visible photographs, not pseudo-coloured infrared, "
                     "leave them out (a glob, or the infrared folder as the source's root)")
    return lines


def _cmd_build(args: argparse.Namespace) -> int:
    from data_tools.build import BuildError, build_shards, overlay_picture
    from data_tools.sources import SourceError, left_out_text

    try:
        sources = _read_sources(args)
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return _dry_run(sources, Path(args.out))
        manifest = build_shards(sources, cfg, args.out, workers=args.workers or usable_cpus(),
                                overwrite=args.overwrite, progress=not args.quiet)
    except (SourceError, BuildError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = manifest["totals"]
    print(f"{args.out}: {t['shards']} shard(s), {t['written']} samples written, {t['skipped']} skipped "
          f"of {t['found']} found, {t['proposals']} proposals, {t['annotation_issues']} annotation issue(s), "
          f"{t['colour_converted']} colour frame(s) converted")
    packed = [c for c in manifest["colour_converted"] if c["kind"].endswith("_4th_channel_left_out")]
    if packed:
        print(f"warning: {len(packed)} frame(s) carry a 4th channel that is another image, not transparency "
              f"(e.g. {packed[0]['source']}: {packed[0]['path']}; MFNet packs the thermal frame there): their colour "
              "channels were read. To read the 4th, set `channel: 3` on the source", file=sys.stderr)
    for line in _colour_folders(manifest["colour_converted"]):
        print(line, file=sys.stderr)
    for name, ps in manifest["sources"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(ps["skipped_by_reason"].items())) or "none"
        videos = f", {ps['videos_not_read']} video file(s) not read" if ps.get("videos_not_read") else ""
        videos += f", {ps['unreadable_folders']} folder(s) not listed" if ps.get("unreadable_folders") else ""
        videos += f", {left_out_text(ps['other_modalities_left_out'])} left out (another modality)" if ps.get(
            "other_modalities_left_out") else ""
        held = "".join(f", {n} already in source '{other}'"
                       for other, n in ps.get("held_by_earlier_sources", {}).items())
        overlay = ps.get("overlay", {})
        filled = (f", burned-in overlay filled in for the proposals ({overlay['static_share']:.2%} of the frame, "
                  f"{overlay_picture(name)})" if overlay.get("masked") else "")
        print(f"  {name}: found {ps['found']} (of {ps['matched']} matched), written {ps['written']}, "
              f"skipped {ps['skipped']} ({reasons}){videos}{held}{filled}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from data_tools.verify import verify_shards

    problems = verify_shards(args.dir)
    for p in problems:
        print(f"MISMATCH {p}")
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    manifest = read_manifest(args.dir)
    print(f"{args.dir}: OK ({len(manifest['shards'])} shards, {manifest['totals']['written']} samples)")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from data_tools.manifest import ManifestError, shards_summary

    try:
        print("\n".join(shards_summary(args.dir)))
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_reencode(args: argparse.Namespace) -> int:
    from data_tools.reencode import ReencodeError, reencode_shards

    try:
        manifest = reencode_shards(args.dir, args.out, args.encoding, args.png_compression)
    except ReencodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = manifest["totals"]
    print(f"{args.out}: {t['shards']} shard(s), {t['written']} samples, frames as {args.encoding}, {t['bytes']} bytes")
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    from data_tools.manifest import ManifestError
    from data_tools.preview import preview_shards

    try:
        path = preview_shards(args.dir, args.out, samples=args.samples, seed=args.seed)
    except (ManifestError, ValueError) as e:  # not a shard folder; one without samples
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from data_tools.synth import SynthConfig, write_corpus

    cfg = SynthConfig(num_images=args.num, width=args.width, height=args.height, seed=args.seed,
                      bit_depth=args.bit_depth)
    out = write_corpus(args.out, cfg)
    print(f"wrote {cfg.num_images} scenes to {out} (sources file: {out / 'sources.yaml'})")
    return 0


def _add_labelled_frame_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sources", help="sources YAML with boxes or masks (as for build)")
    p.add_argument("--sources-root", help="folder the sources' relative paths start from")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH", help=argparse.SUPPRESS)
    p.add_argument("--config", default=str(DEFAULT_BUILD_CONFIG), help="build settings YAML (its proposals section)")
    p.add_argument("--min-object-side", type=int_in(0), default=40,
                   help="objects smaller than this on a side are not counted")
    p.add_argument("--every", type=int_in(1), default=1,
                   help="use frames i with i %% EVERY == OFFSET (a held-out split)")
    p.add_argument("--offset", type=int_in(0), default=0, help="0 to EVERY - 1")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. proposals.max_proposals=30")


def load_proposal_config(config: str | Path = DEFAULT_BUILD_CONFIG, overrides: list[str] = ()):
    """The ``ProposalConfig`` of a build settings YAML with dot-list overrides."""
    from data_tools.proposals import ProposalConfig
    from data_tools.schema import BuildConfig

    return ProposalConfig(**dict(load_config(config, list(overrides), BuildConfig)["proposals"]))


def _proposal_base(args: argparse.Namespace):
    return load_proposal_config(args.config, args.overrides)


def _cmd_proposals_eval(args: argparse.Namespace) -> int:
    from data_tools.proposal_eval import (
        format_by_source,
        format_ignored,
        format_misses,
        format_table,
        run,
        runnable_methods,
    )
    from data_tools.proposals import PROPOSAL_METHODS
    from data_tools.sources import SourceError

    try:
        sources = _read_sources(args)
        base = _proposal_base(args)
        left_out: dict[str, str] = {}
        methods = args.methods.split(",") if args.methods else runnable_methods(base, left_out)
        for name, why in left_out.items():  # said first: a long evaluation follows
            print(f"not evaluated: {name}: {why}", file=sys.stderr)
        unknown = sorted(set(methods) - set(PROPOSAL_METHODS.names()))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(PROPOSAL_METHODS.names())}")
        summaries = run(sources, base, methods, Path(args.out) if args.out else None,
                        args.min_object_side, args.every, args.offset)
    except (SourceError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(summaries))
    for line in [format_ignored(summaries[0])] + [f(s) for s in summaries for f in (format_by_source, format_misses)]:
        if line:
            print(line)
    _say_unreadable(summaries[0]["unreadable_frames"])
    if args.out:
        print(f"wrote {Path(args.out)}: proposals_eval.json (with the missed objects), recall_vs_proposals.png, "
              "missed_<method>.png (the missed objects: green, the best box kept: red)")
    return 0


def _say_unreadable(unreadable: list[dict]) -> None:
    if unreadable:
        first = unreadable[0]
        print(f"warning: left out {len(unreadable)} labelled frame(s) that could not be read, as the build skips "
              f"them (e.g. {first['source']}: {first['path']}: {first['reason']} {first['detail']})", file=sys.stderr)


def _cmd_proposals_fit(args: argparse.Namespace) -> int:
    from data_tools.proposal_ranker import fit_ranker, labelled_grey_frames, save_ranker
    from data_tools.sources import SourceError

    try:
        sources = _read_sources(args)
        base = _proposal_base(args)
        unreadable: list[dict] = []
        frames = labelled_grey_frames(sources, args.min_object_side, args.every, args.offset, unreadable,
                                      base.overlay_mask)
        ranker = fit_ranker(frames, base, args.l2, sources=[s.name for s in sources], folds=args.folds)
        save_ranker(ranker, args.out)
    except (SourceError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _say_unreadable(unreadable)
    seen = ranker["fitted_on"]
    print(f"fitted on {seen['frames']} frames, {seen['objects']} objects, {seen['candidates']} candidate boxes "
          f"({seen['hits']} on an object); wrote {args.out}")
    verdict, better = _cross_validation_verdict(seen.get("cross_validation"))
    print(verdict)
    print(f"{'use it' if better else 'to use it anyway'}: proposals.method=thermal_blobs_fitted "
          f"{override_arg('proposals.ranker', args.out)}")
    return 0


def _cross_validation_verdict(cv: dict | None) -> tuple[str, bool]:
    """What proposals-fit's cross-validation says, and whether to use the fitted ranking."""
    from data_tools.proposal_ranker import fitted_wins

    if cv is None:
        return "not cross-validated (--folds 0): compare it with proposals-eval on frames it was not fitted on", True
    if "skipped" in cv:
        return f"not cross-validated: {cv['skipped']}; compare it with proposals-eval on other labelled frames", True
    hand, fitted = cv["found"]["thermal_blobs"], cv["found"]["thermal_blobs_fitted"]
    line = (f"cross-validated ({cv['folds']} folds, each frame held out once): objects found at the cap "
            f"thermal_blobs {hand}/{cv['objects']}, thermal_blobs_fitted {fitted}/{cv['objects']}")
    better = fitted_wins(cv)
    if not better:
        line += ("\nthe fitted ranking does not beat the hand ranking on these frames: keep "
                 "proposals.method=thermal_blobs, or label more frames and fit again")
    return line, better


def _cmd_split(args: argparse.Namespace) -> int:
    from data_tools.splits import write_split

    try:
        n_train, n_val = write_split(args.root, args.images, args.val_fraction, args.seed, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{Path(args.root) / 'train.txt'}: {n_train} frames; {Path(args.root) / 'val.txt'}: {n_val} frames "
          f"(seed {args.seed})")
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data_tools", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build WebDataset shards with region proposals")
    b.add_argument("--sources", help="sources YAML (see README)")
    b.add_argument("--sources-root", help="folder the sources' relative paths start from (default: the YAML's "
                                          "folder), e.g. where the MSIP datasets are unpacked")
    b.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                   help="add every image under PATH as source NAME (repeatable)")
    b.add_argument("--out", required=True, type=out_folder, help="output folder for shards and manifest.json")
    b.add_argument("--only", metavar="NAME[,NAME...]", help="build from these sources of the file alone "
                                                           "(e.g. the downloads that are there so far)")
    b.add_argument("--config", default=str(DEFAULT_BUILD_CONFIG), help="build settings YAML")
    b.add_argument("--workers", type=int_in(0), default=0,
                   help="worker processes (default: the CPUs this process may use: its affinity and CPU quota)")
    b.add_argument("--overwrite", action="store_true", help="replace shards built with another config")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--dry-run", action="store_true", help="say what each source gives (frames, annotations) "
                                                         "without reading a frame or writing anything")
    b.add_argument("overrides", nargs="*", help="config overrides, e.g. shards.max_samples=500")
    b.set_defaults(func=_cmd_build)

    v = sub.add_parser("verify", help="re-read shards against manifest.json (exit 1 on mismatch)")
    v.add_argument("dir")
    v.set_defaults(func=_cmd_verify)

    su = sub.add_parser("summary", help="one line on what a finished shard folder holds (and its preview)")
    su.add_argument("dir")
    su.set_defaults(func=_cmd_summary)

    r = sub.add_parser("reencode", help="convert a shard folder's frames to another encoding (png | raw), "
                                        "keeping proposals, keys and shards")
    r.add_argument("dir")
    r.add_argument("--out", required=True, type=out_folder, help="new folder (must not exist or be empty)")
    r.add_argument("--encoding", required=True, choices=("png", "raw"))
    r.add_argument("--png-compression", type=int_in(0, 9), default=None, help="PNG level 0-9 (default: the source's)")
    r.set_defaults(func=_cmd_reencode)

    pv = sub.add_parser("preview", help="draw samples with proposals and an online RoI crop")
    pv.add_argument("dir")
    pv.add_argument("--out", required=True, type=out_file("preview.png", (".png", ".jpg", ".jpeg")),
                    help="the grid image to write (.png / .jpg), or a folder for its preview.png")
    pv.add_argument("--samples", type=int_in(1), default=8)
    pv.add_argument("--seed", type=int, default=0)
    pv.set_defaults(func=_cmd_preview)

    pe = sub.add_parser("proposals-eval", help="recall, proposals per frame and speed of each proposal method "
                                               "on labelled frames")
    _add_labelled_frame_args(pe)
    pe.add_argument("--methods", help="comma-separated (default: every method the config can run)")
    pe.add_argument("--out", type=out_folder, help="folder for proposals_eval.json and recall_vs_proposals.png")
    pe.set_defaults(func=_cmd_proposals_eval)

    pf = sub.add_parser("proposals-fit", help="fit the thermal_blobs_fitted ranking to a camera's labelled frames")
    _add_labelled_frame_args(pf)
    pf.add_argument("--out", required=True, type=out_file("ranker.json", (".json",)),
                    help="the ranker JSON to write (then proposals.ranker=FILE), or a folder for its ranker.json")
    pf.add_argument("--l2", type=float, default=0.01, help="L2 penalty of the logistic regression")
    pf.add_argument("--folds", type=int, default=5,
                    help="compare with the hand ranking by cross-validation over this many folds of frames (0: skip)")
    pf.set_defaults(func=_cmd_proposals_fit)

    sp = sub.add_parser("split", help="write a seeded train.txt / val.txt for a dataset published without a split")
    sp.add_argument("--root", required=True, help="the dataset folder (the lists are written there)")
    sp.add_argument("--images", required=True, help="folder under ROOT whose image names are split, e.g. Ir")
    sp.add_argument("--val-fraction", type=float, default=0.2)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=_cmd_split)

    s = sub.add_parser("synth", help="generate the synthetic thermal/visible demo corpus")
    s.add_argument("--out", required=True, type=out_folder)
    s.add_argument("--num", type=int_in(1), default=96)
    s.add_argument("--width", type=int_in(16), default=320)
    s.add_argument("--height", type=int_in(16), default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    s.set_defaults(func=_cmd_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run_command(args.func, args)
