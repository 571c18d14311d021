"""The study's experiments, each a function of the StudyConfig returning rows and summaries:
supervised digits tuned per seed, the DReS knob sweep, equal wall-clock time, self-supervised and
generative regimes; ``run_study`` runs them all and writes the outputs (bench/generalization/report.py)."""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bench.generalization import data
from bench.generalization.config import SUPERVISED_METHODS, StudyConfig
from bench.generalization.data import corrupt_labels, digits_splits, mean_ci95
from bench.generalization.regimes import heldout_elbo, kernel_mmd, linear_probe, train_simclr, train_vae
from bench.generalization.report import plot_supervised, plot_sweep, write_json, write_report
from bench.generalization.supervised import MethodConfig, accuracy, seconds_per_step, train_classifier


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setting_key(n_train, noise) -> str:
    return f"n{n_train}_noise{noise:g}"


def supervised_data(seed, n_train, noise):
    (x_pool, y_pool), (x_val, y_val), test = digits_splits(seed)
    x_train, y_train = x_pool[:n_train], corrupt_labels(y_pool[:n_train], noise, seed)
    # validation labels carry the same noise: a practitioner has no clean labels to tune on
    y_val = corrupt_labels(y_val, noise, seed + 777)
    return (x_train, y_train), (x_val, y_val), test


def fit_and_score(cfg: MethodConfig, train, val, test, *, steps, batch, seed) -> dict:
    model, seconds = train_classifier(cfg, *train, steps=steps, batch=batch, seed=seed)
    return {"val_acc": accuracy(model, *val), "test_acc": accuracy(model, *test), "seconds": seconds,
            "train_acc": accuracy(model, *train)}


# ------------------------------------------------------------------ 1. supervised, tuned per seed

def run_supervised(cfg: StudyConfig):
    selected, tuning = [], []
    for n_train in cfg.train_sizes:
        for noise in cfg.label_noise:
            for seed in cfg.seeds:
                train, val, test = supervised_data(seed, n_train, noise)
                for method in SUPERVISED_METHODS:
                    best = None
                    for strength in cfg.grids[method]:
                        res = fit_and_score(MethodConfig(method, strength), train, val, test,
                                            steps=cfg.steps, batch=cfg.batch, seed=seed)
                        row = {"method": method, "seed": seed, "n_train": n_train, "label_noise": noise,
                               "strength": strength, **res}
                        tuning.append(row)
                        if best is None or row["val_acc"] > best["val_acc"]:  # ties keep the weaker
                            best = row
                    selected.append(dict(best))
            log(f"supervised {setting_key(n_train, noise)} done")
    return selected, tuning


def summarize_supervised(selected, cfg: StudyConfig) -> dict:
    """summary[method]: mean over seeds of the accuracy averaged over all settings, with its
    t-interval; the paired difference to ERM; and the same per setting."""
    summary = {}
    settings = [(n, z) for n in cfg.train_sizes for z in cfg.label_noise]
    acc = {(r["method"], r["seed"], r["n_train"], r["label_noise"]): r["test_acc"] for r in selected}
    methods = [m for m in SUPERVISED_METHODS if any(r["method"] == m for r in selected)]  # older runs: fewer
    for method in methods:
        per_seed = [np.mean([acc[method, s, n, z] for n, z in settings]) for s in cfg.seeds]
        per_seed_erm = [np.mean([acc["erm", s, n, z] for n, z in settings]) for s in cfg.seeds]
        entry = mean_ci95(per_seed)
        entry["diff_vs_erm"] = mean_ci95(np.subtract(per_seed, per_seed_erm))
        # paired (same seed, same data) difference to every other method, averaged over settings
        entry["paired_diff"] = {
            other: mean_ci95([np.mean([acc[method, s, n, z] - acc[other, s, n, z] for n, z in settings])
                              for s in cfg.seeds])
            for other in methods if other != method}
        entry["by_setting"] = {}
        for n, z in settings:
            vals = [acc[method, s, n, z] for s in cfg.seeds]
            diffs = [acc[method, s, n, z] - acc["erm", s, n, z] for s in cfg.seeds]
            strengths = [r["strength"] for r in selected
                         if r["method"] == method and r["n_train"] == n and r["label_noise"] == z]
            entry["by_setting"][setting_key(n, z)] = {**mean_ci95(vals), "diff_vs_erm": mean_ci95(diffs),
                                                      "chosen_strengths": strengths}
        summary[method] = entry
    return summary


# ------------------------------------------------------------------ 1b. sweep of DReS knobs

def sweep_configs(cfg: StudyConfig):
    base = cfg.sweep_base
    variants = [("erm", "-", MethodConfig("erm"))]
    for w in cfg.sweep_weights:
        variants.append(("weight", w, MethodConfig("dres", **{**base, "strength": w})))
    for r in cfg.sweep_coded_ratios:
        variants.append(("N/K", r, MethodConfig("dres", **{**base, "coded_ratio": r})))
    for d in cfg.sweep_dof_fracs:
        variants.append(("dof/count", d, MethodConfig("dres", **{**base, "dof_frac": d})))
    for m in cfg.sweep_submodules:
        variants.append(("submodule", m, MethodConfig("dres", **{**base, "submodule": m})))
    # one-factor-at-a-time around the base: the base config appears in every knob; train it once
    unique = {}
    for knob, value, mc in variants:
        unique.setdefault(json.dumps(asdict(mc), sort_keys=True), mc)
    return variants, unique


def run_sweep(cfg: StudyConfig):
    variants, unique = sweep_configs(cfg)
    rows, table = [], []
    for n_train, noise in cfg.sweep_setting:
        results = {}
        for seed in cfg.seeds:
            train, val, test = supervised_data(seed, n_train, noise)
            for key, mc in unique.items():
                res = fit_and_score(mc, train, val, test, steps=cfg.steps, batch=cfg.batch, seed=seed)
                results[key, seed] = res
                rows.append({"method": mc.method, "seed": seed, "n_train": n_train, "label_noise": noise,
                             **{k: v for k, v in asdict(mc).items() if k != "method"}, **res})
        erm_key = json.dumps(asdict(MethodConfig("erm")), sort_keys=True)
        for knob, value, mc in variants:
            key = json.dumps(asdict(mc), sort_keys=True)
            test_accs = [results[key, s]["test_acc"] for s in cfg.seeds]
            table.append({"setting": setting_key(n_train, noise), "knob": knob, "value": value,
                          "val": mean_ci95([results[key, s]["val_acc"] for s in cfg.seeds]),
                          "test": mean_ci95(test_accs),
                          "test_diff_vs_erm": mean_ci95([results[key, s]["test_acc"] - results[erm_key, s]["test_acc"]
                                                         for s in cfg.seeds])})
        log(f"sweep {setting_key(n_train, noise)} done")
    return rows, table


# ------------------------------------------------------------------ 1c. equal wall-clock time

def run_wallclock(cfg: StudyConfig, selected):
    """Every method gets the wall time DReS needs for `steps` steps; cheaper methods take more steps.
    Per-step cost is measured here (median of short repeats), strengths are those chosen on validation."""
    n_train, noise = cfg.wallclock_setting
    train, _, _ = supervised_data(0, n_train, noise)
    probe = {m: MethodConfig(m, cfg.grids[m][-1]) for m in SUPERVISED_METHODS}
    sec_per_step = {m: seconds_per_step(mc, *train, batch=cfg.batch, repeats=cfg.timing_repeats)
                    for m, mc in probe.items()}
    budget = cfg.steps * sec_per_step["dres"]
    steps = {m: max(1, int(round(budget / sec_per_step[m]))) for m in SUPERVISED_METHODS}
    chosen = {(r["method"], r["seed"]): r["strength"] for r in selected
              if r["n_train"] == n_train and r["label_noise"] == noise}
    rows = []
    for seed in cfg.seeds:
        tr, val, test = supervised_data(seed, n_train, noise)
        for m in SUPERVISED_METHODS:
            strength = chosen.get((m, seed), cfg.grids[m][0])
            res = fit_and_score(MethodConfig(m, strength), tr, val, test, steps=steps[m], batch=cfg.batch, seed=seed)
            rows.append({"method": m, "seed": seed, "steps": steps[m], "strength": strength, **res})
    erm_acc = {r["seed"]: r["test_acc"] for r in rows if r["method"] == "erm"}
    table = {m: {"ms_per_step": 1e3 * sec_per_step[m], "steps": steps[m],
                 "test": mean_ci95([r["test_acc"] for r in rows if r["method"] == m]),
                 "test_diff_vs_erm": mean_ci95([r["test_acc"] - erm_acc[r["seed"]] for r in rows if r["method"] == m])}
             for m in SUPERVISED_METHODS}
    log("wall-clock comparison done")
    return {"setting": setting_key(n_train, noise), "budget_seconds": budget, "rows": rows, "table": table}


# ------------------------------------------------------------------ 2. self-supervised

def run_self_supervised(cfg: StudyConfig):
    rows = []
    for seed in cfg.seeds:
        (x_pool, y_pool), val, test = digits_splits(seed)
        labeled = (x_pool[:cfg.ssl_labels], y_pool[:cfg.ssl_labels])
        # unlabeled data: all non-test digits except the validation ones
        pixel_val, pixel_test = linear_probe(torch.nn.Identity(), *labeled, [val, test])
        rows.append({"method": "raw_pixels", "seed": seed, "strength": 0.0, "val_acc": pixel_val, "test_acc": pixel_test})
        for method, weights in [("simclr", [0.0]), ("simclr_dres", cfg.ssl_weights)]:
            best = None
            for w in weights:
                t0 = time.perf_counter()
                enc = train_simclr(x_pool, dres_weight=w, steps=cfg.ssl_steps, batch=cfg.ssl_batch, seed=seed)
                v, t = linear_probe(enc, *labeled, [val, test])
                row = {"method": method, "seed": seed, "strength": w, "val_acc": v, "test_acc": t,
                       "seconds": time.perf_counter() - t0}
                if best is None or v > best["val_acc"]:
                    best = row
            rows.append(best)
    summary = summarize_rows(rows, "test_acc", baseline="simclr")
    log("self-supervised done")
    return {"labels_for_probe": cfg.ssl_labels, "rows": rows, "summary": summary}


# ------------------------------------------------------------------ 3. generative

def run_generative(cfg: StudyConfig):
    rows = []
    grids = {"vae": [0.0], "vae_dres": cfg.vae_dres_weights, "vae_grad_penalty": cfg.vae_gp_weights}
    for seed in cfg.seeds:
        (x_pool, _), (x_val, _), (x_test, _) = digits_splits(seed)
        for method, weights in grids.items():
            best = None
            for w in weights:
                t0 = time.perf_counter()
                model = train_vae(x_pool, method=method, strength=w, steps=cfg.vae_steps, batch=cfg.vae_batch, seed=seed)
                row = {"method": method, "seed": seed, "strength": w, "val_elbo": heldout_elbo(model, x_val),
                       "seconds": time.perf_counter() - t0}
                if best is None or row["val_elbo"] > best["val_elbo"]:
                    best, best_model = row, model
            best["test_elbo"] = heldout_elbo(best_model, x_test)
            best["test_mmd"] = kernel_mmd(best_model, x_test, seed=seed)
            rows.append(best)
    summary = {"test_elbo": summarize_rows(rows, "test_elbo", baseline="vae"),
               "test_mmd": summarize_rows(rows, "test_mmd", baseline="vae")}
    log("generative done")
    return {"rows": rows, "summary": summary}


def summarize_rows(rows, key, baseline):
    methods = list(dict.fromkeys(r["method"] for r in rows))
    base = {r["seed"]: r[key] for r in rows if r["method"] == baseline}
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        out[m] = {**mean_ci95([r[key] for r in mine]),
                  "diff_vs_" + baseline: mean_ci95([r[key] - base[r["seed"]] for r in mine]),
                  "chosen_strengths": [r["strength"] for r in mine]}
    return out


def run_digits(cfg: StudyConfig, out_dir: Path) -> dict:
    """The sklearn-digits study: supervised, sweep, wall-clock, self-supervised, generative, pictures."""
    from bench.generalization.pictures import moons_boundaries, spline_curve_plot
    selected, tuning = run_supervised(cfg)
    sweep_rows, sweep_table = run_sweep(cfg)
    part = {"runs": selected, "tuning_runs": tuning, "sweep": {"rows": sweep_rows, "table": sweep_table},
            "wallclock": run_wallclock(cfg, selected), "self_supervised": run_self_supervised(cfg),
            "generative": run_generative(cfg)}
    part["pictures"] = {"moons": moons_boundaries(out_dir, cfg.moons_steps),
                        "spline_curve_discrepancy": spline_curve_plot(out_dir, cfg.moons_steps)}
    log("pictures done")
    return part


def run_study(cfg: StudyConfig, out_dir: Path, mode: str, workers: int = 1) -> dict:
    """Every study; with workers > 1 the studies run side by side in that many processes."""
    from bench.generalization.suite import add_studies, mnist_tasks, run_tasks
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # longest first, so that two workers finish together: gan, supervised MNIST, digits, ssl, vae
    tasks = mnist_tasks(cfg.mnist) if cfg.mnist else []
    tasks[2:2] = [("digits", run_digits, (cfg, out_dir))]
    if cfg.v3:  # evidence v3 at small size (the full v3 run is python -m bench.generalization.v3)
        from bench.generalization.v3 import run_v3
        tasks.insert(len(tasks) - 1 if cfg.mnist else len(tasks), ("v3", run_v3, (cfg.v3,)))
    parts = run_tasks(tasks, workers)
    digits, digits_cpu = parts.pop("digits")
    summary = summarize_supervised(digits["runs"], cfg)
    plot_supervised(summary, cfg, out_dir)
    plot_sweep(digits["sweep"]["table"], out_dir)
    result = {
        "dataset": "sklearn load_digits: 1797 real 8x8 handwritten digits, pixels/16; fixed test split of "
                   f"{data.TEST_SIZE}, per-seed validation split of {data.VAL_SIZE} (same label noise as "
                   "training), training sets drawn from the rest; make_moons for the pictures",
        "mode": mode,
        "config": asdict(cfg),
        "summary": summary,
        **digits,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": 1, "workers": workers, "machine": platform.machine()},
    }
    result["seconds_total"] = time.perf_counter() - t0
    result["cpu_seconds"] = {"digits": digits_cpu, **{k: c for k, (_, c) in parts.items()}}
    write_report(result, out_dir)
    add_studies(result, parts, out_dir, SUPERVISED_METHODS)
    write_json(result, out_dir / "generalization.json")
    log(f"wrote {out_dir}/generalization.json, report.md and plots in {result['seconds_total']:.0f} s "
        f"(CPU {sum(result['cpu_seconds'].values()):.0f} s)")
    return result


def resummarize(out_dir: Path) -> dict:
    """Recompute summary and report.md from the runs stored in out_dir/generalization.json
    (no training; used when the summary format changes)."""
    path = out_dir / "generalization.json"
    result = json.loads(path.read_text())
    cfg = StudyConfig(**result["config"])
    result["summary"] = summarize_supervised(result["runs"], cfg)
    from bench.generalization.suite import digits_entries
    grids = {m: g for m, g in cfg.grids.items() if m in SUPERVISED_METHODS}
    other = [e for e in result.get("studies", []) if e["name"] != "supervised_digits"]
    result["studies"] = digits_entries(result["runs"], grids, SUPERVISED_METHODS) + other
    write_json(result, path)
    write_report(result, out_dir)
    return result
