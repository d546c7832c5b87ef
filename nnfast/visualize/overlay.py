"""One case's overlay picture: choosing slices, windowing intensities, drawing labels over the image.

What a picture shows (nnU-Net's ``nnUNetv2_plot_overlay_pngs`` draws the first of these, with the most foreground):

- for each requested view (``axial``, ``coronal``, ``sagittal``) the slice with the most reference foreground (the
  prediction's when the reference has none, so that false positives show; the middle slice, said in the panel
  title, when neither has any);
- the image windowed to ``[lo, hi]`` (:func:`intensity_window`: CT by the fingerprint's 0.5/99.5 foreground
  percentiles, as ``CTNormalization`` clips; other schemes by the case's own 0.5/99.5 percentiles);
- the reference as one-voxel outlines and the prediction as a translucent fill, one fixed colour per label (or per
  region of a region dataset.json, painted in declaration order), named in a legend; label values that dataset.json
  does not declare in :data:`UNDECLARED_COLOR`;
- problems (a missing prediction, a geometry mismatch, undeclared values) in the title.

Axis order: volumes in reader order ``(z, y, x)`` (SimpleITK's array order, :mod:`nnfast.io.image`) with spacing
in the same order, mm; axial = axis 0 (a 2D image read as ``(1, y, x)`` has only this view). Pixels are drawn with
the physical aspect ratio of the slice. Coronal and sagittal panels put ``z = 0`` at the bottom.

matplotlib's Agg canvas is used directly (no pyplot, no global backend switch), imported inside
:func:`render_case` only.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GeometryError
from ..labels import LabelManager, LabelOrRegion, label_key

__all__ = ["PALETTE", "UNDECLARED_COLOR", "FILL_ALPHA", "VIEWS", "Target", "label_targets", "choose_slice",
           "intensity_window", "outline", "Panel", "OverlayPicture", "render_case"]

#: Colour of the i-th foreground label or region (declaration order), RGB 0-255; fixed, so the same label has the
#: same colour in every picture of a dataset.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240), (245, 130, 48),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128), (128, 128, 0),
)
#: Colour of label values that dataset.json does not declare.
UNDECLARED_COLOR = (255, 0, 255)
#: Opacity of the prediction's fill.
FILL_ALPHA = 0.45
VIEWS = ("axial", "coronal", "sagittal")
_VIEW_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
_AXIS_NAME = ("z", "y", "x")
_DPI = 100
_PANEL_IN = 4.5


@dataclass(frozen=True)
class Target:
    """What gets one colour: a foreground label, or a region (the union of its labels)."""

    key: LabelOrRegion
    name: str
    color: tuple[int, int, int]

    @property
    def members(self) -> tuple[int, ...]:
        return self.key if isinstance(self.key, tuple) else (self.key,)

    def mask(self, seg: np.ndarray) -> np.ndarray:
        m = self.members
        return seg == m[0] if len(m) == 1 else np.isin(seg, m)


def label_targets(labels: LabelManager) -> tuple[Target, ...]:
    """The coloured targets of a dataset: its foreground labels, or its foreground regions (declaration order)."""
    names = labels.names
    return tuple(Target(t, names.get(label_key(t), label_key(t)), PALETTE[i % len(PALETTE)])
                 for i, t in enumerate(labels.foreground_targets))


def choose_slice(foreground: np.ndarray | None, axis: int, shape: Sequence[int]) -> tuple[int, bool]:
    """``(index, found)``: the slice along ``axis`` with the most foreground voxels (the first of equals), or the
    middle slice with ``found=False`` when ``foreground`` is None or empty."""
    if foreground is not None and foreground.any():
        other = tuple(a for a in range(foreground.ndim) if a != axis)
        counts = foreground.sum(axis=other)
        return int(np.argmax(counts)), True
    return int(shape[axis]) // 2, False


def intensity_window(image: np.ndarray, scheme: str, stats=None) -> tuple[float, float]:
    """The displayed intensity range ``(lo, hi)`` of one channel.

    ``CTNormalization`` with the fingerprint's statistics (:class:`~nnfast.fingerprint.schema.IntensityStats`):
    ``(percentile_00_5, percentile_99_5)`` of the dataset's foreground, what nnU-Net's CT normalization clips to.
    Otherwise (z-score MRI, no fingerprint, ...): the 0.5 and 99.5 percentiles of the case's nonzero voxels (all
    voxels when every one is zero), over at most ~4 M voxels.
    """
    if scheme == "CTNormalization" and stats is not None:
        lo, hi = float(stats.percentile_00_5), float(stats.percentile_99_5)
    else:
        flat = np.asarray(image).ravel()
        step = max(1, flat.size // 4_000_000)
        v = flat[::step]
        v = v[np.isfinite(v)]
        nz = v[v != 0]
        v = nz if nz.size else v
        lo, hi = (float(x) for x in np.percentile(v, [0.5, 99.5])) if v.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The inner boundary of a 2D mask: voxels of ``mask`` within ``thickness`` (4-neighbour steps) of outside."""
    inner = mask.copy()
    for _ in range(max(1, thickness)):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


@dataclass(frozen=True)
class Panel:
    """Where one view landed in the PNG.

    ``box`` = ``(left, top, right, bottom)`` of the slice in PNG pixel coordinates (origin top left); the slice has
    ``shape`` = (rows, cols) voxels; ``row_up``: row 0 is at the bottom (coronal and sagittal).
    """

    view: str
    index: int
    found: bool
    shape: tuple[int, int]
    box: tuple[float, float, float, float]
    row_up: bool

    def pixel_of(self, row: int, col: int) -> tuple[int, int]:
        """PNG ``(x, y)`` of the centre of voxel ``(row, col)`` of the slice."""
        left, top, right, bottom = self.box
        fx = (col + 0.5) / self.shape[1]
        fy = (row + 0.5) / self.shape[0]
        if self.row_up:
            fy = 1.0 - fy
        return int(left + fx * (right - left)), int(top + fy * (bottom - top))


@dataclass(frozen=True)
class OverlayPicture:
    """A written overlay: its file, its title and where each view is (see :class:`Panel`)."""

    path: Path
    title: str
    panels: tuple[Panel, ...]


def _slice(vol: np.ndarray | None, axis: int, index: int) -> np.ndarray | None:
    return None if vol is None else np.take(vol, index, axis=axis)


def _aspect(spacing: Sequence[float], axis: int) -> float:
    rows, cols = [a for a in range(3) if a != axis]
    return float(spacing[rows]) / float(spacing[cols])


def _layers(ref2d, pred2d, targets, declared, thickness) -> tuple[np.ndarray | None, np.ndarray | None]:
    """RGBA layers (rows, cols, 4) in 0..1: the prediction's fill and the reference's outlines.

    Larger masks are painted first, so that regions nested in others (a tumour core in the whole tumour) stay
    visible; labels do not overlap, so for them the order does not matter."""
    fill = line = None
    if pred2d is not None:
        fill = np.zeros((*pred2d.shape, 4), np.float32)
        masks = [(t, t.mask(pred2d)) for t in targets]
        for t, m in sorted(masks, key=lambda tm: -int(tm[1].sum())):
            fill[m] = (*[c / 255 for c in t.color], FILL_ALPHA)
        bad = ~np.isin(pred2d, declared)
        fill[bad] = (*[c / 255 for c in UNDECLARED_COLOR], FILL_ALPHA)
    if ref2d is not None:
        line = np.zeros((*ref2d.shape, 4), np.float32)
        masks = [(t, t.mask(ref2d)) for t in targets]
        for t, m in sorted(masks, key=lambda tm: -int(tm[1].sum())):
            line[outline(m, thickness)] = (*[c / 255 for c in t.color], 1.0)
        bad = outline(~np.isin(ref2d, declared), thickness)
        line[bad] = (*[c / 255 for c in UNDECLARED_COLOR], 1.0)
    return fill, line


def render_case(
    path: Path | str,
    image: np.ndarray,
    spacing: Sequence[float],
    window: tuple[float, float],
    labels: LabelManager,
    *,
    reference: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    title: str = "",
    problems: Sequence[str] = (),
    views: Sequence[str] = ("axial",),
) -> OverlayPicture:
    """Draw one case and write it as a PNG (atomically).

    Parameters
    ----------
    path : path
        The PNG to write.
    image : ndarray (z, y, x), float
        One channel, reader order.
    spacing : 3 floats
        Voxel spacing in the same order, mm.
    window : (lo, hi)
        Intensities shown black and white (:func:`intensity_window`).
    labels : LabelManager
        The dataset's labels (colours, names, regions, which values are declared).
    reference, prediction : ndarray (z, y, x), integer, optional
        Label maps on the image's grid (the caller checks the geometry); the ignore label is not drawn.
    title : str
        First line of the title (the case and where it comes from).
    problems : sequence of str
        Lines added to the title in red.
    views : sequence of ``"axial"``, ``"coronal"``, ``"sagittal"``
        A 2D image (one slice along z) has the axial view only.

    Returns
    -------
    OverlayPicture

    Raises
    ------
    GeometryError
        ``image`` is not 3D.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ..io.atomic import atomic_target

    image = np.asarray(image)
    if image.ndim != 3:
        raise GeometryError(f"an overlay needs one (z, y, x) volume, got shape {image.shape}")
    views = [v for v in views if v in _VIEW_AXIS] or ["axial"]
    if image.shape[0] == 1:
        views = ["axial"]
    targets = label_targets(labels)
    declared = np.asarray(labels.declared_values)
    foreground, fg_of = None, "foreground"
    for seg, what in ((reference, "foreground"), (prediction, "predicted foreground")):
        if seg is not None:
            fg = seg > 0
            if labels.ignore_label is not None:
                fg &= seg != labels.ignore_label
            if fg.any():
                foreground, fg_of = fg, what
                break
    lo, hi = window

    fig_w = _PANEL_IN * len(views) + 0.2
    problems = [line for p in problems for line in textwrap.wrap(p, width=int(fig_w * 14))]
    legend_rows = math.ceil((len(targets) + 1) / 4)
    title_lines = 2 + len(problems)
    top_in, bottom_in = 0.28 * title_lines + 0.35, 0.3 * legend_rows + 0.2
    fig_h = _PANEL_IN + top_in + bottom_in
    fig = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.1 / fig_w, right=1 - 0.1 / fig_w, top=1 - top_in / fig_h, bottom=bottom_in / fig_h,
                        wspace=0.05)
    axes = fig.subplots(1, len(views), squeeze=False)[0]
    slices = []
    for ax, view in zip(axes, views):
        axis = _VIEW_AXIS[view]
        index, found = choose_slice(foreground, axis, image.shape)
        img2d = _slice(image, axis, index).astype(np.float32)
        gray = np.clip((img2d - lo) / (hi - lo), 0, 1)
        gray[~np.isfinite(gray)] = 0
        rows, cols = gray.shape
        aspect = _aspect(spacing, axis)
        # outlines at least about one screen pixel wide where a voxel is smaller than a pixel
        min_voxel_px = _PANEL_IN * _DPI / max(cols, rows * aspect) * min(1.0, aspect)
        thickness = max(1, int(math.ceil(1.0 / min_voxel_px - 0.25)))
        fill, line = _layers(_slice(reference, axis, index), _slice(prediction, axis, index), targets, declared,
                             thickness)
        origin = "upper" if view == "axial" else "lower"
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest", origin=origin, aspect=aspect)
        for layer in (fill, line):
            if layer is not None:
                ax.imshow(layer, interpolation="nearest", origin=origin, aspect=aspect)
        where = f"most {fg_of}" if found else "no foreground: middle slice"
        ax.set_title(f"{view} {_AXIS_NAME[axis]} = {index} of {image.shape[axis]} ({where})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        slices.append((ax, view, index, found, (rows, cols), origin == "lower"))

    what = []
    if reference is not None:
        what.append("reference: outlines")
    if prediction is not None:
        what.append("prediction: translucent fill")
    subtitle = ", ".join(what) if what else "no labels to show"
    fig.text(0.5, 1 - 0.12 / fig_h, title, ha="center", va="top", fontsize=11, weight="bold")
    fig.text(0.5, 1 - 0.42 / fig_h, subtitle + f"; window [{lo:.4g}, {hi:.4g}]", ha="center", va="top", fontsize=9)
    for i, p in enumerate(problems):
        fig.text(0.5, 1 - (0.70 + 0.28 * i) / fig_h, p, ha="center", va="top", fontsize=9, color="#c00000")
    handles = [Patch(facecolor=[c / 255 for c in t.color], edgecolor="black",
                     label=f"{t.name} ({', '.join(map(str, t.members))})") for t in targets]
    shown = [s for s in (reference, prediction) if s is not None]
    if any(np.any(~np.isin(s, declared)) for s in shown):
        handles.append(Patch(facecolor=[c / 255 for c in UNDECLARED_COLOR], edgecolor="black",
                             label="not in dataset.json"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=9, frameon=False)

    fig.canvas.draw()
    height = fig.bbox.height
    panels = []
    for ax, view, index, found, shape, row_up in slices:
        b = ax.get_window_extent()
        panels.append(Panel(view, index, found, shape, (b.x0, height - b.y1, b.x1, height - b.y0), row_up))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    full_title = "\n".join([title, *problems])
    return OverlayPicture(path, full_title, tuple(panels))
