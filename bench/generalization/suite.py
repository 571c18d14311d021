"""Runs the studies side by side (one process per CPU core, each on one torch thread, so the numbers
do not depend on the worker count) and assembles generalization.json's top-level "studies" list,
the paired-difference and GAN-sample plots and the MNIST/mixture part of report.md."""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from bench.generalization.entries import markdown, plot_paired, study_entry

DIGITS_DATASET = "sklearn load_digits (8x8), fixed test split of 597, per-seed validation split of 300"


def _timed(fn, args):
    """Run one study on one torch thread; return (its result, its CPU seconds)."""
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    return fn(*args), time.process_time() - cpu0


def run_tasks(tasks, workers: int) -> dict:
    """tasks: [(name, fn, args)], longest first. workers <= 1 runs them in this process.
    Returns {name: (result, cpu_seconds)}."""
    if workers <= 1:
        return {name: _timed(fn, args) for name, fn, args in tasks}
    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {name: pool.submit(_timed, fn, args) for name, fn, args in tasks}
        return {name: f.result() for name, f in futures.items()}


def mnist_tasks(mc) -> list:
    from bench.generalization.gan import run_gan
    from bench.generalization.ssl import run_ssl
    from bench.generalization.supervised_mnist import run_supervised_mnist
    from bench.generalization.vae_mnist import run_vae
    return [("gan_mixture", run_gan, (mc,)), ("supervised_mnist5k", run_supervised_mnist, (mc,)),
            ("ssl_mnist5k", run_ssl, (mc,)), ("vae_mnist5k", run_vae, (mc,))]


def digits_entries(runs, grids, methods) -> list:
    """The digits study in the common format: one entry per (training size, label noise)."""
    settings = list(dict.fromkeys((r["n_train"], r["label_noise"]) for r in runs))
    pairs = {f"dres - {m}": ("dres", m) for m in methods if m != "dres"}
    entries = []
    for n, z in settings:
        rows = [r for r in runs if r["n_train"] == n and r["label_noise"] == z]
        entries.append(study_entry("supervised_digits", DIGITS_DATASET, "test_acc", True, rows, methods, pairs,
                                   setting=f"n{n}_{'clean' if z == 0 else f'noise{z:g}'}", grids=grids,
                                   extra={"n_train": n, "label_noise": z}))
    return entries


def add_studies(result: dict, parts: dict, out_dir, methods) -> None:
    """Put the "studies" list (digits first) and the MNIST/mixture parts into ``result``; write the
    plots and append the new sections to report.md."""
    entries = digits_entries(result["runs"], {m: g for m, g in result["config"]["grids"].items() if m in methods},
                             methods)
    for name in ("supervised_mnist5k", "ssl_mnist5k", "gan_mixture", "vae_mnist5k", "v3"):
        if name in parts:
            part, cpu = parts[name]
            samples = part.pop("samples", None)
            if samples is not None:
                from bench.generalization.gan import plot_gan_samples
                plot_gan_samples(samples, out_dir / "gan_samples.png")
            entries += part["entries"]
            result[name] = {"rows": part["rows"], "cpu_seconds": cpu}
    result["studies"] = entries
    main_entries = [e for e in entries if e["metric"] not in ("cpu_ms_per_step",)
                    and not (e["name"] == "supervised_digits")]
    if main_entries:
        plot_paired(main_entries, out_dir / "paired_differences.png")
    cpu = {name: round(c, 1) for name, (_, c) in parts.items()}
    text = ["", "## MNIST-5k and 2-D mixture studies (common format: generalization.json \"studies\")", "",
            f"CPU seconds per study: {cpu}", "",
            "![paired differences](paired_differences.png)", "", "![GAN samples](gan_samples.png)", "",
            markdown(entries)]
    if "v3" in parts:  # evidence v3's tables (bench/generalization/v3_tables.py)
        from bench.generalization.v3_tables import derived, report_tables
        v3 = {"studies": [e for e in entries if e["name"].startswith("v3_")]}
        result["v3"]["derived"] = v3["derived"] = derived(v3["studies"])
        text += ["", "## Evidence v3 (small size; the full run is `python -m bench.generalization.v3`)", "",
                 report_tables(v3)]
    with open(out_dir / "report.md", "a") as f:
        f.write("\n".join(text) + "\n")
