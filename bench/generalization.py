"""The DReS evidence study: does DReS generalize better than ERM, gradient penalty and mixup?

    python -m bench.generalization [--quick] [--out DIR]

Data: scikit-learn's load_digits (1,797 real 8x8 digits; ships with the package) and make_moons.
Every method's strength is chosen per seed on a validation split; the test split (597 fixed
digits) is only read to report. Intervals are two-sided 95% Student-t over seeds.
Writes DIR/generalization.json, DIR/report.md and PNG plots."""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench import gen_common as common
from bench.gen_common import corrupt_labels, digits_splits, mean_ci95
from bench.gen_regimes import heldout_elbo, kernel_mmd, linear_probe, train_simclr, train_vae
from bench.gen_supervised import MethodConfig, accuracy, seconds_per_step, train_classifier

SUPERVISED_METHODS = ["erm", "dres", "dres_decoded", "grad_penalty", "mixup"]


@dataclass
class StudyConfig:
    seeds: list
    train_sizes: list
    label_noise: list
    steps: int                       # optimizer steps per supervised run (same for every method)
    batch: int                       # K, the DReS batch
    grids: dict                      # method -> strengths tried on validation
    sweep_setting: list              # [(n_train, noise)] where DReS knobs are swept
    sweep_weights: list
    sweep_coded_ratios: list
    sweep_dof_fracs: list
    sweep_submodules: list
    wallclock_setting: list          # [n_train, noise]
    ssl_steps: int
    ssl_batch: int
    ssl_weights: list                # DReS weights tried (validation probe picks one)
    ssl_labels: int
    vae_steps: int
    vae_batch: int
    vae_dres_weights: list
    vae_gp_weights: list
    moons_steps: int
    timing_repeats: int = 5
    sweep_base: dict = field(default_factory=lambda: dict(strength=1.0, coded_ratio=1.0, dof_frac=0.75,
                                                          submodule="model"))


def quick_config() -> StudyConfig:
    return StudyConfig(
        seeds=[0, 1, 2], train_sizes=[100, 500], label_noise=[0.0, 0.3], steps=400, batch=50,
        grids={"erm": [0.0], "dres": [0.3, 1.0, 3.0], "dres_decoded": [0.25, 0.5],
               "grad_penalty": [0.01, 0.1, 1.0], "mixup": [0.2, 1.0]},
        sweep_setting=[(200, 0.0)], sweep_weights=[0.1, 0.3, 1.0, 3.0, 10.0],
        sweep_coded_ratios=[0.5, 1.0, 2.0, 4.0], sweep_dof_fracs=[0.25, 0.5, 0.75, 1.0],
        sweep_submodules=["model", "features", "head"], wallclock_setting=[200, 0.0],
        ssl_steps=300, ssl_batch=128, ssl_weights=[0.3, 3.0], ssl_labels=200,
        vae_steps=800, vae_batch=64, vae_dres_weights=[0.1, 1.0], vae_gp_weights=[0.001, 0.01],
        moons_steps=600)


def full_config() -> StudyConfig:
    return StudyConfig(
        seeds=list(range(10)), train_sizes=[100, 200, 500], label_noise=[0.0, 0.3], steps=400, batch=50,
        grids={"erm": [0.0], "dres": [0.1, 0.3, 1.0, 3.0, 10.0], "dres_decoded": [0.1, 0.25, 0.5],
               "grad_penalty": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "mixup": [0.1, 0.4, 1.0, 2.0]},
        sweep_setting=[(200, 0.0), (200, 0.3)], sweep_weights=[0.1, 0.3, 1.0, 3.0, 10.0],
        sweep_coded_ratios=[0.5, 1.0, 2.0, 4.0], sweep_dof_fracs=[0.25, 0.5, 0.75, 1.0],
        sweep_submodules=["model", "features", "head"], wallclock_setting=[200, 0.0],
        ssl_steps=400, ssl_batch=128, ssl_weights=[0.1, 0.3, 1.0, 3.0], ssl_labels=200,
        vae_steps=1000, vae_batch=64, vae_dres_weights=[0.01, 0.03, 0.1, 0.3, 1.0],
        vae_gp_weights=[0.0003, 0.001, 0.01], moons_steps=1000)


def smoke_config() -> StudyConfig:
    """Tiny end-to-end configuration for the CI smoke test (seconds, not minutes)."""
    return StudyConfig(
        seeds=[0, 1], train_sizes=[100], label_noise=[0.0], steps=10, batch=20,
        grids={"erm": [0.0], "dres": [1.0], "dres_decoded": [0.5], "grad_penalty": [0.1], "mixup": [0.4]},
        sweep_setting=[(100, 0.0)], sweep_weights=[1.0], sweep_coded_ratios=[2.0], sweep_dof_fracs=[0.5],
        sweep_submodules=["head"], wallclock_setting=[100, 0.0],
        ssl_steps=3, ssl_batch=32, ssl_weights=[1.0], ssl_labels=100,
        vae_steps=3, vae_batch=32, vae_dres_weights=[1.0], vae_gp_weights=[0.01], moons_steps=5,
        timing_repeats=1)


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
    for method in SUPERVISED_METHODS:
        per_seed = [np.mean([acc[method, s, n, z] for n, z in settings]) for s in cfg.seeds]
        per_seed_erm = [np.mean([acc["erm", s, n, z] for n, z in settings]) for s in cfg.seeds]
        entry = mean_ci95(per_seed)
        entry["diff_vs_erm"] = mean_ci95(np.subtract(per_seed, per_seed_erm))
        # paired (same seed, same data) difference to every other method, averaged over settings
        entry["paired_diff"] = {
            other: mean_ci95([np.mean([acc[method, s, n, z] - acc[other, s, n, z] for n, z in settings])
                              for s in cfg.seeds])
            for other in SUPERVISED_METHODS if other != method}
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


# ------------------------------------------------------------------ plots + report

def plot_supervised(summary, cfg, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(summary["erm"]["by_setting"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(SUPERVISED_METHODS)
    for i, m in enumerate(SUPERVISED_METHODS):
        d = [summary[m]["by_setting"][s]["diff_vs_erm"] for s in settings]
        means = np.array([e["mean"] for e in d]) * 100
        err = np.array([[e["mean"] - e["ci95"][0], e["ci95"][1] - e["mean"]] for e in d]).T * 100
        ax.bar(np.arange(len(settings)) + (i - 2) * width, means, width, yerr=err, capsize=2, label=m)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(settings)), settings)
    ax.set_ylabel("test accuracy - ERM (points)")
    ax.set_title(f"Digits, paired difference to ERM, 95% CI over {len(cfg.seeds)} seeds")
    ax.legend(fontsize=8, ncol=5)
    fig.tight_layout()
    fig.savefig(out_dir / "supervised_vs_erm.png", dpi=110)
    plt.close(fig)


def plot_sweep(table, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    knobs = ["weight", "N/K", "dof/count", "submodule"]
    settings = list(dict.fromkeys(r["setting"] for r in table))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), sharey=True)
    for ax, knob in zip(axes, knobs):
        for s in settings:
            rows = [r for r in table if r["knob"] == knob and r["setting"] == s]
            labels = [str(r["value"]) for r in rows]
            m = np.array([r["test_diff_vs_erm"]["mean"] for r in rows]) * 100
            lo = np.array([r["test_diff_vs_erm"]["ci95"][0] for r in rows]) * 100
            hi = np.array([r["test_diff_vs_erm"]["ci95"][1] for r in rows]) * 100
            ax.errorbar(np.arange(len(rows)), m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=s)
            ax.set_xticks(np.arange(len(rows)), labels)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"DReS {knob}")
    axes[0].set_ylabel("test acc - ERM (points)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "dres_sweep.png", dpi=110)
    plt.close(fig)


def fmt(e, scale=100.0, digits=1):
    return f"{e['mean'] * scale:.{digits}f} [{e['ci95'][0] * scale:.{digits}f}, {e['ci95'][1] * scale:.{digits}f}]"


def write_report(result, out_dir):
    cfg = result["config"]
    s = result["summary"]
    lines = [f"# DReS evidence ({result['mode']} run, {len(cfg['seeds'])} seeds)", "",
             f"Data: {result['dataset']}", "",
             "## Supervised: test accuracy (%) with 95% CI over seeds; strength tuned per seed on validation", ""]
    settings = list(s["erm"]["by_setting"])
    lines.append("| method | " + " | ".join(settings) + " | mean over settings | diff vs ERM |")
    lines.append("|---" * (len(settings) + 3) + "|")
    for m in SUPERVISED_METHODS:
        cells = [fmt(s[m]["by_setting"][k]) for k in settings]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt(s[m])} | {fmt(s[m]['diff_vs_erm'])} |")
    lines += ["", "Paired difference to ERM per setting (points, 95% CI):", ""]
    lines.append("| method | " + " | ".join(settings) + " |")
    lines.append("|---" * (len(settings) + 1) + "|")
    for m in SUPERVISED_METHODS[1:]:
        lines.append(f"| {m} | " + " | ".join(fmt(s[m]["by_setting"][k]["diff_vs_erm"]) for k in settings) + " |")
    lines += ["", "Paired difference of DReS to each baseline, averaged over settings (points, 95% CI):", "",
              "| dres minus | difference |", "|---|---|"]
    for other, e in s["dres"]["paired_diff"].items():
        lines.append(f"| {other} | {fmt(e)} |")
    lines += ["", "## DReS knob sweep (one factor at a time around weight 1, N/K 1, dof 0.75 K, whole model)", "",
              "| setting | knob | value | val acc | test acc | test - ERM |", "|---|---|---|---|---|---|"]
    for r in result["sweep"]["table"]:
        lines.append(f"| {r['setting']} | {r['knob']} | {r['value']} | {fmt(r['val'])} | {fmt(r['test'])} | "
                     f"{fmt(r['test_diff_vs_erm'])} |")
    wc = result["wallclock"]
    lines += ["", f"## Equal wall-clock ({wc['setting']}; budget {wc['budget_seconds']:.2f} s per run = DReS at "
              f"{cfg['steps']} steps)", "", "| method | ms/step | steps | test acc | test - ERM |", "|---|---|---|---|---|"]
    for m, e in wc["table"].items():
        lines.append(f"| {m} | {e['ms_per_step']:.2f} | {e['steps']} | {fmt(e['test'])} | {fmt(e['test_diff_vs_erm'])} |")
    ss = result["self_supervised"]["summary"]
    lines += ["", f"## Self-supervised: linear-probe test accuracy (%), {cfg['ssl_labels']} labels", "",
              "| method | test acc | diff vs SimCLR | chosen DReS weights |", "|---|---|---|---|"]
    for m, e in ss.items():
        lines.append(f"| {m} | {fmt(e)} | {fmt(e['diff_vs_simclr'])} | {e['chosen_strengths']} |")
    g = result["generative"]["summary"]
    lines += ["", "## Generative: VAE test ELBO (nats/digit, higher better) and kernel MMD^2 x1000 (lower better)", "",
              "| method | test ELBO | ELBO - VAE | MMD^2 x1e3 | MMD - VAE | chosen strengths |", "|---|---|---|---|---|---|"]
    for m in g["test_elbo"]:
        e, d = g["test_elbo"][m], g["test_mmd"][m]
        lines.append(f"| {m} | {fmt(e, 1, 2)} | {fmt(e['diff_vs_vae'], 1, 2)} | {fmt(d, 1e3, 2)} | "
                     f"{fmt(d['diff_vs_vae'], 1e3, 2)} | {e['chosen_strengths']} |")
    p = result["pictures"]
    lines += ["", "## Pictures", "", "![moons](moons_boundaries.png)", "", "![spline curve](spline_curve.png)", "",
              f"Moons (chosen on validation): {json.dumps(p['moons'])}", "",
              f"DReS discrepancy of the plotted output: {json.dumps(p['spline_curve_discrepancy'])}", "",
              f"Total time: {result['seconds_total']:.0f} s ({result['environment']['threads']} torch thread)"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def write_json(result: dict, path: Path) -> None:
    """Compact JSON with floats at 6 significant digits (the files are committed; keep them small)."""
    def rounded(obj):
        if isinstance(obj, float):
            return float(f"{obj:.6g}")
        if isinstance(obj, dict):
            return {k: rounded(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [rounded(v) for v in obj]
        return obj
    path.write_text(json.dumps(rounded(result), separators=(",", ":")) + "\n")


def run_study(cfg: StudyConfig, out_dir: Path, mode: str) -> dict:
    from bench.gen_pictures import moons_boundaries, spline_curve_plot
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    selected, tuning = run_supervised(cfg)
    summary = summarize_supervised(selected, cfg)
    sweep_rows, sweep_table = run_sweep(cfg)
    wallclock = run_wallclock(cfg, selected)
    ssl = run_self_supervised(cfg)
    gen = run_generative(cfg)
    pictures = {"moons": moons_boundaries(out_dir, cfg.moons_steps),
                "spline_curve_discrepancy": spline_curve_plot(out_dir, cfg.moons_steps)}
    log("pictures done")
    plot_supervised(summary, cfg, out_dir)
    plot_sweep(sweep_table, out_dir)
    result = {
        "dataset": "sklearn load_digits: 1797 real 8x8 handwritten digits, pixels/16; fixed test split of "
                   f"{common.TEST_SIZE}, per-seed validation split of {common.VAL_SIZE} (same label noise as "
                   "training), training sets drawn from the rest; make_moons for the pictures",
        "mode": mode,
        "config": asdict(cfg),
        "runs": selected,
        "summary": summary,
        "tuning_runs": tuning,
        "sweep": {"rows": sweep_rows, "table": sweep_table},
        "wallclock": wallclock,
        "self_supervised": ssl,
        "generative": gen,
        "pictures": pictures,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
        "seconds_total": time.perf_counter() - t0,
    }
    write_json(result, out_dir / "generalization.json")
    write_report(result, out_dir)
    log(f"wrote {out_dir}/generalization.json, report.md and plots in {result['seconds_total']:.0f} s")
    return result


def resummarize(out_dir: Path) -> dict:
    """Recompute summary and report.md from the runs stored in out_dir/generalization.json
    (no training; used when the summary format changes)."""
    path = out_dir / "generalization.json"
    result = json.loads(path.read_text())
    cfg = StudyConfig(**result["config"])
    result["summary"] = summarize_supervised(result["runs"], cfg)
    write_json(result, path)
    write_report(result, out_dir)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
