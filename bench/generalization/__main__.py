"""The DReS evidence study: does DReS generalize better than ERM, gradient penalty and mixup?

    python -m bench.generalization [--quick] [--out DIR]

Data: scikit-learn's load_digits (1,797 real 8x8 digits; ships with the package) and make_moons.
Every method's strength is chosen per seed on a validation split; the test split (597 fixed
digits) is only read to report. Intervals are two-sided 95% Student-t over seeds.
Writes DIR/generalization.json, DIR/report.md and PNG plots."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.generalization.config import full_config, quick_config
from bench.generalization.studies import resummarize, run_study


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.generalization", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds and a reduced grid (< 10 min on 2 CPU cores)")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: results do not depend on it)")
    parser.add_argument("--resummarize", action="store_true",
                        help="only recompute summary and report.md from DIR/generalization.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, mode = (quick_config(), "quick") if args.quick else (full_config(), "full")
    out = args.out or Path("bench/out/generalization")
    if args.resummarize:
        resummarize(out)
        return
    run_study(cfg, out, mode)


if __name__ == "__main__":
    main()
