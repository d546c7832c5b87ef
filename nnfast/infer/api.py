"""In-memory prediction: a :class:`Predictor` built once from a model folder, then called many times.

What tools built on nnU-Net (TotalSegmentator, 3D Slicer extensions, MONAI bundles) call in memory, with the
semantics of nnU-Net v2's ``nnUNetPredictor``:

- :meth:`Predictor.predict_array` = ``predict_single_npy_array``: an image as nnU-Net's readers return it
  (``(c, z, y, x)``, ``properties['spacing']`` in the same axis order) -> the segmentation ``(z, y, x)`` (and the
  probabilities ``(C, z, y, x)`` float32 on request). Nothing touches the disk.
- :meth:`Predictor.predict_files` = ``predict_from_files``: channel file lists (or a folder) -> ``<case><ending>``
  files (:func:`nnfast.infer.predict.predict_folder` with the already loaded model).
- :meth:`Predictor.stream` (generator): many cases, arrays or channel file lists, with the next case read and
  preprocessed on a background thread while the current one is predicted and the previous one exported
  (:class:`nnfast.infer.overlap.StagePipeline`, as ``nnfast predict``); results come in input order.

Built on the predict pipeline's parts (:func:`nnfast.infer.model.load_model`,
:func:`nnfast.infer.inputs.preprocess_image`, :func:`nnfast.infer.predict.predict_logits`,
:func:`nnfast.infer.export.logits_to_segmentation`): the same preprocessing, sliding window, fold averaging and export
as ``nnfast predict``, so a mask written by ``nnfast predict`` equals the array returned here.

The network is built once and reused; calls are serialised by a lock (one network), so a Predictor may be shared
between threads.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..device import resolve_device
from ..errors import ImageReadError, InputTypeError, ShapeError

__all__ = ["Predictor", "Prediction"]


@dataclass
class Prediction:
    """One case's result from :meth:`Predictor.stream`.

    Attributes
    ----------
    index : int
        Position of the case in the input.
    segmentation : ndarray (z, y, x)
        Labels in the input's geometry (uint8, or int16 beyond 255 labels).
    probabilities : ndarray (C, z, y, x) float32, or None
        Softmax (sigmoid for regions) when requested.
    properties : dict
        The case's preprocessing properties (spacing, crop box, shapes; ``geometry`` for files).
    """

    index: int
    segmentation: np.ndarray = field(repr=False)
    probabilities: np.ndarray | None = field(default=None, repr=False)
    properties: dict = field(default_factory=dict, repr=False)


class _Cancelled(BaseException):
    """Ends the pipeline of a stream whose consumer went away."""


class Predictor:
    """A trained model loaded once for many predictions (nnU-Net's ``nnUNetPredictor``).

    Parameters
    ----------
    model_folder : path
        A trainer folder (nnfast's ``nnfastTrainer__nnfast_plans__<config>``, or nnU-Net's, e.g. installed from a zip).
    folds : sequence, optional
        Folds to ensemble (default: every fold holding the checkpoint).
    checkpoint_name : str
        ``checkpoint_final`` (default) or ``checkpoint_best``.
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (:func:`nnfast.device.resolve_device`).
    use_tta : bool
        Mirroring test-time augmentation over the axes training allowed (nnU-Net's ``use_mirroring``).
    step : float
        Tile step as a fraction of the patch size (nnU-Net's ``tile_step_size``, 0.5).
    batch_tiles : int, optional
        Tiles per forward pass.
    threads : int
        Threads of the export (resampling back to the input grid).

    Raises
    ------
    NnfastError
        The model folder, a fold or a checkpoint is missing or does not fit (:func:`~nnfast.infer.model.load_model`).
    """

    def __init__(self, model_folder: Path | str, *, folds: Sequence | None = None,
                 checkpoint_name: str = "checkpoint_final", device: Any = "auto", use_tta: bool = True,
                 step: float = 0.5, batch_tiles: int | None = None, threads: int = 1) -> None:
        from .model import load_model

        if not 0 < float(step) <= 1:
            raise ShapeError(f"step must be a fraction of the patch size in (0, 1], got {step}")
        self.model = load_model(model_folder, folds, checkpoint_name)
        self.checkpoint_name = checkpoint_name
        self.device = resolve_device(device)
        self.use_tta = bool(use_tta)
        self.step = float(step)
        self.batch_tiles = batch_tiles
        self.threads = max(1, int(threads))
        self._network = self.model.build_network()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        m = self.model
        return (f"Predictor({str(m.folder)!r}, config={m.config_name!r}, folds={list(m.folds)}, "
                f"device={str(self.device)!r}, use_tta={self.use_tta}, step={self.step})")

    # ------------------------------------------------------------------------------------------ stages
    def _check(self, image: Any, properties: Any, where: str) -> tuple[np.ndarray, tuple[float, ...]]:
        if not isinstance(image, np.ndarray):
            raise InputTypeError(f"{where}: the image must be a numpy array (c, z, y, x), got {type(image).__name__}")
        if image.ndim != 4:
            raise ShapeError(f"{where}: the image must be (c, z, y, x) as nnU-Net's readers return it (2D images: "
                             f"(c, 1, y, x)); got shape {image.shape}")
        n = self.model.num_image_channels
        if image.shape[0] != n:
            raise ShapeError(f"{where}: the image has {image.shape[0]} channel(s) (axis 0 of shape {image.shape}) but "
                             f"the model expects {n}")
        if not isinstance(properties, Mapping) or "spacing" not in properties:
            raise InputTypeError(f"{where}: properties must be a dict with 'spacing' (in the image's axis order, as "
                                 "nnU-Net's readers return it)")
        try:
            spacing = tuple(float(s) for s in properties["spacing"])
        except (TypeError, ValueError):
            raise InputTypeError(f"{where}: properties['spacing'] must be numbers, got "
                                 f"{properties['spacing']!r}") from None
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ShapeError(f"{where}: properties['spacing'] must be 3 positive numbers (z, y, x), got {spacing}")
        if not np.isfinite(np.sum(image, dtype=np.float64)) and not np.isfinite(image).all():
            raise ImageReadError(f"{where}: the image holds NaN/inf voxels; replace them before predicting")
        return image, spacing

    def _prepare(self, image, properties, previous_stage=None, where: str = "image"):
        from .inputs import preprocess_image

        image, spacing = self._check(image, properties, where)
        prev = None if previous_stage is None else np.asarray(previous_stage)
        if self.model.configuration.previous_stage is not None and prev is None:
            raise InputTypeError(f"{where}: `{self.model.config_name}` is the second stage of a cascade; pass the "
                                 "previous stage's segmentation (previous_stage=...)")
        data, props = preprocess_image(image, spacing, self.model.plans, self.model.config_name,
                                       self.model.labels.foreground_labels, prev)
        for key in ("sitk_stuff", "origin", "direction"):
            if key in properties:
                props[key] = properties[key]
        return data, props

    def _prepare_item(self, item, index: int):
        from .inputs import CaseInput, read_case

        where = f"case {index}"
        if isinstance(item, Mapping):
            return self._prepare(item.get("image"), item.get("properties"), item.get("previous_stage"), where)
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], np.ndarray):
            return self._prepare(item[0], item[1] if len(item) > 1 else None, item[2] if len(item) > 2 else None,
                                 where)
        if isinstance(item, (list, tuple)) and item and all(isinstance(p, (str, Path)) for p in item):
            case = CaseInput(f"case_{index}", tuple(Path(p) for p in item))
            data, geom = read_case(case)
            d, props = self._prepare(data, {"spacing": geom.spacing}, where=f"{where} ({item[0]})")
            props["geometry"] = geom.to_json()
            return d, props
        raise InputTypeError(f"{where}: expected (image, properties[, previous_stage]), a dict with 'image' and "
                             f"'properties', or a list of channel files; got {type(item).__name__}")

    def _logits(self, data: np.ndarray) -> np.ndarray:
        from .predict import predict_logits

        with self._lock:
            return predict_logits(self.model, data, self._network, use_tta=self.use_tta, step=self.step,
                                  device=self.device, batch_tiles=self.batch_tiles)

    def _export(self, logits: np.ndarray, props: dict, return_probabilities: bool):
        from .export import logits_to_segmentation

        return logits_to_segmentation(logits, props, self.model.plans, self.model.config_name,
                                      return_probabilities=return_probabilities,
                                      regions_class_order=self.model.labels.regions_class_order,
                                      threads=self.threads)

    # ------------------------------------------------------------------------------------------ public
    def predict_array(self, image: np.ndarray, properties: Mapping[str, Any], *,
                      previous_stage: np.ndarray | None = None, return_probabilities: bool = False):
        """Segment one image held in memory (nnU-Net's ``predict_single_npy_array``).

        Parameters
        ----------
        image : ndarray (c, z, y, x)
            As nnU-Net's readers return it (SimpleITK axis order; 2D images ``(c, 1, y, x)``), any real dtype.
        properties : dict
            ``spacing`` in the image's axis order (z, y, x); anything else (origin, direction, ``sitk_stuff``) is
            ignored here.
        previous_stage : ndarray (z, y, x), optional
            The first stage's segmentation (cascade second stage only).
        return_probabilities : bool
            Also return the probabilities.

        Returns
        -------
        segmentation : ndarray (z, y, x)
        probabilities : ndarray (C, z, y, x) float32 (with ``return_probabilities``)

        Raises
        ------
        InputTypeError, ShapeError, ImageReadError
            The image or its properties do not fit the model (wrong axis count or channel count, no spacing, NaN).
        """
        data, props = self._prepare(image, properties, previous_stage)
        seg, probs = self._export(self._logits(data), props, return_probabilities)
        return (seg, probs) if return_probabilities else seg

    def predict_files(self, inputs: Path | str | Sequence[Sequence[Path | str]], output_folder: Path | str, *,
                      save_probabilities: bool = False, workers: int = 1, progress=None):
        """Predict channel files and write ``<case><ending>`` into ``output_folder`` (nnU-Net's
        ``predict_from_files``): :func:`nnfast.infer.predict.predict_folder` with this model.

        Parameters
        ----------
        inputs : path or list of lists of paths
            A folder of ``<case>_XXXX<ending>`` files, or each case's channel files (``[[ch0, ch1, ...], ...]``).

        Returns
        -------
        PredictionReport
            Written and failed cases (one broken case does not stop the others).
        """
        from .predict import PredictOptions, predict_folder

        opts = PredictOptions(model_folder=self.model.folder, folds=self.model.folds,
                              checkpoint_name=self.checkpoint_name, use_tta=self.use_tta, step=self.step,
                              save_probabilities=save_probabilities, device=self.device, workers=workers,
                              batch_tiles=self.batch_tiles)
        with self._lock:
            return predict_folder(inputs, output_folder, opts, progress=progress, model=self.model)

    def stream(self, items: Iterable, *, return_probabilities: bool = False, prefetch: int = 1,
               workers: int = 1) -> Iterator[Prediction]:
        """Predict many cases, overlapping reading/preprocessing, the network and the export; a generator.

        Parameters
        ----------
        items : iterable
            Each item is ``(image, properties)`` or ``(image, properties, previous_stage)``, a dict with ``image``
            and ``properties`` (and ``previous_stage``), or a list of channel files. Consumed lazily on a
            background thread.
        return_probabilities : bool
            Fill :attr:`Prediction.probabilities`.
        prefetch : int
            Preprocessed cases that may wait for the network.
        workers : int
            Export threads (and computed cases that may wait for them).

        Yields
        ------
        Prediction
            In input order.

        Raises
        ------
        NnfastError
            The first case that fails (the message names its index); the stream stops there.
        """
        from .overlap import StagePipeline

        out: queue.Queue = queue.Queue(maxsize=max(1, int(workers)))
        cancel = threading.Event()
        end = object()

        def prepare(entry):
            index, item = entry
            return self._prepare_item(item, index)

        def compute(entry, prepared):
            data, props = prepared
            return self._logits(data), props

        def finish(entry, computed):
            logits, props = computed
            seg, probs = self._export(logits, props, return_probabilities)
            return Prediction(entry[0], seg, probs, props)

        def on_outcome(outcome) -> None:
            while True:
                if cancel.is_set():
                    raise _Cancelled()
                try:
                    out.put(outcome, timeout=0.1)
                    return
                except queue.Full:
                    continue

        pipeline = StagePipeline(prepare, compute, finish, workers=workers, prefetch=prefetch,
                                 name="nnfast-stream")
        failure: list[BaseException] = []

        def run() -> None:
            try:
                pipeline.run(enumerate(items), on_outcome)
            except _Cancelled:
                pass
            except BaseException as e:  # reaches the consumer
                failure.append(e)
            while not cancel.is_set():
                try:
                    out.put(end, timeout=0.1)
                    return
                except queue.Full:
                    continue

        thread = threading.Thread(target=run, name="nnfast-stream", daemon=True)
        thread.start()
        waiting: dict[int, Prediction] = {}
        next_index = 0
        try:
            while True:
                outcome = out.get()
                if outcome is end:
                    break
                if not outcome.ok:
                    e = outcome.error
                    if _rewrappable(e):
                        raise type(e)(f"case {outcome.item[0]}: {e}") from e
                    raise e
                waiting[outcome.result.index] = outcome.result
                while next_index in waiting:
                    yield waiting.pop(next_index)
                    next_index += 1
            if failure:
                raise failure[0]
            for i in sorted(waiting):  # only if indices were skipped, which cannot happen; keep nothing back
                yield waiting.pop(i)
        finally:
            cancel.set()
            while True:
                try:
                    out.get_nowait()
                except queue.Empty:
                    break
            thread.join(timeout=30)


def _rewrappable(e: BaseException) -> bool:
    """Whether ``type(e)(message)`` rebuilds the exception (nnfast's errors and the builtin ones do)."""
    try:
        type(e)("x")
    except Exception:
        return False
    return not str(e).startswith("case ")
