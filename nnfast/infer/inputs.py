"""Cases to predict: listing raw images by nnU-Net's file naming, reading and checking them, preprocessing them
exactly as for training.

Naming (nnU-Net v2): the channels of case ``<case>`` are ``<case>_0000<ending>``, ``<case>_0001<ending>``, ... in one
folder; the prediction is written as ``<case><ending>``. Problems are reported per case (missing or extra channel
files, channels on different grids, non-finite voxels) so that one broken case does not stop the others.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import CaseNotFoundError, GeometryError, ImageReadError

__all__ = ["CaseInput", "list_cases", "cases_from_file_lists", "read_case", "preprocess_image", "preprocess_input"]

log = logging.getLogger(__name__)

#: Origin/direction tolerance between channel files (rtol = atol), as :mod:`nnfast.verify`.
GEOMETRY_TOL = 1e-4


@dataclass(frozen=True)
class CaseInput:
    """One case to predict.

    ``image_files`` are in channel order; ``problem`` is set when the case cannot be predicted (reported, not raised,
    by the listing); ``previous_stage_file`` is the first cascade stage's segmentation of this case.
    """

    case_id: str
    image_files: tuple[Path, ...]
    previous_stage_file: Path | None = None
    problem: str | None = None


def _case_pattern(file_ending: str) -> re.Pattern:
    return re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(file_ending) + r"$")


def list_cases(folder: Path | str, file_ending: str, num_channels: int,
               channel_names: Sequence[str] | None = None) -> list[CaseInput]:
    """Every case in ``folder`` by nnU-Net's naming, sorted by case id; problems are attached to the case.

    Parameters
    ----------
    folder : path
        Folder holding ``<case>_XXXX<file_ending>`` files (hidden files are ignored).
    file_ending : str
        e.g. ``.nii.gz`` (dataset.json ``file_ending``).
    num_channels : int
        Channels the model expects.
    channel_names : sequence of str, optional
        For messages (``channel 1 (T2)``).

    Raises
    ------
    CaseNotFoundError
        The folder does not exist or holds no file named like a case.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseNotFoundError(f"input folder `{folder}` does not exist")
    pat = _case_pattern(file_ending)
    found: dict[str, dict[int, Path]] = {}
    other = 0
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        m = pat.match(p.name)
        if m is None:
            other += p.name.endswith(file_ending)
            continue
        found.setdefault(m.group("case"), {})[int(m.group("ch"))] = p
    if other:
        log.warning("%d file(s) in %s end with %s but are not named <case>_XXXX%s; they are ignored", other, folder,
                    file_ending, file_ending)
    if not found:
        raise CaseNotFoundError(f"no image named <case>_0000{file_ending} in `{folder}` (nnU-Net naming: one file per "
                                f"channel, `<case>_XXXX{file_ending}`)")
    names = list(channel_names or [])
    cases = []
    for case_id in sorted(found):
        chans = found[case_id]
        problem = None
        missing = [c for c in range(num_channels) if c not in chans]
        extra = sorted(c for c in chans if c >= num_channels)
        if missing:
            c = missing[0]
            what = f"channel {c}" + (f" ({names[c]})" if c < len(names) else "")
            problem = (f"{what} file `{folder / f'{case_id}_{c:04d}{file_ending}'}` is missing; the model expects "
                       f"{num_channels} channel file(s) per case")
        elif extra:
            problem = (f"unexpected channel file `{chans[extra[0]]}`: the model expects {num_channels} channel(s) "
                       f"(_0000 .. _{num_channels - 1:04d})")
        files = tuple(chans[c] for c in sorted(chans) if c < num_channels)
        cases.append(CaseInput(case_id, files, problem=problem))
    return cases


def cases_from_file_lists(file_lists: Sequence[Sequence[Path | str]], file_ending: str,
                          num_channels: int | None = None) -> list[CaseInput]:
    """Cases from explicit channel file lists (nnU-Net's list-of-lists input); the case id is the first file's
    name without its image suffix and ``_XXXX``."""
    from ..io.image import file_suffix

    cases = []
    for files in file_lists:
        files = tuple(Path(f) for f in files)
        if not files:
            raise CaseNotFoundError("an input case has no image files")
        name = files[0].name
        suffix = file_ending if name.endswith(file_ending) else file_suffix(files[0])
        stem = name[: -len(suffix)] if suffix else name
        m = re.fullmatch(r"(.+)_\d{4}", stem)
        problem = None
        if num_channels is not None and len(files) != num_channels:
            problem = (f"{len(files)} image file(s) given ({', '.join(f'`{f}`' for f in files)}) but the model expects "
                       f"{num_channels} channel(s)")
        cases.append(CaseInput(m.group(1) if m else stem, files, problem=problem))
    return cases


def read_case(case: CaseInput):
    """Read and check the channel files of ``case``.

    Returns
    -------
    data : ndarray (c, z, y, x) float32, reader order
    geometry : ImageGeometry of the first channel

    Raises
    ------
    ImageReadError
        A file is missing, unreadable, or holds NaN/inf voxels.
    GeometryError
        Channels differ in shape, spacing, origin or direction.
    """
    from ..io.image import read_image

    arrays, geoms = [], []
    for p in case.image_files:
        a, g = read_image(p)
        arrays.append(a)
        geoms.append(g)
    ref, ref_file = geoms[0], case.image_files[0]
    for p, g in zip(case.image_files[1:], geoms[1:]):
        if g.shape != ref.shape or not np.allclose(g.spacing, ref.spacing):
            raise GeometryError(f"channel file `{p}` has shape {g.shape} and spacing {g.spacing} but `{ref_file}` has "
                                f"{ref.shape} and {ref.spacing}; all channels of a case must share one grid")
        for what in ("origin", "direction"):
            a, b = getattr(g, what), getattr(ref, what)
            if len(a) != len(b) or not np.allclose(a, b, rtol=GEOMETRY_TOL, atol=GEOMETRY_TOL):
                raise GeometryError(f"channel file `{p}` has {what} {tuple(round(v, 6) for v in a)} but `{ref_file}` "
                                    f"has {tuple(round(v, 6) for v in b)}; resample the channels onto one grid (or "
                                    "fix the header if they already share it)")
    n = sum(a.shape[0] for a in arrays)
    data = np.empty((n, *ref.shape), np.float32)
    c = 0
    for p, a in zip(case.image_files, arrays):
        np.copyto(data[c:c + a.shape[0]], a, casting="unsafe")
        block = data[c:c + a.shape[0]]
        if not np.isfinite(np.sum(block, dtype=np.float64)) and not np.isfinite(block).all():
            bad = int(block.size - np.count_nonzero(np.isfinite(block)))
            raise ImageReadError(f"image file `{p}` holds {bad} NaN/inf voxel(s); replace them (e.g. with the "
                                 "background value) before predicting")
        c += a.shape[0]
    return data, ref


def preprocess_image(data: np.ndarray, spacing: Sequence[float], plans, config_name: str,
                     foreground_labels: Sequence[int] = (), previous_stage: np.ndarray | None = None,
                     case_id: str | None = None, where: str = "the previous-stage segmentation"
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """Preprocess an image held in memory exactly as for training (:func:`nnfast.preprocess.pipeline.preprocess_arrays`).

    ``data`` is ``(c, z, y, x)`` in the reader's order with ``spacing`` in the same order (nnU-Net's readers'
    convention). For the cascade's second stage ``previous_stage`` (the first stage's label map, ``(z, y, x)`` or
    ``(1, z, y, x)``) is preprocessed as the label map (cropped, resampled like labels) and appended as one float32
    channel per foreground label (nnU-Net's ``convert_labelmap_to_one_hot``).

    Returns
    -------
    data : ndarray (c, x, y, z) float32, preprocessed, nnU-Net axis order
    properties : dict (:func:`preprocess_arrays`'s)
    """
    from ..preprocess.pipeline import preprocess_arrays

    seg = None
    if previous_stage is not None:
        seg = previous_stage if previous_stage.ndim == data.ndim else previous_stage[None]
        if seg.shape[1:] != data.shape[1:]:
            raise GeometryError(f"{where} has shape {tuple(seg.shape[1:])} but the image has {tuple(data.shape[1:])}")
    data, seg, props, _ = preprocess_arrays(data, seg, tuple(spacing), plans, config_name, case_id or "",
                                            with_class_locations=False, with_seg=previous_stage is not None)
    if previous_stage is not None:
        onehot = np.empty((len(foreground_labels), *data.shape[1:]), np.float32)
        for i, lab in enumerate(foreground_labels):
            np.equal(seg[0], lab, out=onehot[i], casting="unsafe")
        data = np.concatenate([data, onehot])
    return data, props


def preprocess_input(case: CaseInput, plans, config_name: str, foreground_labels: Sequence[int] = (),
                     read: tuple[np.ndarray, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read ``case`` and preprocess it exactly as for training (:func:`preprocess_image`; the cascade's second stage
    reads ``case.previous_stage_file``). ``read``: what :func:`read_case` returned for ``case``, when it was read
    already.

    Returns
    -------
    data : ndarray (c, x, y, z) float32, preprocessed, nnU-Net axis order
    properties : dict (:func:`preprocess_arrays`'s plus ``case_id``, ``geometry``, ``image_files``)
    """
    from ..io.image import read_label

    data, geom = read if read is not None else read_case(case)
    prev = None
    if case.previous_stage_file is not None:
        prev, _ = read_label(case.previous_stage_file)
    data, props = preprocess_image(data, geom.spacing, plans, config_name, foreground_labels, prev, case.case_id,
                                   where=f"previous-stage segmentation `{case.previous_stage_file}`")
    props["case_id"] = case.case_id
    props["geometry"] = geom.to_json()
    props["image_files"] = [str(p) for p in case.image_files]
    return data, props
