"""Inference: segment raw images with trained models, as nnU-Net v2's ``nnUNetPredictor`` does.

- :mod:`nnfast.infer.sliding_window`  tile steps, Gaussian importance map, sliding-window logits with mirror TTA.
- :mod:`nnfast.infer.export`          logits -> segmentation/probabilities in the original geometry (streaming argmax).
- :mod:`nnfast.infer.model`           trained model folders (nnfast's and nnU-Net's), checkpoints, fold weights.
- :mod:`nnfast.infer.inputs`          listing, reading, checking and preprocessing the cases to predict.
- :mod:`nnfast.infer.predict`         ``predict_folder`` / ``PredictOptions`` (``nnfast predict``): per-case error reports.
- :mod:`nnfast.infer.overlap`         preprocessing thread -> network -> export threads, bounded (``StagePipeline``).
- :mod:`nnfast.infer.validation`      ``validate_fold``: the final validation that ``nnfast train`` passes to the trainer.
- :mod:`nnfast.infer.api`             ``Predictor``: a model loaded once, ``predict_array`` / ``predict_files`` / ``stream``
                                      in memory (nnU-Net's ``nnUNetPredictor``).
- :mod:`nnfast.infer.model_zip`       ``export_model`` (nnU-Net's model zip layout) / ``install_model`` (zip-slip checked).

Importing this package imports nothing heavy (torch is imported where it is used).
"""
