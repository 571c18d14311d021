"""Turn a results dict into the printed table, summary.md and PNG plots."""
from __future__ import annotations

import os

CPU_TARGET_DRES_VS_GP = 0.9   # issue 5: DReS (N = K) step <= 0.9x a grad_penalty step on the CPU CNN
GPU_TARGET_SPLINE_SHARE = 0.03  # issue 5: spline ops < 3% of a DReS step on a GPU


def targets(results: dict) -> dict:
    """The issue's targets, recorded (never asserted) from this run's rows."""
    steps = results["steps"]
    out = {}
    if not results["device"].startswith("cuda"):
        ms = {r["key"]: r.get("ms") for r in steps if r["model"] == "cnn"}
        if ms.get("dres") and ms.get("grad_penalty"):
            ratio = ms["dres"] / ms["grad_penalty"]
            out["cpu_cnn_dres_over_grad_penalty"] = {
                "value": ratio, "target": f"<= {CPU_TARGET_DRES_VS_GP}", "met": ratio <= CPU_TARGET_DRES_VS_GP}
    else:
        for item in results.get("spline_share", []):
            out[f"gpu_{item['model']}_spline_share"] = {
                "value": item["share"], "target": f"< {GPU_TARGET_SPLINE_SHARE}",
                "met": item["share"] < GPU_TARGET_SPLINE_SHARE}
    return out


def _fmt_ms(row) -> str:
    if row is None:
        return "-"
    if row.get("ms") is None:
        return "failed"
    rel = f" ({row['x_erm']:.2f}x)" if row.get("x_erm") is not None else ""
    return f"{row['ms']:.1f}{rel}"


def _fmt_mem(row) -> str:
    if row is None or row.get("peak_mem_mb") is None:
        return "-"
    return f"{row['peak_mem_mb']:.1f}"


def grid(head: list[str], body: list[list[str]], markdown: bool = False, left=(0,)) -> str:
    """A table as markdown, or as aligned text (columns in ``left`` flush left, the rest right)."""
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    text = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([text(head), "-" * len(text(head))] + [text(cells) for cells in body])


def steps_table(rows: list[dict], markdown: bool = False) -> str:
    """Methods down, models across: step ms (x ERM) and peak step memory in MB."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    keys = list(dict.fromkeys(r["key"] for r in rows))
    cell = {(r["model"], r["key"]): r for r in rows}
    batch = {r["model"]: r["batch"] for r in rows}
    head = ["method"] + [f"{m} (B={batch[m]}) ms" for m in models] + [f"{m} MB" for m in models]
    body = [[k] + [_fmt_ms(cell.get((m, k))) for m in models] + [_fmt_mem(cell.get((m, k))) for m in models]
            for k in keys]
    return grid(head, body, markdown)


def below_floor(row: dict) -> bool:
    """A time under its floor cannot be a speed-up: the floor uses this run's measured bandwidth and
    matmul rate, so a kernel beating it means those rates (or this timing) are not trustworthy."""
    return row.get("ms") is not None and row["ms"] < row["floor_ms"]


def _x_floor(row: dict) -> str:
    if row.get("ms") is None:
        return "-"
    return "BELOW FLOOR" if below_floor(row) else f"{row['ms'] / row['floor_ms']:.2f}"


def floor_problems(rows: list[dict]) -> list[str]:
    """One line per kernel row timed under its floor, saying why it is a measurement problem."""
    return [f"{r['op']} {r['backend']} K={r['K']} N={r['N']} d={r['d']} {r['dtype']}: {r['ms']:.3f} ms is under "
            f"its floor {r['floor_ms']:.3f} ms; the measured copy bandwidth or matmul rate is below this "
            "machine's peak (or the timer is off), so this row's x floor is not a result"
            for r in rows if below_floor(r)]


def kernel_table(rows: list[dict], markdown: bool = False) -> str:
    """One line per kernel row: time, floor and time / floor ("BELOW FLOOR" when under 1)."""
    head = ["op", "backend", "K", "N", "d", "dtype", "ms", "floor ms", "x floor"]
    body = [[r["op"], r["backend"], str(r["K"]), str(r["N"]), str(r["d"]), r["dtype"],
             f"{r['ms']:.3f}" if r.get("ms") is not None else "failed", f"{r['floor_ms']:.3f}", _x_floor(r)]
            for r in rows]
    if markdown:
        return grid(head, body, markdown=True)
    lines = grid(head, body, left=(0, 1, 5)).split("\n")
    out = lines[:2]
    for row, line in zip(rows, lines[2:]):  # a failure's error under its row
        out.append(line)
        if row.get("error"):
            out.append(f"    error: {row['error'][:150]}")
    return "\n".join(out)


def weights_table(rows: list[dict], markdown: bool = False) -> str:
    """Weight set-up rows (bench/weights_setup.py): the time and memory to build E and D."""
    head = ["K", "N", "dof search s", "weights s", "total s", "CPU s", "peak MiB"]
    body = [[str(r["K"]), str(r["N"]), f"{r['dof_search_s']:.3f}", f"{r['weights_s']:.3f}", f"{r['total_s']:.3f}",
             f"{r['cpu_s']:.3f}", "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"] for r in rows]
    return grid(head, body, markdown, left=())


def host_table(rows: list[dict], markdown: bool = False) -> str:
    """Host cost of a small-d DReS step (bench/call_overhead.py ``measure_steps``)."""
    head = ["K", "d", "case", "us per step", "x base", "project calls", "aten ops", "base"]
    body = [[str(r["K"]), str(r["d"]), r["case"], f"{r['us']:.1f}", f"{r['x_baseline']:.2f}", str(r["project_calls"]),
             str(r["aten_ops"]), r["baseline"]] for r in rows]
    return grid(head, body, markdown, left=(2, 7))


def errors(rows: list[dict]) -> list[str]:
    return [f"{r['model']}/{r['key']}: {r['error']}" for r in rows if r.get("error")] + \
           [f"{r['model']}/{r['key']} (memory): {r['mem_error']}" for r in rows if r.get("mem_error")]


def console_table(results: dict) -> str:
    rates = "  ".join(f"{k} {v:.3g}" for k, v in results["rates"].items())
    parts = [f"device {results['device_name']} | torch {results['torch']} | {results['threads']} threads | "
             f"mode {results['mode']} | {results['wall_s']:.0f} s",
             f"threads: {results.get('threads_note', '')}",
             f"measured rates: {rates}", "", "kernels (forward + backward):",
             kernel_table(results["kernels"])]
    for backend, why in results.get("kernels_skipped", {}).items():
        parts.append(f"  not timed: {backend}: {why}")
    problems = floor_problems(results["kernels"])
    if problems:
        parts += ["measurement problems (kernel times under their floor):"] + [f"  {p}" for p in problems]
    if results.get("weights"):
        parts += ["", "weight set-up (encoder and decoder, first call):", weights_table(results["weights"])]
    if results.get("banded"):
        from bench.banded import table as banded_table

        parts += ["", "dense vs banded spline path, fp32 forward + backward of both ops (bench/banded.py):",
                  banded_table(results["banded"])]
    if results.get("host"):
        parts += ["", "host cost of a small-d DReS step, forward + backward (bench/call_overhead.py):",
                  host_table(results["host"])]
    parts += ["", "training steps: median ms per step (x ERM) | peak step memory MB:",
              steps_table(results["steps"])]
    errs = errors(results["steps"])
    if errs:
        parts += ["failures (recorded as results):"] + [f"  {e}" for e in errs]
    if results.get("spline_share"):
        parts.append("spline ops (timed alone at the step's shapes) / DReS N=K step: " +
                     ", ".join(f"{s['model']} {100 * s['share']:.1f}%" for s in results["spline_share"]))
    for name, t in results["targets"].items():
        parts.append(f"target {name}: {t['value']:.3f} (target {t['target']}: {'met' if t['met'] else 'NOT met'})")
    return "\n".join(parts)


def write_summary(results: dict, out_dir: str, plots: list[str]) -> str:
    path = os.path.join(out_dir, "summary.md")
    lines = [
        "# dres_fast benchmark summary", "",
        f"- machine: {results['device_name']} ({results['platform']}, {results['cpu_count']} CPUs visible, "
        f"{results['threads']} torch threads: {results.get('threads_note', '')})",
        f"- torch {results['torch']}, python {results['python']}, mode `{results['mode']}`, "
        f"run took {results['wall_s']:.0f} s, started {results['started']}",
        f"- command: `{results['command']}`",
        "- measured rates: " + ", ".join(f"{k} {v:.3g}" for k, v in results["rates"].items()), "",
        "## Kernels (forward + backward)", "",
        "floor = max(bytes / copy bandwidth, flops / matmul rate), both measured in this run.", "",
        kernel_table(results["kernels"], markdown=True), "",
    ]
    for backend, why in results.get("kernels_skipped", {}).items():
        lines.append(f"- not timed: `{backend}`: {why}")
    problems = floor_problems(results["kernels"])
    if problems:
        lines += ["", "**Measurement problems**: kernel times under their floor (BELOW FLOOR above):", ""]
        lines += [f"- {p}" for p in problems]
    if results.get("weights"):
        lines += ["", "## Weight set-up (encoder and decoder, first call)", "",
                  weights_table(results["weights"], markdown=True)]
    if results.get("banded"):
        from bench.banded import table as banded_table

        lines += ["", "## Dense vs banded spline path (forward + backward of both ops, float32)", "",
                  "dense floor = max(bytes / copy bandwidth, 8 K N d / fp32 matmul rate); banded floor = bytes "
                  "(each tensor read or written once); auto = the path `choose` takes (dres_fast/ops/banded.py). "
                  "Interleaved rounds, medians.", "", banded_table(results["banded"], markdown=True)]
        lines += [f"- left out: {row}: {why}" for row, why in results["banded"]["skipped"].items()]
    if results.get("host"):
        lines += ["", "## Host cost of a small-d DReS step (forward + backward)", "",
                  "An MLP 16 -> 64 -> d on K samples, backend torch; `x base` = time relative to the same step "
                  "written by hand (`base`); project calls = calls into this repository's Python per step "
                  "(cProfile); aten ops per step (a dispatch mode). Interleaved rounds, medians.", "",
                  host_table(results["host"], markdown=True)]
    lines += ["", "## Training steps", "",
              "One step = forward, backward, optimizer step; median over interleaved rounds. "
              "`x` = relative to ERM on the same model. MB = peak memory of a step beyond the memory held "
              f"between steps ({results['steps'][0].get('mem_method', 'n/a') if results['steps'] else 'n/a'}).", "",
              steps_table(results["steps"], markdown=True), ""]
    errs = errors(results["steps"])
    if errs:
        lines += ["Failures (recorded as results, not crashes):", ""] + [f"- {e}" for e in errs] + [""]
    if results["targets"]:
        lines += ["## Targets (recorded, not asserted)", ""]
        for name, t in results["targets"].items():
            lines.append(f"- {name}: {t['value']:.3f} (target {t['target']}: {'met' if t['met'] else 'not met'})")
        lines.append("")
    if results.get("spline_share"):
        lines += ["Spline ops (timed alone at the step's shapes) as a share of a DReS N = K step: " +
                  ", ".join(f"{s['model']} {100 * s['share']:.2f}%" for s in results["spline_share"]), ""]
    for plot in plots:
        lines.append(f"![{plot}]({plot})")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def write_plots(results: dict, out_dir: str) -> list[str]:
    """kernels.png (time / floor per row) and steps.png (step time and memory per method, per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    krows = [r for r in results["kernels"] if r.get("ms") is not None]
    if krows:
        fig, ax = plt.subplots(figsize=(9, 0.28 * len(krows) + 1.5))
        labels = [f"{r['op']} {r['backend']} K{r['K']} N{r['N']} d{r['d']} {r['dtype']}" for r in krows]
        # red: under the floor, a measurement problem rather than a speed-up (see floor_problems)
        ax.barh(range(len(krows)), [r["ms"] / r["floor_ms"] for r in krows],
                color=["tab:red" if below_floor(r) else "tab:blue" for r in krows])
        ax.set_yticks(range(len(krows)), labels, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("time / floor (1 = at the measured floor; red: under it, a measurement problem)")
        ax.set_title(f"kernels, forward + backward ({results['device_name']})")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "kernels.png"), dpi=110)
        plt.close(fig)
        written.append("kernels.png")

    rows = results["steps"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if models:
        keys = list(dict.fromkeys(r["key"] for r in rows))
        cell = {(r["model"], r["key"]): r for r in rows}
        fig, axes = plt.subplots(2, len(models), figsize=(4 * len(models), 7), squeeze=False)
        for j, model in enumerate(models):
            for i, (field, label) in enumerate((("x_erm", "step time / ERM"), ("peak_mem_mb", "peak step MB"))):
                ax = axes[i][j]
                vals = [(cell.get((model, k)) or {}).get(field) for k in keys]
                ax.barh(range(len(keys)), [v if v is not None else 0 for v in vals],
                        color=["tab:orange" if k.startswith("dres") else "tab:gray" for k in keys])
                for y, v in enumerate(vals):
                    if v is None:
                        ax.text(0, y, " failed", va="center", fontsize=7, color="red")
                ax.set_yticks(range(len(keys)), keys if j == 0 else [""] * len(keys), fontsize=7)
                ax.invert_yaxis()
                ax.set_xlabel(label)
                if i == 0:
                    ax.set_title(f"{model} (B={cell[(model, keys[0])]['batch']})")
                    ax.axvline(1.0, color="k", lw=0.8)
        fig.suptitle(f"training step per method ({results['device_name']})")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "steps.png"), dpi=110)
        plt.close(fig)
        written.append("steps.png")
    return written
