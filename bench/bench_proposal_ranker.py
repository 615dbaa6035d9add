"""How many labelled frames a fitted proposal ranking needs, and whether proposals-fit's
cross-validated check picks the better ranking.

    python bench/bench_proposal_ranker.py --sources bench/roadscene_boxes/sources.yaml [--sizes 2,4,8,12,16,23]
        [--repeats 20] [--folds 5] [--l2 0.01] [overrides ...]

For each repeat (seed = repeat index) the labelled frames are shuffled and halved: the first half is
scored, and rankers are fitted on the first k frames of the second half, for each k of ``--sizes``.
Prints, averaged over the repeats, the recall at the cap (IoU 0.5) of the hand ranking
(``thermal_blobs``), of the fitted ranking (``thermal_blobs_fitted``), and of the ranking that
proposals-fit's cross-validation on those k frames recommends (fitted where it found more objects
than the hand ranking, else the hand one), and how often each is below the hand ranking.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.cli import load_proposal_config  # noqa: E402
from data_tools.proposal_ranker import (  # noqa: E402
    Ranker,
    RankerError,
    cross_validate,
    fit_weights,
    fitted_wins,
    frame_candidates,
    labelled_grey_frames,
    objects_found,
)
from data_tools.sources import load_sources  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", required=True, help="sources YAML with boxes (as for proposals-fit)")
    parser.add_argument("--sizes", default="2,4,8,12,16,23", help="numbers of labelled frames to fit on")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--l2", type=float, default=0.01)
    parser.add_argument("overrides", nargs="*", help="build config overrides, e.g. proposals.max_proposals=30")
    args = parser.parse_args()

    cfg = load_proposal_config(overrides=args.overrides)
    tables = frame_candidates(labelled_grey_frames(load_sources(args.sources)), cfg)
    sizes = [int(k) for k in args.sizes.split(",") if int(k) <= len(tables) - len(tables) // 2]
    print(f"{len(tables)} labelled frames, {sum(len(t.objects) for t in tables)} objects; "
          f"scored on {len(tables) // 2} frames per repeat, {args.repeats} repeats")

    rows = {k: [] for k in sizes}  # (objects, hand, fitted, recommended)
    for repeat in range(args.repeats):
        order = np.random.default_rng(repeat).permutation(len(tables))
        scored = [tables[i] for i in order[: len(tables) // 2]]
        pool = [tables[i] for i in order[len(tables) // 2:]]
        objects = sum(len(t.objects) for t in scored)
        hand = sum(objects_found(t, t.scores, cfg) for t in scored)
        for k in sizes:
            try:
                ranker = Ranker(fit_weights(pool[:k], args.l2), "bench")
            except RankerError:  # k frames without a single hit: nothing to fit, counted below
                rows[k].append((objects, hand, np.nan, hand, False))
                continue
            fitted = sum(objects_found(t, ranker.score(t.features), cfg) for t in scored)
            wins = fitted_wins(cross_validate(pool[:k], cfg, args.l2, args.folds))
            rows[k].append((objects, hand, fitted, fitted if wins else hand, wins))

    print("| frames fitted on | hand recall | fitted recall (worst) | fitted < hand | recommended recall | "
          "recommended < hand | fitted recommended |")
    print("|---|---|---|---|---|---|---|")
    for k in sizes:
        a = np.array(rows[k], dtype=np.float64)
        unfit = int(np.isnan(a[:, 2]).sum())
        a = a[~np.isnan(a[:, 2])]
        recall = a[:, 1:4] / a[:, :1]
        print(f"| {k} | {recall[:, 0].mean():.3f} | {recall[:, 1].mean():.3f} ({recall[:, 1].min():.3f}) | "
              f"{np.mean(a[:, 2] < a[:, 1]):.2f} | {recall[:, 2].mean():.3f} | {np.mean(a[:, 3] < a[:, 1]):.2f} | "
              f"{a[:, 4].mean():.2f} |" + (f" ({unfit} repeats without a hit to fit on)" if unfit else ""))


if __name__ == "__main__":
    main()
