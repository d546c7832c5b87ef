"""``nnfast predict``: segment raw images with a trained configuration (nnU-Net v2's ``nnUNetv2_predict``).

Per case: read the channel files (:mod:`nnfast.infer.inputs`), preprocess exactly as for training, predict the
logits with every fold by sliding window (:mod:`nnfast.infer.sliding_window`) and average them (nnU-Net's logit
averaging), then export them to the original geometry (:mod:`nnfast.infer.export`) and write ``<case><ending>`` with
the input's spacing, origin and direction.

Concurrency (:class:`~nnfast.infer.overlap.StagePipeline`): a background thread reads and preprocesses the next case
while the current one is predicted (at most one case waits), and exports run on ``workers`` threads while the next
cases are predicted (at most ``workers`` exports are pending, which bounds memory). Threads, not processes: the preprocessing and export kernels and torch
release the GIL, and the logits (``C x V`` float32) are not copied between processes as nnU-Net's export pool does.

Failures are per case: a case whose files are missing, unreadable, on different grids or hold NaNs is reported with
the reason and the others are still written (:class:`PredictionReport`; the CLI exits non-zero). Every output is
written atomically, so ``continue_prediction`` can trust an existing file; ``num_parts``/``part_id`` split the sorted
case list as nnU-Net does (``cases[part_id::num_parts]``).

Model folders written by ``nnUNetv2_train`` are read as they are (:func:`nnfast.infer.model.load_model`).

Cascade (``3d_cascade_fullres``): the previous stage (``3d_lowres``) is predicted first, into
``<output>/previous_stage_<config>/`` unless ``previous_stage_folder`` holds its predictions; its segmentations are
fed to the second stage as one extra input channel per foreground label.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .. import layout
from ..device import resolve_device
from ..errors import CaseNotFoundError, NnfastError, PlanError, UsageError
from .inputs import CaseInput, cases_from_file_lists, list_cases, preprocess_input, read_case
from .model import TrainedModel, load_model, model_folder_for, read_plans_and_dataset_json
from .overlap import Outcome, StagePipeline

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["PredictionReport", "PredictOptions", "predict_folder", "predict_logits"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


@dataclass
class PredictionReport:
    """What :func:`predict_folder` did.

    Attributes
    ----------
    written : dict
        case id -> output file.
    failed : dict
        case id -> reason (one line, naming the file).
    seconds : dict
        Wall time of the stages summed over cases: ``preprocess``, ``predict``, ``export``, and ``total``.
    skipped : list
        Case ids whose outputs already existed (``continue_prediction``).
    """

    output_folder: Path
    written: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        lines = [f"{len(self.written)} case(s) written to {self.output_folder}"
                 + (f", {len(self.skipped)} already done" if self.skipped else "")
                 + (f", {len(self.failed)} failed:" if self.failed else "")]
        lines += [f"  {cid}: {msg}" for cid, msg in sorted(self.failed.items())]
        if self.seconds:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"output_folder": str(self.output_folder), "written": {k: str(v) for k, v in self.written.items()},
                "failed": dict(self.failed), "seconds": dict(self.seconds), "skipped": list(self.skipped)}


def _default_batch_tiles(ndim: int, device) -> int:
    if ndim == 2:
        return 8 if device.type == "cuda" else 4
    return 2 if device.type == "cuda" else 1


def predict_logits(model: TrainedModel, data: np.ndarray, network=None, *, use_tta: bool = True,
                   step: float = 0.5, device="auto", batch_tiles: int | None = None) -> np.ndarray:
    """Fold-averaged logits ``(C, x, y, z)`` float32 of one preprocessed case (nnU-Net's
    ``predict_logits_from_preprocessed_data``: the folds' logits are summed, then divided by their number).

    ``network`` is reused when given (its weights are replaced fold by fold).
    """
    from .sliding_window import predict_sliding_window

    dev = resolve_device(device)
    conf = model.configuration
    net = network if network is not None else model.build_network()
    bt = batch_tiles or _default_batch_tiles(conf.ndim, dev)
    out = np.zeros((model.num_classes, *data.shape[1:]), np.float32)
    for w in model.weights:
        net.load_state_dict(w)
        predict_sliding_window(net, data, conf.patch_size, model.num_classes, step=step, use_gaussian=True,
                               mirror_axes=model.mirror_axes if use_tta else None, device=dev, batch_tiles=bt,
                               out=out)
    if len(model.weights) > 1:
        out /= len(model.weights)
    return out


def _model_folder(options: "PredictOptions") -> Path:
    if options.model_folder is not None:
        return Path(options.model_folder)
    if options.task is None:
        raise PlanError("pass a model folder, or a task (and a configuration, default 3d_fullres)")
    from ..settings import resolve_settings

    settings = options.settings or resolve_settings()
    return model_folder_for(settings.require("results"), options.task, options.config or "3d_fullres",
                            trainer=options.trainer, plans_identifier=options.plans_identifier)


def _resolve_model(options: "PredictOptions") -> TrainedModel:
    return load_model(_model_folder(options), options.folds, options.checkpoint_name, config_name=options.config)


@dataclass(frozen=True)
class PredictOptions:
    """What :func:`predict_folder` predicts with and how (the ``nnfast predict`` flags).

    Attributes
    ----------
    model_folder : path, optional
        Trainer folder; default ``<results>/<Dataset>/nnfastTrainer__nnfast_plans__<config>`` of ``task``
        (:func:`nnfast.layout.trainer_folder`).
    task, config : optional
        Dataset and configuration, used to find the model folder (and, for ``config``, to check it).
    trainer, plans_identifier : str
        With ``task``: the ``<trainer>__<plans>__<config>`` folder to use (e.g. ``nnUNetTrainer``/``nnUNetPlans`` for
        a model trained by nnU-Net; default nnfast's).
    settings : Settings, optional
        Data roots (default: resolved from the environment).
    folds : sequence, optional
        Folds to ensemble (default: every fold holding the checkpoint).
    checkpoint_name : str
        ``checkpoint_final``, ``checkpoint_best`` or ``checkpoint_latest``.
    use_tta : bool
        Mirroring test-time augmentation over the axes training allowed.
    step : float
        Tile step as a fraction of the patch size (nnU-Net: 0.5).
    save_probabilities : bool
        Also write ``<case>.npz`` (``probabilities`` (C, z, y, x) float16, softmax) and ``<case>.json`` (the case's
        properties).
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (:func:`nnfast.device.resolve_device`).
    workers : int
        Export threads (and cases exported concurrently).
    batch_tiles : int, optional
        Tiles per forward pass (default: 1 for 3D on CPU, 2 on CUDA; 2D: 4 / 8).
    previous_stage_folder : path, optional
        Cascade only: folder with the previous stage's ``<case><ending>`` segmentations.
    previous_stage_model_folder : path, optional
        Cascade only: trainer folder of the previous stage (default: beside the model folder).
    continue_prediction : bool
        Skip cases whose outputs exist (nnU-Net's ``--continue_prediction``): the segmentation, and with
        ``save_probabilities`` the ``.npz``/``.json`` too. Outputs are written atomically (temporary name, then
        rename), so an existing file is a complete one.
    num_parts, part_id : int
        Predict only ``cases[part_id::num_parts]`` of the sorted case list (nnU-Net's ``-num_parts``/``-part_id``:
        one folder split over several GPUs or machines).
    """

    model_folder: Path | str | None = None
    task: str | int | None = None
    config: str | None = None
    trainer: str = layout.TRAINER_NAME
    plans_identifier: str = layout.PLANS_IDENTIFIER
    settings: Settings | None = None
    folds: Sequence | None = None
    checkpoint_name: str = "checkpoint_final"
    use_tta: bool = True
    step: float = 0.5
    save_probabilities: bool = False
    device: Any = "auto"
    workers: int = 1
    batch_tiles: int | None = None
    previous_stage_folder: Path | str | None = None
    previous_stage_model_folder: Path | str | None = None
    continue_prediction: bool = False
    num_parts: int = 1
    part_id: int = 0


def _select_part(cases: list[CaseInput], opts: PredictOptions) -> list[CaseInput]:
    if opts.num_parts < 1 or not 0 <= opts.part_id < opts.num_parts:
        raise UsageError(f"part_id must be in 0 .. num_parts - 1 and num_parts >= 1, got part_id={opts.part_id}, "
                         f"num_parts={opts.num_parts}")
    return sorted(cases, key=lambda c: c.case_id)[opts.part_id::opts.num_parts]


def _outputs_complete(out_dir: Path, case_id: str, ending: str, save_probabilities: bool) -> bool:
    files = [out_dir / f"{case_id}{ending}"]
    if save_probabilities:
        files += [out_dir / f"{case_id}.npz", out_dir / f"{case_id}.json"]
    return all(f.is_file() for f in files)


def _cases_to_predict(inputs, out_dir: Path, ending: str, num_channels: int, channel_names: Sequence[str],
                      opts: PredictOptions) -> tuple[list[CaseInput], list[str]]:
    """(the cases of this part still to predict, the ids skipped because their outputs exist)."""
    if isinstance(inputs, (str, Path)):
        cases = list_cases(Path(inputs), ending, num_channels, list(channel_names))
    else:
        cases = cases_from_file_lists(inputs, ending, num_channels)
    cases = _select_part(cases, opts)
    done_ids: set[str] = set()
    if opts.continue_prediction:
        done_ids = {c.case_id for c in cases if _outputs_complete(out_dir, c.case_id, ending, opts.save_probabilities)}
    return [c for c in cases if c.case_id not in done_ids], sorted(done_ids)


class _FirstCase:
    """The first case read and preprocessed on a thread while the calling thread imports torch and loads the weights
    (the two took ~2 s each, one after the other, before a single case reached the network).

    It is prepared with what the model folder says without torch (plans, the configuration named by the options or
    the folder); :meth:`take` hands it over only when the loaded model agrees, so the pipeline prepares the case
    itself, exactly as before, whenever anything differs or failed.
    """

    def __init__(self, case: CaseInput, plans, config_name: str, kernels_ready: threading.Event | None = None,
                 listing: tuple | None = None) -> None:
        self.case, self.plans, self.config_name = case, plans, config_name
        #: ``((ending, channels, channel names), (cases, skipped))``: the input folder as listed for the model folder's
        #: plans, handed to the main path by :meth:`listing_for` instead of listing (and stat-ing outputs) again
        self._listing = listing
        self.seconds = 0.0
        self._result: tuple | None = None
        self._kernels_ready = kernels_ready
        self._thread = threading.Thread(target=self._prepare, name="nnfast-predict-first-case", daemon=True)
        self._thread.start()

    def _prepare(self) -> None:
        t0 = time.perf_counter()
        try:
            read = read_case(self.case)
            if self._kernels_ready is not None:  # preprocessing's modules are being imported on the other thread
                self._kernels_ready.wait()
            self._result = preprocess_input(self.case, self.plans, self.config_name, read=read)
        except Exception:  # the pipeline prepares the case again and reports the error as usual
            self._result = None
        self.seconds = time.perf_counter() - t0

    def listing_for(self, ending: str, num_channels: int, channel_names: list) -> tuple | None:
        """``(cases, skipped)`` as :func:`_cases_to_predict` gives them for the loaded model, when the early listing
        used the same file ending and channels (else None: list again). Handed over once."""
        listing, self._listing = self._listing, None
        if listing is None or listing[0] != (ending, num_channels, list(channel_names)):
            return None
        return listing[1]

    def take(self, case: CaseInput, model: TrainedModel) -> tuple | None:
        """``(data, properties)`` of ``case`` as :func:`preprocess_input` gives them for ``model``, or None (waits for
        the thread; hands the result over once)."""
        self._thread.join()
        result, self._result = self._result, None
        if result is None or case != self.case or model.config_name != self.config_name or model.plans != self.plans:
            return None
        return result


def _start_first_case(inputs, out_dir: Path, opts: PredictOptions) -> _FirstCase | None:
    """Start preparing the first case before the model is loaded; None where that cannot be decided without torch
    (the folder or plans are unreadable, a cascade's second stage, nothing to predict): then the usual path runs and
    reports any problem."""
    try:
        folder = _model_folder(opts)
        plans, dataset_json = read_plans_and_dataset_json(folder)
        config_name = opts.config or folder.name.rsplit("__", 1)[-1]  # load_model's choice unless a checkpoint differs
        if plans.configuration(config_name).previous_stage is not None:
            return None
        key = (str(dataset_json.get("file_ending", ".nii.gz")), plans.num_input_channels,
               list(plans.channel_names.values()))
        cases, skipped = _cases_to_predict(inputs, out_dir, key[0], key[1], key[2], opts)
        case = next((c for c in cases if c.problem is None), None)
        if case is None:
            return None
        # what the thread imports, imported here first: never two threads importing at once (which can hand one of
        # them a half-initialized module). The thread reads the files while this one imports the preprocessing
        # kernels (Numba), then preprocesses while this one imports torch.
        import SimpleITK  # noqa: F401

        from ..io import image, nifti_integrity  # noqa: F401
    except Exception:
        return None
    kernels_ready = threading.Event()
    first = _FirstCase(case, plans, config_name, kernels_ready, listing=(key, (cases, skipped)))
    try:
        from ..native._jit import load_dispatch_machinery
        from ..preprocess import pipeline  # noqa: F401

        load_dispatch_machinery()
    except Exception:  # the thread's preprocessing then fails too, and the pipeline reports it
        pass
    kernels_ready.set()
    return first


def predict_folder(
    inputs: Path | str | Sequence[Sequence[Path | str]],
    output_folder: Path | str,
    options: PredictOptions | None = None,
    *,
    progress: Progress | None = None,
    logits_hook: Callable[[str, np.ndarray, dict], None] | None = None,
    model: TrainedModel | None = None,
) -> PredictionReport:
    """Predict every case of ``inputs`` and write ``<case><ending>`` to ``output_folder``.

    Parameters
    ----------
    inputs : path or list of lists of paths
        A folder of ``<case>_XXXX<ending>`` files, or the channel files of each case.
    output_folder : path
        Created if needed. Segmentations ``<case><ending>``; with ``save_probabilities`` also ``<case>.npz`` and
        ``<case>.json``.
    options : PredictOptions, optional
        The model and how to predict (default: ``PredictOptions()``, which needs ``model_folder`` or ``task``).
    progress : callable, optional
        ``progress(done, total, case_id)`` after each case.
    logits_hook : callable, optional
        ``logits_hook(case_id, logits, properties)`` in an export thread after the case is written, with the fold
        average of the logits ``(C, x, y, z)`` float32 on the preprocessed grid (the final validation of a cascade's
        first stage writes the next stage's inputs with it); an exception fails that case.
    model : TrainedModel, optional
        An already loaded model (:class:`nnfast.infer.api.Predictor` loads once); default: loaded from ``options``.

    Returns
    -------
    PredictionReport
        Written and failed cases; also saved as ``<output>/nnfast_predict.json``.

    Raises
    ------
    NnfastError
        Problems that concern every case: model or input folder missing, plans inconsistent.
    """
    from ..io.atomic import write_json_atomic

    opts = options if options is not None else PredictOptions()
    t_start = time.perf_counter()
    _select_part([], opts)  # a bad part is an error before anything is loaded or written
    out_dir = Path(output_folder)
    # the first case is read and preprocessed while torch is imported and the weights are loaded
    first = _start_first_case(inputs, out_dir, opts) if model is None else None
    resolve_device(opts.device)  # a bad device is an error before anything is written
    model = model if model is not None else _resolve_model(opts)
    out_dir.mkdir(parents=True, exist_ok=True)
    ending = model.file_ending
    report = PredictionReport(out_dir)
    channel_names = list(model.plans.channel_names.values())
    listed = first.listing_for(ending, model.num_image_channels, channel_names) if first is not None else None
    cases, report.skipped = listed if listed is not None else _cases_to_predict(
        inputs, out_dir, ending, model.num_image_channels, channel_names, opts)
    if report.skipped:
        log.info("--continue: %d case(s) already predicted, skipped", len(report.skipped))

    conf = model.configuration
    if conf.previous_stage is not None:
        cases = _attach_previous_stage(cases, model, out_dir, opts, report)
    for c in cases:
        if c.problem is not None:
            report.failed[c.case_id] = c.problem
    todo = [c for c in cases if c.problem is None]
    log.info("predicting %d case(s) with %s (%s, folds %s, TTA %s) into %s", len(todo), model.folder.name,
             model.config_name, list(model.folds), opts.use_tta, out_dir)
    _run(model, todo, out_dir, ending, report, opts, progress=progress, logits_hook=logits_hook, first=first)
    report.seconds["total"] = time.perf_counter() - t_start
    write_json_atomic(out_dir / "nnfast_predict.json", {
        "model_folder": str(model.folder), "configuration": model.config_name, "folds": list(model.folds),
        "checkpoint": opts.checkpoint_name, "use_tta": opts.use_tta, "step": opts.step, **report.to_json()})
    if report.failed:
        log.error("%d case(s) failed: %s", len(report.failed), ", ".join(sorted(report.failed)))
    return report


def _attach_previous_stage(cases, model, out_dir, opts: PredictOptions, report) -> list[CaseInput]:
    prev = model.configuration.previous_stage
    ending = model.file_ending
    prev_folder = opts.previous_stage_folder
    if prev_folder is None:
        prev_model = Path(opts.previous_stage_model_folder) if opts.previous_stage_model_folder \
            else layout.sibling_stage_folder(model.folder, prev)
        if not prev_model.is_dir():
            raise CaseNotFoundError(
                f"configuration `{model.config_name}` is the second stage of a cascade and needs the `{prev}` "
                f"predictions: no model folder `{prev_model}` (train `{prev}` first) and no previous-stage "
                "predictions given (previous_stage_folder / --prev-stage-folder)")
        prev_folder = out_dir / f"previous_stage_{prev}"
        lists = [list(c.image_files) for c in cases if c.problem is None]
        log.info("cascade: predicting the %s stage into %s", prev, prev_folder)
        sub = predict_folder(lists, prev_folder, PredictOptions(
            model_folder=prev_model, folds=opts.folds, checkpoint_name=opts.checkpoint_name, use_tta=opts.use_tta,
            step=opts.step, device=opts.device, workers=opts.workers, batch_tiles=opts.batch_tiles))
        for cid, msg in sub.failed.items():
            report.failed.setdefault(cid, f"previous stage ({prev}): {msg}")
    prev_folder = Path(prev_folder)
    out = []
    for c in cases:
        if c.problem is not None or c.case_id in report.failed:
            out.append(c if c.problem is not None else CaseInput(c.case_id, c.image_files, problem="skipped"))
            continue
        f = prev_folder / f"{c.case_id}{ending}"
        problem = None if f.is_file() else f"previous-stage segmentation `{f}` is missing"
        out.append(CaseInput(c.case_id, c.image_files, previous_stage_file=f, problem=problem))
    return [c for c in out if c.problem != "skipped"]


def _run(model: TrainedModel, cases: list[CaseInput], out_dir: Path, ending: str, report: PredictionReport,
         opts: PredictOptions, *, progress: Progress | None, logits_hook=None, first: _FirstCase | None = None) -> None:
    """Preprocess (a background thread) -> predict (this thread) -> export (``workers`` threads), overlapped and
    bounded by :class:`~nnfast.infer.overlap.StagePipeline`; ``first``: the first case, already being prepared."""
    import torch

    from ..native._jit import available_cores
    from .export import export_prediction

    dev = resolve_device(opts.device)
    workers = max(1, int(opts.workers))
    # at most len(cases) exports run at once: one case exports with every core
    export_threads = max(1, available_cores() // max(1, min(workers, len(cases))))
    fg = model.labels.foreground_labels
    net = model.build_network()

    early: list = [first] if first is not None else []
    early_seconds = [0.0]  # the first case's preprocessing time that the pipeline did not see (it only waited)

    def preprocess(case: CaseInput):
        if early:
            t0 = time.perf_counter()
            prefetched = early.pop()
            got = prefetched.take(case, model)
            if got is not None:
                early_seconds[0] = prefetched.seconds - (time.perf_counter() - t0)
                return got
        return preprocess_input(case, model.plans, model.config_name, fg)

    def predict(case: CaseInput, prepared):
        data, props = prepared
        t0 = time.perf_counter()
        logits = predict_logits(model, data, net, use_tta=opts.use_tta, step=opts.step, device=dev,
                                batch_tiles=opts.batch_tiles)
        log.info("%s: predicted %s in %.1f s", case.case_id, tuple(logits.shape[1:]), time.perf_counter() - t0)
        return logits, props

    def export(case: CaseInput, predicted) -> Path:
        logits, props = predicted
        path = export_prediction(logits, props, model.plans, model.config_name, out_dir / f"{case.case_id}{ending}",
                                 save_probabilities=opts.save_probabilities,
                                 regions_class_order=model.labels.regions_class_order, threads=export_threads)
        if logits_hook is not None:
            logits_hook(case.case_id, logits, props)
        return path

    done = itertools.count(1)

    def record(outcome: Outcome) -> None:
        cid = outcome.item.case_id
        if outcome.error is None:  # outcome.ok
            report.written[cid] = outcome.result
        else:
            report.failed[cid] = _reason(outcome.error)
        n = next(done)
        if progress is not None:
            progress(n, len(cases), cid)

    pipeline = StagePipeline(preprocess, predict, export, workers=workers, prefetch=1, name="nnfast-predict")
    torch_threads = torch.get_num_threads()
    if dev.type == "cpu":  # leave a core to the preprocessing/export threads: OpenMP barriers stall when oversubscribed
        # (one case: nothing is preprocessed or exported while the network runs, so it gets every core)
        spare = 1 if len(cases) > 1 else 0
        torch.set_num_threads(max(1, min(torch_threads, available_cores() - spare)))
    try:
        pipeline.run(cases, record)
    finally:
        torch.set_num_threads(torch_threads)
    secs = pipeline.seconds
    report.seconds.update({"preprocess": secs["prepare"] + early_seconds[0], "predict": secs["compute"],
                           "export": secs["finish"]})


def _reason(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    return msg if isinstance(e, NnfastError) else f"{type(e).__name__}: {msg}"

