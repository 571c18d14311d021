"""bench/gpu_check.sh without a GPU: its plan fits the budget, and a kill after any step keeps what finished.

The script runs with a fake Python (``GPU_CHECK_PY``, a small bash script): every step "runs" it instantly,
it writes whatever ``--out`` / ``--junitxml`` file it is given, and the step named by ``FAKE_HANG_STEP``
prints a line and then sleeps. The test then kills the script's whole process group, as the remote runner
does at its time limit, and checks what ``$OUT`` holds. The bench.kernels row order is checked here too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

#: the test files the tests step runs, read from the script (one pytest process each without xdist)
TEST_FILES = re.search(r'TEST_FILES="([^"]*)"', (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh")
                       .read_text()).group(1).split()

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
DEFAULT_PLAN = ["probe", "deps", "install", "build", "tests", "kernels", "overhead", "cold", "compile"]
ALL_PLAN = ["probe", "deps", "install", "build", "cpp", "tests", "kernels", "banded", "dots", "overhead", "cold",
            "steps", "compile"]
# Files each step leaves: in $OUT itself, or in the logs archive (besides <step>.log).
OUT_FILES = {"kernels": "kernels.json", "banded": "banded.json", "cold": "cold.json", "compile": "compile.json"}
ARCHIVE_FILES = {"overhead": "overhead.json", "dots": "dots.json", "steps": "bench/results.json"}
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

FAKE_PYTHON = r"""#!/usr/bin/env bash
# A stand-in for python in bench/gpu_check.sh's steps: no work, the files the step asks for, markers.
step="${GPU_CHECK_STEP:-none}"
echo "fake ran $step: $*" >&2
[ "${1:-}" = - ] && cat >/dev/null
if [ "$step" = probe ]; then
    if [ -n "${FAKE_NO_GPU:-}" ]; then echo "no GPU: torch.cuda.is_available() is False"; exit 3; fi
    echo "gpu: FakeGPU 80GB | torch 0.0 (CUDA 0.0) | triton 0.0 | nvcc none"
fi
case "$*" in *"import xdist"*) [ -z "${FAKE_NO_XDIST:-}" ] || exit 1 ;; esac
prev=""
for a in "$@"; do
    case "$a" in --junitxml=*) echo "<testsuites/>" > "${a#--junitxml=}" ;; esac
    if [ "$prev" = --out ]; then
        if [ "$step" = steps ]; then mkdir -p "$a" && echo "{}" > "$a/results.json"
        else echo "{\"fake\": \"$step\"}" > "$a"; fi
    fi
    prev="$a"
done
case "$*" in *"import xdist"*) exit 0 ;; esac  # a check, not the step's work: never the one that hangs
if [ "$step" = "${FAKE_HANG_STEP:-}" ]; then
    echo "$$" > "$FAKE_MARKERS/$step.pid"
    exec sleep 60
fi
echo "fake done $step" >&2
"""


def _env(tmp_path: Path, **extra: str) -> dict:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        fake = bin_dir / "python"
        fake.write_text(FAKE_PYTHON)
        fake.chmod(0o755)
        nvcc = bin_dir / "nvcc"  # the build step then runs (through the fake) instead of skipping
        nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, fake'\n")
        nvcc.chmod(0o755)
        (tmp_path / "markers").mkdir()
        (tmp_path / "out").mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPU_CHECK", "CAP_", "FAKE_")) and k not in ("OUT", "STEPS", "PYTHON")}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", GPU_CHECK_PY=str(bin_dir / "python"),
               OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), FAKE_MARKERS=str(tmp_path / "markers"))
    env.update(extra)
    return env


def _dry_plan(**extra: str) -> tuple[list[tuple[str, int]], int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK", "CAP_")) and k != "STEPS"}
    env.update(GPU_CHECK_DRY_RUN="1", **extra)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    plan = [(m[1], int(m[2])) for m in re.finditer(r"^plan (\S+)\s+(\d+) s", proc.stdout, re.M)]
    assert plan and plan[-1][0] == "total", proc.stdout
    return plan[:-1], plan[-1][1], proc.stdout


def _out_state(out: Path) -> tuple[dict, set[str], str]:
    """(gpu_check.json, names in the logs archive, summary.txt) as the runner would bring them back."""
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # the runner brings back at most 8 files
    assert all(OUT_NAME.match(f) and (out / f).is_file() for f in files), files
    status = json.loads((out / "gpu_check.json").read_text())
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
        logs = {n: tar.extractfile(n).read().decode() for n in tar.getnames() if n.endswith(".log")}
    for name, text in logs.items():  # each finished step's log holds that step's own output
        step = os.path.basename(name)[:-len(".log")]
        assert f"fake ran {step}" in text, (name, text)
    return status, names, (out / "summary.txt").read_text()


def _check_finished(out: Path, done: list[str], status: dict, archive: set[str], summary: str) -> None:
    assert [s["step"] for s in status["steps"]] == done
    assert all(s["status"] == "ok" for s in status["steps"]), status["steps"]
    for step in done:
        assert f"{step}.log" in archive
        assert re.search(rf"^{step} +ok ", summary, re.M), summary
        if step in OUT_FILES:
            assert json.loads((out / OUT_FILES[step]).read_text()) == {"fake": step}
        if step in ARCHIVE_FILES:
            assert ARCHIVE_FILES[step] in archive, archive


def test_script_is_short_and_parses():
    assert len(SCRIPT.read_text().splitlines()) < 400
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("budget,extra", [
    ("480", {}), ("600", {}), ("300", {}), ("200", {}), ("120", {}),
    ("480", {"STEPS": "+cpp dots steps"}), ("900", {"STEPS": "+cpp banded dots steps"}),
    ("480", {"CAP_tests": "250", "CAP_compile": "60"}),
])
def test_plan_fits_budget(budget, extra):
    plan, total, text = _dry_plan(GPU_CHECK_BUDGET_S=budget, **extra)
    names = [name for name, _ in plan]
    assert sum(cap for _, cap in plan) == total <= 0.9 * int(budget), text
    assert names[0] == "probe" and names == [s for s in ALL_PLAN if s in names], text  # the fixed order
    for name, value in extra.items():
        if name.startswith("CAP_") and name[4:] in names:
            assert dict(plan)[name[4:]] == int(value)
    added = extra.get("STEPS", "").replace("+", " ").split()
    wanted = [s for s in ALL_PLAN if s in DEFAULT_PLAN or s in added]
    dropped = [s for s in wanted if s not in names]
    assert (f"dropped (no room in the budget): {' '.join(dropped)}" in text) == bool(dropped), text


def test_default_plan():
    plan, total, text = _dry_plan()
    assert [name for name, _ in plan] == DEFAULT_PLAN, text
    assert total <= 432 and "budget 480 s" in text
    assert "(and whatever time the earlier steps leave)" in text.splitlines()[len(plan)]  # compile, the last


@pytest.mark.parametrize("extra", [{"GPU_CHECK_BUDGET_S": "soon"}, {"STEPS": "tests bogus"}, {"CAP_tests": "-1"}])
def test_bad_plan_is_refused(extra):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", **extra)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "gpu_check:" in proc.stderr


@pytest.mark.parametrize("steps,budget,xdist", [("", "480", True), ("+cpp banded dots steps", "900", False)])
def test_full_fake_run(tmp_path, steps, budget, xdist):
    extra = {"GPU_CHECK_BUDGET_S": budget, **({"STEPS": steps} if steps else {}),
             **({} if xdist else {"FAKE_NO_XDIST": "1"})}
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, **extra), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    status, archive, summary = _out_state(out)
    plan = ALL_PLAN if steps else DEFAULT_PLAN
    _check_finished(out, plan, status, archive, summary)
    assert status["finished"] is True and status["gpu"].startswith("FakeGPU")
    assert [p["step"] for p in status["plan"]] == plan
    assert not (out / "live.log").exists()
    assert "=== gpu_check summary: FakeGPU" in proc.stdout and "not run (yet)" not in summary
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        tests_log = tar.extractfile("./tests.log").read().decode()
    if xdist:
        assert "-p xdist -n 2" in tests_log and "-x" not in tests_log.split() and "tests.xml" in archive
    else:  # one pytest process per file, each with its own report
        assert tests_log.count("fake ran tests: -m pytest") == len(TEST_FILES)
        assert sum(n.startswith("tests-") and n.endswith(".xml") for n in archive) == len(TEST_FILES)


@pytest.mark.parametrize("hang", ["deps", "build", "tests", "kernels", "cold", "compile"])
def test_kill_after_a_step_keeps_what_finished(tmp_path, hang):
    """The runner's kill (SIGKILL to the process group) while step ``hang`` runs: $OUT keeps every earlier step."""
    env = _env(tmp_path, FAKE_HANG_STEP=hang)
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pid_file, live = tmp_path / "markers" / f"{hang}.pid", tmp_path / "out" / "live.log"
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip() and live.exists()
                   and f"fake ran {hang}" in live.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, f"step {hang} never started"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if pid_file.exists() and pid_file.read_text().strip():  # the step runs in timeout's own process group
            try:
                os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = tmp_path / "out"
    done = DEFAULT_PLAN[:DEFAULT_PLAN.index(hang)]
    status, archive, summary = _out_state(out)
    _check_finished(out, done, status, archive, summary)
    assert status["finished"] is False
    assert f"{hang}.log" not in archive
    assert f"not run (yet): {' '.join(DEFAULT_PLAN[len(done):])}" in summary
    assert f"fake ran {hang}" in live.read_text()  # what the running step had printed
    if hang in OUT_FILES:  # and what it had written (bench.kernels writes after every row)
        assert json.loads((out / OUT_FILES[hang]).read_text()) == {"fake": hang}


@pytest.mark.slow
def test_step_past_its_cap_is_stopped_and_the_rest_runs(tmp_path):
    env = _env(tmp_path, FAKE_HANG_STEP="overhead", CAP_overhead="10")
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1, proc.stdout
    status, archive, summary = _out_state(tmp_path / "out")
    by_step = {s["step"]: s for s in status["steps"]}
    assert list(by_step) == DEFAULT_PLAN
    assert by_step["overhead"]["status"] == "TIMEOUT" and by_step["overhead"]["seconds"] <= 10
    assert all(s["status"] == "ok" for name, s in by_step.items() if name != "overhead")
    assert "overhead.log" in archive


def test_no_gpu_skips(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, FAKE_NO_GPU="1"), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and "no GPU: skipping" in proc.stdout, proc.stdout
    status = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["step"] for s in status["steps"]] == ["probe"]


def test_kernel_rows_reconstruction_first_compile_last():
    from bench.kernels import kernel_cases

    for device, mode in (("cpu", "quick"), ("cpu", "full"), ("cuda", "full"), ("cuda", "sweep")):
        cases, _ = kernel_cases(device, mode)
        ops = [op for op, backend, _, _ in cases if backend != "torch_compile"]
        assert ops == sorted(ops, key=("reconstruction_loss", "spline_mix").index), (device, mode)
        compiled = [backend == "torch_compile" for _, backend, _, _ in cases]
        assert compiled == sorted(compiled), (device, mode)  # every compile row after every other row
        assert kernel_cases(device, mode, "skip")[0] == [c for c in cases if c[1] != "torch_compile"]
        assert kernel_cases(device, mode, "only")[0] == [c for c in cases if c[1] == "torch_compile"]
    sweep, _ = kernel_cases("cuda", "sweep")
    shapes = {shape for _, _, shape, _ in sweep}
    assert {(256, 256, 10), (256, 256, 2**20), (4096, 4096, 10), (4096, 4096, 1000)} <= shapes
    only, _ = kernel_cases("cuda", "full", "only")
    assert [c[0] for c in only] == ["reconstruction_loss"] * 4 + ["spline_mix"] * 4
    with pytest.raises(ValueError):
        kernel_cases("cpu", "quick", "sometimes")
