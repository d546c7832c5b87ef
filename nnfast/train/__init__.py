"""Training building blocks reproducing nnU-Net v2's ``nnUNetTrainer`` defaults.

- :mod:`nnfast.train.loss`     Dice + CE loss with deep supervision (nnU-Net's ``DC_and_CE_loss``), Dice + BCE for
  region training (``DC_and_BCE_loss``).
- :mod:`nnfast.train.optim`    SGD (Nesterov) and the polynomial learning-rate schedule.
- :mod:`nnfast.train.config`   :class:`~nnfast.train.config.TrainConfig` hyperparameters (JSON round trip).
- :mod:`nnfast.train.step`     one training / validation step (AMP, gradient clipping, pseudo-Dice counts).
- :mod:`nnfast.train.trainer`  the run: epochs, validation pseudo-Dice and its EMA, checkpoints, exact resume, DDP.
- :mod:`nnfast.train.checkpoint` state-dict ``.pt`` files (``weights_only`` loadable) with JSON sidecars, atomic.
- :mod:`nnfast.train.progress` per-epoch history, ``training_log.txt``, ``progress.{json,csv,png}``.
- :mod:`nnfast.train.ddp`      process groups and nnU-Net's per-rank batch/oversampling split.
- :mod:`nnfast.train.layout`   the copies of plans/dataset.json beside the checkpoints, ``train_config.json``.
- :mod:`nnfast.train.pretrained` fine-tuning: nnfast/nnU-Net checkpoint weights into a new network
  (nnU-Net's ``load_pretrained_weights``).

Shared with inference, outside this package: the network (:mod:`nnfast.network`), the splits (:mod:`nnfast.splits`),
the device rule (:mod:`nnfast.device`) and the folder layout (:mod:`nnfast.layout`). This package imports neither
:mod:`nnfast.infer` nor :mod:`nnfast.evaluate`: the final validation is a callable the caller passes to
:func:`~nnfast.train.trainer.train`.

This package's ``__init__`` imports nothing, so ``nnfast.train.config`` stays importable without torch.
"""
