"""Pictures for people: overlays of images, reference labels and predictions, and the picture of an evaluation.

- :mod:`nnfast.visualize.overlay`       choosing slices, windowing intensities, drawing one case's PNG.
- :mod:`nnfast.visualize.api`           ``nnfast overlay``: a dataset's cases (raw files or preprocessed stores) and
                                        their predictions, one PNG per case, drawn on worker processes.
- :mod:`nnfast.visualize.summary_plot`  ``summary.png`` beside ``summary.json``: Dice per case and label.

matplotlib is imported inside the drawing functions only (Agg canvas, no pyplot), so importing this package, or
running ``nnfast --help``, does not import it; nothing of this package is on a hot path.
"""
