"""Integrations of :class:`dres_fast.SubmoduleDReS` with training frameworks, one module each, imported by
name only (nothing here is imported by ``import dres_fast``, and this package imports neither framework):

* :mod:`dres_fast.integrations.hf`: ``DReSTrainer`` / ``DReSTrainerMixin`` for Hugging Face
  ``transformers.Trainer`` (imports ``transformers``);
* :mod:`dres_fast.integrations.lightning`: ``LightningDReS``, used inside a LightningModule's
  ``training_step`` (imports neither ``lightning`` nor ``pytorch_lightning``: it only calls ``module.log``).

Install the frameworks with ``pip install -e ".[integrations]"`` (naming torch in the same command keeps a
CPU torch from being replaced).
"""
