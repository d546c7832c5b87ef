"""Training building blocks reproducing nnU-Net v2's ``nnUNetTrainer`` defaults.

- :mod:`nnfast.train.network`  plan-driven PlainConvUNet (state dicts interchangeable with nnU-Net's).
- :mod:`nnfast.train.loss`     Dice + CE loss with deep supervision (nnU-Net's ``DC_and_CE_loss``).
- :mod:`nnfast.train.optim`    SGD (Nesterov) and the polynomial learning-rate schedule.
- :mod:`nnfast.train.config`   :class:`~nnfast.train.config.TrainConfig` hyperparameters (JSON round trip).
- :mod:`nnfast.train.splits`   5-fold cross-validation splits identical to nnU-Net's ``splits_final.json``.
- :mod:`nnfast.train.step`     one training / validation step (AMP, gradient clipping, pseudo-Dice counts).

This package's ``__init__`` imports nothing, so ``nnfast.train.config`` and ``nnfast.train.splits`` stay importable
without torch.
"""
