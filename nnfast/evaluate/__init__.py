"""Evaluation, postprocessing, ensembling and model selection (nnU-Net v2's ``evaluation/``, ``postprocessing/``,
``ensembling/``).

- :mod:`nnfast.evaluate.metrics`         per-case Dice/IoU/TP/FP/FN/TN, folder evaluation, ``summary.json``.
- :mod:`nnfast.evaluate.postprocessing`  keep-the-largest-component decisions and their application (JSON plans).
- :mod:`nnfast.evaluate.ensemble`        averaging saved probabilities of several predictions.
- :mod:`nnfast.evaluate.find_best`       cross-validation results of every trained configuration and ensemble, the
                                         best one, its postprocessing and the commands to predict with it.
"""
