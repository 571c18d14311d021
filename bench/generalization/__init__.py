"""The DReS evidence study (``python -m bench.generalization``): does DReS generalize better than ERM,
gradient penalty and mixup? One module per concern:

- ``config``: the methods compared and the quick / full / smoke sizes (StudyConfig)
- ``data``: digits splits, label noise, statistics (mean and 95% t-interval over seeds)
- ``supervised``, ``regimes``, ``pictures``: training of each regime (baselines from bench/baselines.py)
- ``studies``: the experiments and ``run_study``, which runs them all
- ``mnist`` (MNIST-5k data, corruptions, CNN/MLP), ``supervised_mnist``, ``ssl``, ``gan``, ``vae_mnist``:
  the studies supervised_mnist5k, ssl_mnist5k, gan_mixture, vae_mnist5k
- ``entries`` (the common "studies" entry format, its tables and plot), ``suite`` (runs studies side by
  side, assembles the "studies" list)
- ``report``: plots, report.md and generalization.json; ``evidence``: tables for the README
- ``options``: the study options_supervised (``python -m bench.generalization.options``): the DReS options
  every/order/anchor on the supervised protocol
- ``v3`` (``python -m bench.generalization.v3``): evidence v3, DReS against SAM, EMA, manifold mixup and the
  baselines at equal steps and equal wall-clock time on MNIST-5k, digits and UCR time series (``timeseries``:
  the sets bundled in sktime, the 1-D CNN and MLP), and the DReS options on CNNs; ``v3_methods`` (SAM, EMA,
  manifold mixup, the training loop, step memory), ``v3_extend`` (grids past the edges hit), ``v3_tables``
  (README's and docs/EVIDENCE.md's tables from its JSON); ``--quick`` runs it at small size
- ``__main__``: the command line
"""
from bench.generalization.config import StudyConfig, full_config, quick_config, smoke_config
from bench.generalization.studies import resummarize, run_study

__all__ = ["StudyConfig", "full_config", "quick_config", "smoke_config", "run_study", "resummarize"]
