"""Smoke test of the benchmark harness (bench/): a seconds-long run writes results.json with the
documented keys, and every baseline produces a finite loss and finite gradients. Nothing is timed
against a threshold here; timings belong to `python -m bench`."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed; it lives next to tests/
    sys.path.insert(0, str(ROOT))

from bench import baselines  # noqa: E402
from bench.models import build_model, input_shape  # noqa: E402

TINY = {"mlp": {"hidden": 8}, "cnn": {"width": 4}, "transformer": {"tokens": 4, "dim": 8, "heads": 2}}
# The CPU flash-attention kernel has no double backward; the harness records this as a result.
NO_DOUBLE_BACKWARD = {"grad_penalty", "jacobian", "lazy_grad_penalty"}


@pytest.mark.slow  # runs every section of python -m bench at smoke size (about 30 s)
def test_harness_smoke_writes_results(tmp_path):
    from bench.__main__ import main

    threads = torch.get_num_threads()
    try:
        main(["--smoke", "--threads", "1", "--models", "transformer", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"device", "torch", "kernels", "steps"} <= results.keys()
    assert results["device"] == "cpu" and results["torch"] == torch.__version__

    kernel_ops = {row["op"] for row in results["kernels"]}
    assert kernel_ops == {"spline_mix", "reconstruction_loss"}
    for row in results["kernels"]:
        assert {"op", "backend", "K", "N", "d", "dtype", "ms", "floor_ms"} <= row.keys()
        assert row["ms"] is not None and row["ms"] > 0, row
        assert row["floor_ms"] > 0

    rows = results["steps"]
    assert {r["method"] for r in rows} == {m.name for m in baselines.all_methods()}
    assert {r.get("num_coded_ratio") for r in rows if r["method"] == "dres"} == {0.5, 1.0, 2.0}
    for row in rows:
        assert {"method", "model", "batch", "ms", "peak_mem_mb"} <= row.keys()
        if row["method"] in NO_DOUBLE_BACKWARD:
            assert row["ms"] is None and "derivative" in row["error"]
        else:
            assert row["ms"] > 0 and row["peak_mem_mb"] is not None, row
    for name in ("summary.md", "kernels.png", "steps.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("model_name", sorted(TINY))
def test_baselines_finite_loss_and_gradients(model_name):
    x = torch.randn(6, *input_shape(model_name, TINY[model_name]))
    target = torch.randint(0, 10, (6,))
    for method in baselines.all_methods():
        torch.manual_seed(0)
        model = method.prepare(build_model(model_name, TINY[model_name]))
        for step in (0, 1):  # 0: the lazy penalty step, 1: a plain one
            model.zero_grad(set_to_none=True)
            try:
                loss = method.loss(model, x, target, step)
                loss.backward()
            except RuntimeError as exc:
                if model_name == "transformer" and method.name in NO_DOUBLE_BACKWARD and "derivative" in str(exc):
                    break
                raise
            assert loss.dim() == 0 and math.isfinite(loss.item()), (method.key, loss)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads, method.key
            assert all(torch.isfinite(g).all() for g in grads), method.key


def test_memory_helper_leaves_nothing_frozen():
    """The memory helper freezes the gc before forking its children. Objects still frozen at exit are
    never freed, and nanobind (Triton's bindings) then prints ~40 lines of `nanobind: leaked ...` at the
    end of `python -m bench`: the helper must unfreeze once its children are done."""
    import gc

    from bench import memory

    emitted = []
    memory.serve({"target": "bench.steps:measure_memory", "tasks": []}, emitted.append)
    assert emitted == [] and gc.get_freeze_count() == 0


def test_memory_helper_exits_without_nanobind_leak_reports():
    """The helper process as `python -m bench` starts it: its stderr carries no leak report."""
    import subprocess

    request = json.dumps({"target": "bench.steps:measure_memory", "tasks": [], "preload": ["dres_fast"]})
    proc = subprocess.run([sys.executable, "-m", "bench.memory"], input=request + "\n", cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "leaked" not in proc.stderr, proc.stderr[-2000:]


def _kernel_row(ms, floor_ms, backend="torch"):
    return {"op": "spline_mix", "backend": backend, "K": 64, "N": 64, "d": 16384, "dtype": "float32",
            "ms": ms, "floor_ms": floor_ms}


def _results(kernels, weights=()):
    return {"device": "cpu", "device_name": "CPU: test", "torch": torch.__version__, "threads": 1,
            "mode": "smoke", "wall_s": 1.0, "rates": {"copy_GBps": 1.0}, "kernels": kernels,
            "steps": [], "targets": {}, "platform": "test", "cpu_count": 2, "python": "3",
            "started": "now", "command": "python -m bench", "weights": list(weights)}


def test_kernel_time_below_floor_is_a_measurement_problem(tmp_path):
    """A kernel faster than its floor means the measured rates are not the machine's peak: the
    report says so instead of printing a ratio under 1 as if it were a result."""
    from bench import report

    results = _results([_kernel_row(0.35, 0.5), _kernel_row(2.5, 1.0, backend="torch_compile")])
    text = report.console_table(results)
    report.write_summary(results, str(tmp_path), [])
    summary = (tmp_path / "summary.md").read_text()
    for out in (text, summary):
        assert "0.70" not in out and "BELOW FLOOR" in out  # 0.35 ms against a 0.5 ms floor and "measurement problem" in out.lower()
        assert "2.50" in out  # a row above its floor keeps its ratio
    problems = report.floor_problems(results["kernels"])
    assert len(problems) == 1 and "0.350 ms" in problems[0] and "floor 0.500 ms" in problems[0]


def test_num_coded_floor_matches_the_library():
    """N = round(ratio K) is raised to 3, the library's minimum, for the step benchmark and the study."""
    import dres_fast
    from bench.generalization.supervised import MethodConfig, make_loss_fn, make_mlp

    assert baselines.MIN_NUM_CODED == 3
    assert [baselines.num_coded_for(r, 10) for r in (0.1, 0.25, 0.5, 2.0)] == [3, 3, 5, 20]
    torch.manual_seed(0)
    model = make_mlp(in_dim=64, hidden=8)
    x, target = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for method in ("dres", "dres_decoded"):  # round(0.25 * 8) = 2 < 3: the library would reject it
        loss = make_loss_fn(MethodConfig(method, 0.5, coded_ratio=0.25))
        assert math.isfinite(loss(model, x, target, 0).item())
    with pytest.raises(ValueError, match="num_coded"):
        dres_fast.dres_loss(model, x, num_coded=2)


def test_weights_section_reports_the_setup_rows(tmp_path):
    """`python -m bench` measures the weight set-up (bench/weights_setup.py) in one place and reports its
    rows in the console table and summary.md; the full run spans K = 64 .. 8192."""
    from bench import report
    from bench.__main__ import WEIGHT_SETUP_SIZES, run_weights_section

    rows = run_weights_section("smoke")
    assert [r["K"] for r in rows] == WEIGHT_SETUP_SIZES["smoke"] and all(r["K"] == r["N"] for r in rows)
    assert all(r["total_s"] > 0 and r["total_s"] >= r["weights_s"] for r in rows)
    assert WEIGHT_SETUP_SIZES["full"][0] == 64 and WEIGHT_SETUP_SIZES["full"][-1] == 8192
    results = _results([_kernel_row(2.0, 1.0)], weights=rows)
    report.write_summary(results, str(tmp_path), [])
    last = rows[-1]
    expected = f"| {last['K']} | {last['N']} | {last['dof_search_s']:.3f} | {last['weights_s']:.3f} | {last['total_s']:.3f} |"
    assert expected in (tmp_path / "summary.md").read_text()
    assert f"{last['total_s']:.3f}" in report.console_table(results)


@pytest.mark.slow  # starts a fresh interpreter (about 4 s)
def test_cold_start_times_a_fresh_process(tmp_path):
    from bench import cold_start

    out = tmp_path / "cold.json"
    cold_start.main(["--out", str(out), "--timeout", "120"])
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    assert row["resolved_backend"] == "torch" and row["model"] == "mlp"
    for key in ("import_torch_s", "import_dres_s", "first_step_s", "second_step_s"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert "first step" in cold_start.format_rows([row]) and "error: boom" in cold_start.format_rows(
        [{"backend": "triton", "dtype": "float32", "error": "boom"}])


def test_call_overhead_times_every_road():
    from bench import call_overhead

    result = call_overhead.measure("cpu", calls=3, rounds=1)
    roads = [row["road"] for row in result["rows"]]
    assert roads[:2] == ["torch/eager", "torch/registered"] and roads[-1] == "plain"
    assert all(math.isfinite(row["us_per_call"]) and row["us_per_call"] > 0 for row in result["rows"])
    assert "cProfile of torch/eager" in result["profile"]
    assert "torch/registered" in call_overhead.format_rows(result["rows"])


def test_call_overhead_steps_count_project_calls_and_aten_ops():
    """The step rows: every case timed against its hand-written base, the project's Python counted (the
    hand-written plain torch step calls none of it), and aten ops counted."""
    from bench import call_overhead

    rows = call_overhead.measure_steps("cpu", calls=2, rounds=1)
    cases = {(r["K"], r["case"]): r for r in rows}
    for K, _ in call_overhead.STEP_SHAPES:
        assert cases[(K, "plain torch")]["project_calls"] == 0
        assert cases[(K, "dres_loss")]["project_calls"] > 5
        assert cases[(K, "plain torch")]["aten_ops"] > 20
        assert cases[(K, "SubmoduleDReS concat")]["baseline"] == "dres_loss on the block"
    assert all(math.isfinite(r["x_baseline"]) and r["us"] > 0 for r in rows)
    assert "SubmoduleDReS separate" in call_overhead.format_step_rows(rows)


def test_banded_bench_smoke_row():
    """bench/banded.py at smoke size: both paths timed, floors positive, the table names every row; and the
    CPU grid trims by memory and flops (never silently: each left-out row has its reason)."""
    from bench import banded

    result = banded.run_banded("cpu", "smoke")
    (row,) = result["rows"]
    assert row["dense_ms"] > 0 and row["banded_ms"] > 0 and row["banded_floor_ms"] > 0
    assert row["dense_floor_ms"] >= row["banded_floor_ms"]
    assert row["auto"] in ("dense", "banded") and "| 64 | 256 | float32 |" in banded.table(result)
    rows, skipped = banded.cases("cpu", "quick")
    assert (1024, 4096, True, torch.float32) in rows and any("(dense)" in key for key in skipped)
    assert all((k * d <= banded.CPU_LIMITS["quick"][0]) for k, d, _, _ in rows)
    # the other dtypes' rows around auto's boundary, dense always run (small shapes)
    assert {(k, d) for k, d, dense, dtype in rows if dtype == torch.float64 and dense} == set(banded.DTYPE_ROWS[torch.float64])
    gpu_rows, _ = banded.cases("cuda", "full")
    assert {(k, d) for k, d, _, _ in gpu_rows} >= set(banded.GRID)
    assert {dtype for _, _, _, dtype in gpu_rows} == {torch.float32}
