"""Smoke test of the standalone scripts in examples/: each runs end to end with --quick and prints its result
lines (the numbers themselves are the examples' output, not something this test can judge)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {
    "supervised.py": [r"^erm\s+test accuracy \d+\.\d+%", r"^dres\s+test accuracy \d+\.\d+%"],
    "gan.py": [rf"^{name}\s+modes covered \d\.\d/8\s+high-quality samples\s+\d+\.\d%" for name in ("none", "r1", "dres")],
    "vae.py": [r"^vae\s+test ELBO\s+-\d+\.\d+ nats", r"^vae_dres\s+test ELBO\s+-\d+\.\d+ nats"],
    "simclr.py": [r"^linear probe on raw pixels", r"^simclr\s+linear probe \d+\.\d%", r"^simclr_dres\s+linear probe \d+\.\d%"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs_quick(script, tmp_path):
    args = [sys.executable, os.path.join(ROOT, "examples", script), "--quick"]
    if script == "gan.py":
        args += ["--out", str(tmp_path / "samples.png")]
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="0")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for pattern in EXPECTED[script]:
        assert re.search(pattern, proc.stdout, re.MULTILINE), f"{script}: no line matching {pattern!r} in\n{proc.stdout}"
    if script == "gan.py":
        assert (tmp_path / "samples.png").stat().st_size > 1000
