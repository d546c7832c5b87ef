"""Training building blocks reproducing nnU-Net v2's ``nnUNetTrainer`` defaults.

- :mod:`nnfast.train.network`  plan-driven PlainConvUNet (state dicts interchangeable with nnU-Net's).
- :mod:`nnfast.train.loss`     Dice + CE loss with deep supervision (nnU-Net's ``DC_and_CE_loss``).
- :mod:`nnfast.train.optim`    SGD (Nesterov) and the polynomial learning-rate schedule.
- :mod:`nnfast.train.config`   :class:`~nnfast.train.config.TrainConfig` hyperparameters (JSON round trip).
- :mod:`nnfast.train.splits`   5-fold cross-validation splits identical to nnU-Net's ``splits_final.json``.
- :mod:`nnfast.train.step`     one training / validation step (AMP, gradient clipping, pseudo-Dice counts).
- :mod:`nnfast.train.trainer`  the run: epochs, validation pseudo-Dice and its EMA, checkpoints, exact resume, DDP.
- :mod:`nnfast.train.checkpoint` state-dict ``.pt`` files (``weights_only`` loadable) with JSON sidecars, atomic.
- :mod:`nnfast.train.progress` per-epoch history, ``training_log.txt``, ``progress.{json,csv,png}``.
- :mod:`nnfast.train.ddp`      process groups and nnU-Net's per-rank batch/oversampling split.
- :mod:`nnfast.train.layout`   results folder names and the copies of plans/dataset.json beside the checkpoints.
- :mod:`nnfast.train.final_validation` predicting the fold's validation cases after training (via ``nnfast.infer``).

This package's ``__init__`` imports nothing, so ``nnfast.train.config`` and ``nnfast.train.splits`` stay importable
without torch.
"""
