"""The DReS evidence study (``python -m bench.generalization``): does DReS generalize better than ERM,
gradient penalty and mixup? One module per concern:

- ``config``: the methods compared and the quick / full / smoke sizes (StudyConfig)
- ``data``: digits splits, label noise, statistics (mean and 95% t-interval over seeds)
- ``supervised``, ``regimes``, ``pictures``: training of each regime (baselines from bench/baselines.py)
- ``studies``: the experiments and ``run_study``, which runs them all
- ``report``: plots, report.md and generalization.json; ``evidence``: tables for the README
- ``__main__``: the command line
"""
from bench.generalization.config import StudyConfig, full_config, quick_config, smoke_config
from bench.generalization.studies import resummarize, run_study

__all__ = ["StudyConfig", "full_config", "quick_config", "smoke_config", "run_study", "resummarize"]
