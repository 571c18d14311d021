"""Tables of evidence v3 (bench/generalization/v3.py), computed from its generalization.json alone:

    python -m bench.generalization.v3_tables DIR            # print every table
    python -m bench.generalization.v3_tables DIR --update    # rewrite README.md's and docs/EVIDENCE.md's blocks

``derived`` turns the "studies" entries into the figures the tables show (best method, DReS's rank, its
paired difference to the best other method, cost ratios, grid-edge hits, the options' verdicts); v3.py
stores it in generalization.json as "derived", so that every figure of a table is a number of that file.
``--update`` replaces README's table (from its header to its Source line) and, in docs/EVIDENCE.md, the text
between the ``<!-- v3:tables -->`` and ``<!-- /v3:tables -->`` markers."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

EQUAL_TIME = ("erm_at_dres", "ema_at_dres", "sam_at_dres", "erm_at_cheap", "sam_at_cheap")
SOURCE = "Source: `python -m bench.generalization.v3 --out docs/generalization_v3 --workers 1` → " \
         "docs/generalization_v3/generalization.json"
COST_METHODS = ["dres", "dres_cheap", "sam", "ema", "grad_penalty", "mixup", "manifold_mixup"]


def _sup(entries):
    return [e for e in entries if e["name"] == "v3_supervised"]


def _opt(entries):
    return [e for e in entries if e["name"] == "v3_options"]


def verdict(d) -> str:
    lo, hi = d["ci95"]
    return "ahead" if lo > 0 else "behind" if hi < 0 else "unresolved"


def derived(entries) -> dict:
    """when (per setting: best method, DReS's rank and paired differences), cost (ratios to ERM), edges
    (every grid-edge hit), counts (settings where DReS is resolved ahead of / behind a method) and
    options (each variant's verdict against default DReS per setting, and the families where it is ahead)."""
    out = {"when": [], "cost": [], "edges": [], "off": [], "off_by_method": {}, "counts": {}, "options": {}}
    for e in _sup(entries):
        methods = [m for m in e["summary"] if m not in EQUAL_TIME]
        ranked = sorted(methods, key=lambda m: -e["summary"][m]["mean"])
        best_other = next(m for m in ranked if m != "dres")
        out["when"].append({"setting": e["setting"], "family": e["family"], "arch": e["arch"],
                            "label_noise": e["label_noise"], "best": ranked[0], "best_acc": e["summary"][ranked[0]]["mean"],
                            "best_tied": [m for m in ranked if e["summary"][m]["mean"] == e["summary"][ranked[0]]["mean"]],
                            "dres_acc": e["summary"]["dres"]["mean"],
                            # competition rank: equal means share a rank (a method off in every seed is ERM)
                            "dres_rank": 1 + sum(e["summary"][m]["mean"] > e["summary"]["dres"]["mean"] for m in methods),
                            "n_methods": len(methods), "best_other": best_other,
                            "dres_minus_best_other": e["paired"][f"dres - {best_other}"]})
        ms, kib = e["run_ms_per_step"], e["memory_kib"]
        out["cost"].append({"setting": e["setting"], "erm_ms": ms["erm"], "erm_kib": kib["erm"],
                            "ms_x_erm": {m: ms[m] / ms["erm"] for m in ms},
                            "probe_ms_x_erm": {m: v / e["probe_ms_per_step"]["erm"] for m, v in e["probe_ms_per_step"].items()},
                            "kib_x_erm": {m: v / kib["erm"] for m, v in kib.items()}})
    for e in entries:
        for m, h in e.get("edge_hits", {}).items():
            low = h.get("low", 0)  # chosen over the grid plus off: no low edge ("off" is counted apart)
            if low or h["high"]:
                out["edges"].append({"study": e["name"], "setting": e["setting"], "method": m, "low": low,
                                     "high": h["high"], "n": h["n"], "grid": h["grid"],
                                     "most_seeds": max(low, h["high"]) > h["n"] / 2})
            if "off" in h:
                if h["off"]:
                    out["off"].append({"study": e["name"], "setting": e["setting"], "method": m, "off": h["off"],
                                       "n": h["n"], "most_seeds": h["off"] > h["n"] / 2})
                rec = out["off_by_method"].setdefault(m, {"seeds_off": 0, "seeds": 0, "settings_most_off": 0,
                                                          "settings": 0})
                rec["seeds_off"] += h["off"]
                rec["seeds"] += h["n"]
                rec["settings_most_off"] += h["off"] > h["n"] / 2
                rec["settings"] += 1
    keys = ["dres - erm", "dres - sam", "dres - ema", "dres - label_smoothing", "dres - grad_penalty",
            "dres - erm_at_dres", "dres - sam_at_dres", "dres - ema_at_dres", "dres_cheap - erm_at_cheap",
            "dres_cheap - sam_at_cheap", "sam - erm", "dres_cheap - erm"]
    for k in keys:
        got = [verdict(e["paired"][k]) for e in _sup(entries) if k in e["paired"]]
        out["counts"][k] = {v: got.count(v) for v in ("ahead", "behind", "unresolved")}
    for e in _opt(entries):
        for k, d in e["paired"].items():
            v = k.split(" - ")[0]
            if v == "dres_on_options_grid":
                continue
            rec = out["options"].setdefault(v, {"ahead": [], "behind": [], "unresolved": [], "families_ahead": []})
            rec[verdict(d)].append(e["setting"])
            if verdict(d) == "ahead" and e["family"] not in rec["families_ahead"]:
                rec["families_ahead"].append(e["family"])
    for rec in out["options"].values():
        rec["default_change_supported"] = len(rec["families_ahead"]) > 1 and not rec["behind"]
    return out


def ci(d, scale=100.0) -> str:
    return f"{d['mean'] * scale:+.1f} [{d['ci95'][0] * scale:+.1f}, {d['ci95'][1] * scale:+.1f}]"


def _model(family, arch) -> str:
    name = {"mnist": "MNIST-5k", "digits": "digits", "gunpoint": "GunPoint", "italy_power": "ItalyPowerDemand",
            "arrowhead": "ArrowHead"}.get(family, family)
    return f"{name} {arch.upper()}" if arch else f"{name} "


def readme_table(result) -> str:
    """One row per data family (README has room for few lines), each cell "CNN / MLP": clean and noisy
    settings side by side (best method and its accuracy, "a=b" where methods tie for best, DReS's rank,
    DReS minus the best other method), then the CPU time of a step and its memory (ERM's, and DReS's,
    dres_cheap's and SAM's as x ERM)."""
    der = result["derived"]
    cost = {c["setting"]: c for c in der["cost"]}
    families = list(dict.fromkeys(w["family"] for w in der["when"]))
    lines = ["| data (models) | clean: best (acc %) | DReS rank | DReS - best other (pp) | noisy: best (acc %) | "
             "DReS rank | DReS - best other (pp) | ERM ms/step | x ERM: DReS, N=K/2 every 4, SAM | ERM KiB/step | "
             "memory x ERM: DReS, SAM |", "|---" * 11 + "|"]
    for family in families:
        rows = [w for w in der["when"] if w["family"] == family]
        archs = list(dict.fromkeys(w["arch"] for w in rows))
        cells = [f"{_model(family, '')}({', '.join(a.upper() for a in archs)})".replace(" (", " (")]
        for noisy in (False, True):
            picked = [next((w for w in rows if w["arch"] == a and (w["label_noise"] > 0) == noisy), None) for a in archs]
            cells += [" / ".join("-" if w is None else f"{'='.join(w.get('best_tied') or [w['best']])} "
                                 f"({100 * w['best_acc']:.1f})" for w in picked),
                      " / ".join("-" if w is None else f"{w['dres_rank']} of {w['n_methods']}" for w in picked),
                      " / ".join("-" if w is None else f"{ci(w['dres_minus_best_other'])} vs {w['best_other']}"
                                 for w in picked)]
        costs = [cost[next(w for w in rows if w["arch"] == a)["setting"]] for a in archs]
        cells += [" / ".join(f"{c['erm_ms']:.2f}" for c in costs),
                  " / ".join(f"{c['ms_x_erm']['dres']:.2f}, {c['ms_x_erm']['dres_cheap']:.2f}, {c['ms_x_erm']['sam']:.2f}"
                             for c in costs),
                  " / ".join(f"{c['erm_kib']:.0f}" for c in costs),
                  " / ".join(f"{c['kib_x_erm']['dres']:.2f}, {c['kib_x_erm']['sam']:.2f}" for c in costs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", SOURCE])


README_TABLE = re.compile(r"\| data \(models\) \| clean: best.*?\n\nSource: [^\n]*", re.S)


def _setting_table(entries, header, cell) -> list:
    lines = ["| setting | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for e in entries:
        lines.append(f"| {e['setting']} | " + " | ".join(cell(e, h) for h in header) + " |")
    return lines + ["", SOURCE]


def accuracy_table(result) -> str:
    sup = _sup(result["studies"])
    methods = list(dict.fromkeys(m for e in sup for m in e["summary"] if m not in EQUAL_TIME))
    return "\n".join(_setting_table(sup, methods, lambda e, m: f"{100 * e['summary'][m]['mean']:.1f}"
                                    if m in e["summary"] else "-"))


def paired_table(result, keys) -> str:
    sup = _sup(result["studies"])
    return "\n".join(_setting_table(sup, keys, lambda e, k: ci(e["paired"][k]) if k in e["paired"] else "-"))


def steps_table(result) -> str:
    sup = _sup(result["studies"])
    names = list(EQUAL_TIME)
    return "\n".join(_setting_table(sup, ["steps"] + names, lambda e, k: str(e["steps"]) if k == "steps"
                                    else str(e["equal_time_steps"][k])))


def cost_table(result) -> str:
    der = result["derived"]
    lines = ["| setting | ERM ms/step | " + " | ".join(f"{m} x ERM" for m in COST_METHODS) + " | ERM KiB | "
             + " | ".join(f"{m} mem x ERM" for m in ("dres", "dres_cheap", "sam", "grad_penalty")) + " |",
             "|---" * (3 + len(COST_METHODS) + 4) + "|"]
    for c in der["cost"]:
        x, k = c["ms_x_erm"], c["kib_x_erm"]
        lines.append(f"| {c['setting']} | {c['erm_ms']:.2f} | " + " | ".join(f"{x[m]:.2f}" if m in x else "-" for m in COST_METHODS)
                     + f" | {c['erm_kib']:.0f} | " + " | ".join(f"{k[m]:.2f}" for m in ("dres", "dres_cheap", "sam", "grad_penalty"))
                     + " |")
    return "\n".join(lines + ["", SOURCE])


def options_table(result) -> str:
    opt = _opt(result["studies"])
    if not opt:
        return "(no options settings)"
    keys = list(opt[0]["paired"])
    lines = ["| variant - reference (pp) | " + " | ".join(e["setting"] for e in opt) + " | x ERM time (first) |",
             "|---" * (len(opt) + 2) + "|"]
    for k in keys:
        v = k.split(" - ")[0]
        x = opt[0]["run_ms_per_step"].get(v)
        ratio = f"{x / opt[0]['run_ms_per_step']['erm']:.2f}" if x else "-"
        lines.append(f"| {k} | " + " | ".join(ci(e["paired"][k]) for e in opt) + f" | {ratio} |")
    return "\n".join(lines + ["", SOURCE])


def counts_text(result) -> str:
    c = result["derived"]["counts"]
    return "; ".join(f"{k}: {v['ahead']} ahead / {v['behind']} behind / {v['unresolved']} unresolved" for k, v in c.items())


def _edge(e) -> str:
    return f"{e['setting']} {e['method']} " + (f"{e['low']} low / " if e["low"] else "") + f"{e['high']} high of {e['n']}"


def edges_text(result) -> str:
    edges = result["derived"]["edges"]
    if not edges:
        return "No chosen strength sat at a grid edge."
    most = [e for e in edges if e["most_seeds"]]
    return (f"Grid-edge hits ({len(edges)} method-settings with at least one seed at an edge, {len(most)} with "
            f"most seeds there: " + (", ".join(f"{e['setting']} {e['method']}" for e in most) or "none") + "): "
            + "; ".join(_edge(e) for e in edges))


def off_text(result) -> str:
    """Choices of off (strength 0: the seed's ERM run), per method over all settings, then per setting."""
    der = result["derived"]
    if not der.get("off_by_method"):
        return "Strengths were chosen on the grids alone (no off)."
    per = "; ".join(f"{m} {r['seeds_off']} of {r['seeds']} seeds (most seeds in {r['settings_most_off']} of "
                    f"{r['settings']} settings)" for m, r in der["off_by_method"].items())
    where = "; ".join(f"{o['setting']} {o['method']} {o['off']} of {o['n']}" for o in der["off"])
    return ("Off chosen (strength 0, the seed's ERM run; the weak end of every grid, never extended, not an edge): "
            + per + ". Per setting: " + (where or "none") + ".")


def options_text(result) -> str:
    rows = []
    for v, rec in result["derived"]["options"].items():
        rows.append(f"{v}: ahead in {rec['ahead'] or 'none'}, behind in {rec['behind'] or 'none'}"
                    + (" (default change supported)" if rec["default_change_supported"] else ""))
    return "; ".join(rows)


def report_tables(result) -> str:
    if "derived" not in result:
        from bench.generalization.v3 import V3Config  # noqa: F401  (older files: recompute)
        result["derived"] = derived(result["studies"])
    return "\n".join([
        "### When to pick DReS (equal steps; best of the equal-step methods, DReS's rank among them)", "",
        readme_table(result), "",
        "### Test accuracy (%) at equal steps, mean over seeds", "", accuracy_table(result), "",
        "### Paired differences at equal steps (percentage points, 95% CI)", "",
        paired_table(result, ["dres - erm", "dres - sam", "dres - ema", "sam - erm", "ema - erm", "dres_cheap - erm",
                              "dres - dres_cheap"]), "",
        "### Equal wall-clock time (paired differences, pp)", "",
        "DReS (N = K) and SAM both cost about 2x ERM; `erm_at_dres`, `ema_at_dres`, `sam_at_dres` get the steps "
        "that DReS's steps cost, `erm_at_cheap` and `sam_at_cheap` those of `dres_cheap` (N = K/2, every=4).", "",
        paired_table(result, ["dres - erm_at_dres", "dres - sam_at_dres", "dres - ema_at_dres",
                              "dres_cheap - erm_at_cheap", "dres_cheap - sam_at_cheap"]), "",
        "Steps per run:", "", steps_table(result), "",
        "### Cost per step (CPU, one torch thread; median over the training runs) and step memory", "",
        cost_table(result), "",
        "### DReS options on CNNs (each variant minus default DReS tuned on the same grid, pp)", "",
        options_table(result), "", "Verdicts: " + options_text(result), "",
        "### Counts over settings", "", counts_text(result), "", "### Grid edges and off",
        "", "Every tuned method chose its strength on validation from its grid plus off (strength 0, the seed's "
        "ERM run); ties go to the weaker strength, so a tie with ERM picks off.", "", edges_text(result), "",
        off_text(result)])


def update_blocks(text: str, blocks: dict) -> str:
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- v3:{name} -->\n).*?(\n<!-- /v3:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no <!-- v3:{name} --> block")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    result = json.loads((Path(argv[0]) / "generalization.json").read_text())
    if "--update" not in argv:
        print(report_tables(result))
        return
    root = Path(__file__).resolve().parents[2]
    readme = root / "README.md"  # no markers there (README's line budget): the table and its Source line
    text, n = README_TABLE.subn(lambda m: readme_table(result), readme.read_text())
    if n != 1:
        raise ValueError(f"README.md: {n} evidence v3 tables found, expected 1")
    readme.write_text(text)
    evidence = root / "docs" / "EVIDENCE.md"
    evidence.write_text(update_blocks(evidence.read_text(), {"tables": report_tables(result)}))


if __name__ == "__main__":
    main()
