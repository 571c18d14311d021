"""What the generalization study runs: the methods, and the sizes of the quick, full and smoke runs."""
from __future__ import annotations

from dataclasses import dataclass, field

SUPERVISED_METHODS = ["erm", "dres", "dres_decoded", "grad_penalty", "mixup", "label_smoothing", "weight_decay"]


@dataclass
class MnistConfig:
    """Sizes of the MNIST-5k and 2-D mixture studies (supervised_mnist5k, ssl_mnist5k, gan_mixture,
    vae_mnist5k); grids are the strengths tried on validation."""
    seeds: list
    archs: list = field(default_factory=lambda: ["cnn", "mlp"])
    label_noise: list = field(default_factory=lambda: [0.0, 0.3])
    n_train: int = 1000
    steps: int = 300
    batch: int = 64
    grids: dict = field(default_factory=dict)
    ssl_steps: int = 300
    ssl_batch: int = 128
    ssl_width: int = 16
    ssl_labels: int = 100
    ssl_dres_weights: list = field(default_factory=lambda: [0.1, 1.0])
    gan_mixtures: list = field(default_factory=lambda: ["ring8", "grid25"])
    gan_steps: int = 1500
    gan_batch: int = 128
    gan_r1_gammas: list = field(default_factory=lambda: [0.1, 1.0, 10.0])
    gan_dres_weights: list = field(default_factory=lambda: [0.1, 1.0, 10.0])
    vae_steps: int = 1000
    vae_batch: int = 64
    vae_dres_weights: list = field(default_factory=lambda: [0.1, 1.0, 10.0])
    feature_steps: int = 500


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
    mnist: MnistConfig = None        # the MNIST-5k and 2-D mixture studies (None: not run)
    v3: object = None                # evidence v3 (bench/generalization/v3.py: V3Config; None: not run)
    sweep_base: dict = field(default_factory=lambda: dict(strength=1.0, coded_ratio=1.0, dof_frac=0.75,
                                                          submodule="model"))


MNIST_QUICK_GRIDS = {"erm": [0.0], "dres": [0.01, 0.1, 1.0, 10.0], "grad_penalty": [0.01, 0.1, 1.0, 3.0],
                     "mixup": [0.1, 0.4, 2.0, 8.0], "label_smoothing": [0.03, 0.1, 0.3, 0.5],
                     "weight_decay": [0.01, 0.1, 1.0]}
MNIST_FULL_GRIDS = {"erm": [0.0], "dres": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                    "grad_penalty": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "mixup": [0.1, 0.2, 0.4, 1.0, 2.0, 8.0],
                    "label_smoothing": [0.03, 0.1, 0.2, 0.3, 0.5, 0.7],
                    "weight_decay": [0.001, 0.01, 0.1, 1.0, 3.0]}


def tiny_mnist_config() -> MnistConfig:
    """The MNIST and mixture studies at test size (seconds each)."""
    return MnistConfig(seeds=[0, 1], archs=["cnn"], label_noise=[0.3], n_train=100, steps=3, batch=16,
                       grids={"erm": [0.0], "dres": [0.1, 1.0], "grad_penalty": [0.1], "mixup": [0.4],
                              "label_smoothing": [0.1], "weight_decay": [0.1]},
                       ssl_steps=2, ssl_batch=16, ssl_width=4, ssl_labels=50, ssl_dres_weights=[1.0],
                       gan_mixtures=["ring8"], gan_steps=3, gan_batch=16, gan_r1_gammas=[1.0], gan_dres_weights=[1.0],
                       vae_steps=3, vae_batch=16, vae_dres_weights=[1.0], feature_steps=3)


def quick_config() -> StudyConfig:
    from bench.generalization.v3 import quick_v3_config  # evidence v3 at small size
    return StudyConfig(v3=quick_v3_config(),
        seeds=[0, 1, 2], train_sizes=[100, 500], label_noise=[0.0, 0.3], steps=400, batch=50,
        grids={"erm": [0.0], "dres": [0.3, 1.0, 3.0], "dres_decoded": [0.25, 0.5],
               "grad_penalty": [0.01, 0.1, 1.0], "mixup": [0.2, 1.0],
               "label_smoothing": [0.03, 0.1, 0.3], "weight_decay": [0.01, 0.1, 1.0]},
        sweep_setting=[(200, 0.0)], sweep_weights=[0.1, 0.3, 1.0, 3.0, 10.0],
        sweep_coded_ratios=[0.5, 1.0, 2.0, 4.0], sweep_dof_fracs=[0.25, 0.5, 0.75, 1.0],
        sweep_submodules=["model", "features", "head"], wallclock_setting=[200, 0.0],
        ssl_steps=300, ssl_batch=128, ssl_weights=[0.3, 3.0], ssl_labels=200,
        vae_steps=800, vae_batch=64, vae_dres_weights=[0.1, 1.0], vae_gp_weights=[0.001, 0.01],
        moons_steps=600, mnist=MnistConfig(seeds=[0, 1, 2], grids=MNIST_QUICK_GRIDS, n_train=1000, steps=250, batch=32,
                                            ssl_steps=200, ssl_batch=64, ssl_width=8, ssl_labels=300,
                                            ssl_dres_weights=[0.01, 0.1, 1.0],
                                            gan_steps=3000, gan_batch=64, vae_steps=800, feature_steps=400))


def full_config() -> StudyConfig:
    return StudyConfig(
        seeds=list(range(10)), train_sizes=[100, 200, 500], label_noise=[0.0, 0.3], steps=400, batch=50,
        grids={"erm": [0.0], "dres": [0.1, 0.3, 1.0, 3.0, 10.0], "dres_decoded": [0.1, 0.25, 0.5],
               "grad_penalty": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "mixup": [0.1, 0.4, 1.0, 2.0],
               "label_smoothing": [0.01, 0.03, 0.1, 0.2, 0.3, 0.5], "weight_decay": [0.001, 0.01, 0.1, 0.3, 1.0, 3.0]},
        sweep_setting=[(200, 0.0), (200, 0.3)], sweep_weights=[0.1, 0.3, 1.0, 3.0, 10.0],
        sweep_coded_ratios=[0.5, 1.0, 2.0, 4.0], sweep_dof_fracs=[0.25, 0.5, 0.75, 1.0],
        sweep_submodules=["model", "features", "head"], wallclock_setting=[200, 0.0],
        ssl_steps=400, ssl_batch=128, ssl_weights=[0.1, 0.3, 1.0, 3.0], ssl_labels=200,
        vae_steps=1000, vae_batch=64, vae_dres_weights=[0.01, 0.03, 0.1, 0.3, 1.0],
        vae_gp_weights=[0.0003, 0.001, 0.01], moons_steps=1000,
        # 2.05 CPU hours measured (85 min wall on 2 shared cores); the quick run's grid edges
        # (R1 and DReS at their smallest on the ring, label smoothing at its largest) are extended
        mnist=MnistConfig(seeds=list(range(5)), grids=MNIST_FULL_GRIDS, n_train=1000, steps=400, batch=32,
                          ssl_steps=500, ssl_batch=64, ssl_width=8, ssl_labels=300,
                          ssl_dres_weights=[0.003, 0.01, 0.1, 1.0], gan_steps=8000, gan_batch=64,
                          gan_r1_gammas=[0.01, 0.1, 1.0], gan_dres_weights=[0.01, 0.1, 1.0],
                          vae_steps=2000, vae_dres_weights=[0.01, 0.1, 1.0, 10.0], feature_steps=400))


def smoke_config() -> StudyConfig:
    """Tiny end-to-end configuration for the CI smoke test (seconds, not minutes)."""
    return StudyConfig(
        seeds=[0, 1], train_sizes=[100], label_noise=[0.0], steps=10, batch=20,
        grids={"erm": [0.0], "dres": [1.0], "dres_decoded": [0.5], "grad_penalty": [0.1], "mixup": [0.4],
               "label_smoothing": [0.1], "weight_decay": [0.1]},
        sweep_setting=[(100, 0.0)], sweep_weights=[1.0], sweep_coded_ratios=[2.0], sweep_dof_fracs=[0.5],
        sweep_submodules=["head"], wallclock_setting=[100, 0.0],
        ssl_steps=3, ssl_batch=32, ssl_weights=[1.0], ssl_labels=100,
        vae_steps=3, vae_batch=32, vae_dres_weights=[1.0], vae_gp_weights=[0.01], moons_steps=5,
        timing_repeats=1)
