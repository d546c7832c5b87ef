"""nnfast: a fast, self-configuring 3D medical image segmentation pipeline that reproduces nnU-Net v2.

Map of the package (one subpackage per pipeline stage):

- ``nnfast.native``       Numba kernels (cropping, intensity statistics, resampling, class locations); arrays in, arrays out;
                          ``native.pages`` gives the consumed part of a large array back to the system early.
- ``nnfast.io``           image reading/writing (SimpleITK, nnU-Net conventions), dataset.json and case listing, atomic
                          writes, zarr case stores (``io.shard_writer`` writes their shards, ``io.case_writer`` builds a store piece by piece), the lean patch reader, the cascade's previous-stage stores, the
                          data-only reader of nnU-Net's pickles, safe torch checkpoint loading (``weights_only`` +
                          numpy-scalar allowlist, nnU-Net's ``.pth``).
- ``nnfast.synth``        deterministic synthetic Decathlon-style datasets (CT-like and multi-channel MRI-like).
- ``nnfast.convert``      Medical Segmentation Decathlon -> nnU-Net v2 layout.
- ``nnfast.verify``       dataset checks that report every problem at once.
- ``nnfast.fingerprint``  dataset fingerprint (spacings, shapes after crop, foreground intensity statistics).
- ``nnfast.plan``         experiment planning identical to nnU-Net v2's ExperimentPlanner and ResEnc M/L/XL planners
                          (``plan.presets``); plans identifiers side by side (``plan.api``); plan transfer between
                          datasets (``plan.transfer``); nnUNetPlans.json export.
- ``nnfast.preprocess``   cropping, normalization, resampling, class locations, case stores (a worker streams the image's
                          last resampling pass into the store: ``preprocess.pipeline``); parallel, distributed, resumable;
                          worker memory estimates and the ``--workers`` warning (``preprocess.memory``).
- ``nnfast.data``         patch sampling, augmentation, the multiprocess loader, the nnU-Net trainer drop-in.
- ``nnfast.train``        Dice+CE with deep supervision (Dice+BCE for regions), the training run (2d, 3d_fullres,
                          3d_lowres, the cascade, region labels), checkpoints, DDP, fine-tuning from nnfast or nnU-Net
                          weights (``train.pretrained``); imports neither ``infer`` nor ``evaluate`` (the caller wires in the final
                          validation).
- ``nnfast.infer``        sliding-window prediction, export to the original geometry, model loading, the final
                          validation of a trained fold, the in-memory ``Predictor``, model zips (nnU-Net's layout).
- ``nnfast.evaluate``     metrics, postprocessing, ensembling, choosing the best configuration.
- ``nnfast.visualize``    pictures: per-case overlays of image, reference and prediction (``nnfast overlay``), the
                          evaluation's ``summary.png``; matplotlib imported only when drawing.
- ``nnfast.cli``          the ``nnfast`` command.

Shared by the stages (one owner each):

- ``nnfast.labels``       what dataset.json's labels mean (labels, regions, ``regions_class_order``, ignore label,
                          painting, training targets): one ``LabelManager`` built once and passed to every stage.
- ``nnfast.layout``       every folder and file name on disk: preprocessed folders, plans/fingerprint/splits files,
                          ``<trainer>__<plans>__<config>`` results folders, folds, checkpoints, validation,
                          ``predicted_next_stage``.
- ``nnfast.network``      the plan-driven network that training builds and inference loads: PlainConvUNet, and
                          ``nnfast.network_residual``'s ResidualEncoderUNet (nnU-Net's ResEnc), by the plan's class.
- ``nnfast.splits``       nnU-Net's cross-validation splits (``splits_final.json``).
- ``nnfast.device``       the torch device rule (``auto``/``cuda``/``cpu``; inference also ``cuda:N``/``mps``).
- ``nnfast.parallel``     per-case task execution: spawn pools with dead-worker detection, dask.distributed.
- ``nnfast.workers``      the worker core under both process pools (task pool, patch loader): spawn, pipes, shared
                          memory, one thread policy, dead-worker diagnosis, stop escalation.
- ``nnfast.settings``     data roots (flags, ``NNFAST_*``, ``nnUNet_*``).
- ``nnfast.errors``       the exceptions nnfast raises on purpose (one base class, builtin mix-ins).
- ``nnfast.extras``       optional dependencies (dask, matplotlib, psutil) imported on demand, with the pip command.
"""
__version__ = "0.1.0"
