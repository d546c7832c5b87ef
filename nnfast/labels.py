"""The one owner of a dataset's labels: what ``dataset.json``'s ``labels`` mean, everywhere nnfast reads them.

nnU-Net rule (``LabelManager`` in ``nnunetv2/utilities/label_handling/label_handling.py``, v2.8.1): ``labels`` maps a
name to an integer label, or to a list of labels for a *region* (the union of those labels). A dataset has regions
when any entry lists more than one label; the network then has one sigmoid output per foreground region and
``regions_class_order`` says which label each region channel paints (later channels overwrite earlier ones where
their probability exceeds 0.5). Otherwise the network has one softmax output per label, background included, and
the segmentation is the argmax. The entry ``ignore`` (one integer, the highest label) marks unannotated voxels: it
is neither a label nor a region, no output predicts it, and it is excluded from losses and metrics.

:class:`LabelManager` (frozen, NumPy only, cheap to import) is built once, from a ``dataset.json``
(:meth:`LabelManager.from_dataset_json`) or from the plans and the dataset.json's ``regions_class_order``
(:meth:`LabelManager.from_plans`), and answers every question about labels: ``all_labels``, ``foreground_labels``,
``foreground_regions``, ``num_segmentation_heads``, the ignore label, names, the segmentation dtype, the class
locations preprocessing collects, painting probabilities/logits into a segmentation, and the training targets of a
label map (one-hot labels or region channels). :func:`label_problems` is the one place where the ``labels`` of a
``dataset.json`` are validated.

Construction is lenient about ``regions_class_order``: evaluating a region dataset does not need it. What paints a
segmentation or sizes a network calls :meth:`LabelManager.check_regions_class_order` (the painting methods do),
which raises :class:`~nnfast.errors.PlanError` when it is missing or has the wrong length.

Axis order: channel-first arrays ``(C, *spatial)``; the spatial axes are whatever the caller uses (nnU-Net's
``(x, y, z)`` after transposition in training and export, the reader's ``(z, y, x)`` for files); nothing here
depends on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union, cast

import numpy as np

from .errors import DatasetError, GeometryError, PlanError

__all__ = ["LabelOrRegion", "LabelManager", "label_key", "parse_label_key", "label_problems"]

#: A label (int) or a region (tuple of the labels whose union it is).
LabelOrRegion = Union[int, tuple[int, ...]]


# --------------------------------------------------------------------------------------------- JSON keys
def label_key(t: LabelOrRegion) -> str:
    """nnU-Net's JSON key of a label or region: ``str(1)`` -> ``"1"``, ``str((1, 2))`` -> ``"(1, 2)"``."""
    return str(t)


def parse_label_key(key: str) -> LabelOrRegion:
    """Inverse of :func:`label_key` (nnU-Net's ``key_to_label_or_region``)."""
    try:
        return int(key)
    except ValueError:
        parts = key.replace("(", "").replace(")", "").split(",")
        return tuple(int(p) for p in parts if p.strip())


# --------------------------------------------------------------------------------------------- validation
#: ``label_problems(regions_class_order=...)`` left out: the order is not checked (the dataset.json's is passed).
_NOT_GIVEN: Any = object()


def label_problems(labels: Any, *, check_numbering: bool = True,
                   regions_class_order: Any = _NOT_GIVEN) -> list[str]:
    """Every problem with the ``labels`` entry of a dataset.json (empty list when fine).

    Labels are non-negative integers (lists of them for regions); background is 0; the ignore label is the
    highest. Without regions the labels other than ``ignore`` are consecutive from 0. With regions (an entry lists
    several labels, nnU-Net's ``has_regions``; ``documentation/region_based_training.md``) the plain labels need not
    be consecutive (``{"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}``);
    instead no region may contain background 0 or repeat another, and ``regions_class_order`` (dataset.json's, passed
    here; None when the dataset.json has none) must list one label per foreground region, each a label the regions
    use. Left out, ``regions_class_order`` is not checked.

    ``check_numbering=False`` checks the entries only (not background, consecutiveness, the ignore label and the
    regions): :func:`nnfast.io.dataset.dataset_json_problems` does so when the dataset.json has other problems
    already.
    """
    if not isinstance(labels, dict) or not labels:
        return [f"`labels` must be a non-empty object such as {{\"background\": 0, \"organ\": 1}}, found {labels!r}"]
    problems = []
    for k, v in labels.items():
        vals = v if isinstance(v, (list, tuple)) else [v]
        if not vals or not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            problems.append(f"label `{k}` must map to an integer (or a list of integers for a region), found {v!r}")
        elif any(x < 0 for x in vals):
            problems.append(f"label `{k}` is negative ({v!r}); labels must be non-negative integers")
    if problems or not check_numbering:
        return problems
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values()):
        return _region_problems(labels, regions_class_order)
    plain = sorted(int(v) for k, v in labels.items() if not isinstance(v, (list, tuple)) and k != "ignore")
    if 0 not in plain and not any(isinstance(v, (list, tuple)) for v in labels.values()):
        problems.append("`labels` must declare background as 0")
    elif plain and plain != list(range(plain[0], plain[0] + len(plain))):
        problems.append(f"labels must be consecutive integers starting at 0, found {plain}")
    ign = labels.get("ignore")
    if isinstance(ign, int) and plain and ign <= max(plain):
        problems.append(f"the ignore label ({ign}) must be the highest label (others go up to {max(plain)})")
    return problems


def _region_problems(labels: dict, regions_class_order: Any) -> list[str]:
    """:func:`label_problems` of a region dataset (entries already checked to be non-negative integers)."""
    problems = []
    ign = labels.get("ignore")
    if isinstance(ign, (list, tuple)):
        return [f"the ignore label must be one integer, found {ign!r}"]
    entries = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in labels.items() if k != "ignore"}
    if (0,) not in entries.values():
        problems.append("`labels` must declare background as 0 (e.g. \"background\": 0)")
    used = sorted({x for m in entries.values() for x in m})
    if isinstance(ign, int) and used and ign <= max(used):
        problems.append(f"the ignore label ({ign}) must be the highest label (the regions use up to {max(used)})")
    regions = {k: m for k, m in entries.items() if m != (0,)}
    seen: dict[frozenset, str] = {}
    for k, m in regions.items():
        if 0 in m:
            problems.append(f"region `{k}` {list(m)} contains background 0; a region is a union of foreground labels")
        if frozenset(m) in seen:
            problems.append(f"regions `{seen[frozenset(m)]}` and `{k}` are the same labels {sorted(set(m))}")
        seen.setdefault(frozenset(m), k)
    rco = regions_class_order
    if rco is _NOT_GIVEN:
        return problems
    if rco is None:
        problems.append(f"the labels define {len(regions)} regions ({', '.join(regions)}) but `regions_class_order` "
                        f"is missing; add e.g. \"regions_class_order\": {[min(m) for m in regions.values()]} (the "
                        "label each region paints, in painting order)")
    elif not isinstance(rco, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in rco):
        problems.append(f"`regions_class_order` must be a list of integer labels, found {rco!r}")
    else:
        if len(rco) != len(regions):
            problems.append(f"`regions_class_order` {list(rco)} has {len(rco)} entries but the labels define "
                            f"{len(regions)} regions ({', '.join(regions)}); give one label per region")
        bad = [x for x in rco if x not in used or x == 0]
        if bad:
            problems.append(f"`regions_class_order` {list(rco)} names {bad}, which no region uses (labels {used[1:]})")
    return problems


# --------------------------------------------------------------------------------------------- the manager
def _members(t: LabelOrRegion) -> tuple[int, ...]:
    return t if isinstance(t, tuple) else (t,)


def _normalize(v: Any) -> LabelOrRegion:
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return int(v)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in ``x``'s float dtype (overflow of ``exp`` gives 0, as it should)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True, eq=False)
class LabelManager:
    """What a dataset's labels mean (nnU-Net's ``LabelManager``), built once and passed everywhere labels are read.

    Parameters
    ----------
    labels : mapping
        dataset.json's ``labels``: name -> int, or list/tuple of ints for a region; ``ignore`` -> int. Stored with
        lists as tuples, in declaration order.
    regions_class_order : sequence of int, optional
        dataset.json's ``regions_class_order``: the label each foreground region channel paints, in painting order.
        Kept only when the labels define regions.

    Raises
    ------
    DatasetError
        ``labels`` is not a non-empty mapping, or the ignore label is not one integer.
    """

    labels: Mapping[str, LabelOrRegion]
    regions_class_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.labels, Mapping) or not self.labels:
            raise DatasetError(f"dataset.json has no usable `labels` (found {self.labels!r})")
        ignore = self.labels.get("ignore")
        if ignore is not None and (isinstance(ignore, (list, tuple)) or isinstance(ignore, bool)):
            raise DatasetError(f"the ignore label must be one integer; found {ignore!r}")
        labels = {str(k): _normalize(v) for k, v in self.labels.items()}
        object.__setattr__(self, "labels", labels)
        has_regions = any(isinstance(v, tuple) and len(v) > 1 for v in labels.values())
        rco = self.regions_class_order
        object.__setattr__(self, "regions_class_order",
                           tuple(int(c) for c in rco) if has_regions and rco is not None else None)

    # ---------------------------------------------------------------------------------------- construction
    @classmethod
    def from_dataset_json(cls, d: Mapping[str, Any]) -> "LabelManager":
        """The labels of a parsed dataset.json (``labels`` and, for regions, ``regions_class_order``)."""
        if not isinstance(d, Mapping):
            raise DatasetError(f"expected a dataset.json object, found {type(d).__name__}")
        # the JSON value as found: __post_init__ validates it (DatasetError) and normalizes lists to tuples
        return cls(cast(Mapping[str, LabelOrRegion], d.get("labels")), d.get("regions_class_order"))

    @classmethod
    def from_plans(cls, plans, regions_class_order: Sequence[int] | None = None) -> "LabelManager":
        """The labels of ``plans.labels`` (the plans do not store ``regions_class_order``: pass dataset.json's)."""
        return cls(plans.labels, None if regions_class_order is None else tuple(regions_class_order))

    # ---------------------------------------------------------------------------------------- what is declared
    @property
    def has_regions(self) -> bool:
        """Region-based (sigmoid per region) rather than softmax over labels: an entry lists several labels."""
        return any(isinstance(v, tuple) and len(v) > 1 for v in self.labels.values())

    @property
    def ignore_label(self) -> int | None:
        v = self.labels.get("ignore")
        return None if v is None else int(cast(int, v))  # __post_init__ rejects a list as the ignore label

    @property
    def has_ignore_label(self) -> bool:
        return self.ignore_label is not None

    @property
    def all_labels(self) -> tuple[int, ...]:
        """Every label value declared (regions flattened), sorted, without the ignore label (background included)."""
        return tuple(sorted({x for k, v in self.labels.items() if k != "ignore" for x in _members(v)}))

    @property
    def declared_values(self) -> tuple[int, ...]:
        """:attr:`all_labels` and the ignore label: every value a label map of the dataset may hold, sorted."""
        ign = self.ignore_label
        return tuple(sorted({*self.all_labels, *(() if ign is None else (ign,))}))

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        """:attr:`all_labels` without background 0."""
        return tuple(v for v in self.all_labels if v != 0)

    @property
    def foreground_regions(self) -> tuple[LabelOrRegion, ...]:
        """Regions other than background, in declaration order (tuples; an entry given as one int stays an int);
        empty without regions."""
        if not self.has_regions:
            return ()
        return tuple(v for k, v in self.labels.items() if k != "ignore" and set(_members(v)) != {0})

    @property
    def foreground_targets(self) -> tuple[LabelOrRegion, ...]:
        """What the foreground outputs predict and what is evaluated: :attr:`foreground_regions` with regions, else
        :attr:`foreground_labels`."""
        return self.foreground_regions if self.has_regions else self.foreground_labels

    @property
    def num_segmentation_heads(self) -> int:
        """Network output channels: one per foreground region, else one per label (background included)."""
        return len(self.foreground_regions) if self.has_regions else len(self.all_labels)

    @property
    def names(self) -> dict[str, str]:
        """``{label_key(target): name}`` for every label value (its first name) or, with regions, every foreground
        region; the ignore label has no entry."""
        names: dict[str, str] = {}
        for k, v in self.labels.items():
            if k == "ignore":
                continue
            if self.has_regions:
                if set(_members(v)) != {0}:
                    names[label_key(v)] = k
            else:
                for x in _members(v):
                    names.setdefault(label_key(x), k)
        return names

    @property
    def seg_dtype(self) -> np.dtype:
        """dtype of a segmentation: uint8 below 255 foreground labels, else uint16 (nnU-Net's rule)."""
        return np.dtype(np.uint8 if len(self.foreground_labels) < 255 else np.uint16)

    @property
    def annotated_classes_key(self) -> tuple[int, ...] | None:
        """``(-1, *all_labels)`` with an ignore label (the class-locations key of annotated voxels, nnU-Net's
        ``annotated_classes_key``), else None."""
        return (-1, *self.all_labels) if self.has_ignore_label else None

    @property
    def class_location_keys(self) -> list[LabelOrRegion]:
        """What preprocessing collects class locations for (the keys of a case's ``class_locations``).

        Foreground labels, or, when an entry is a list, every entry other than ``background``/``ignore`` and
        background-only ones as a tuple; with an ignore label also ``(-1, *all_labels)`` (the annotated voxels), as
        nnU-Net's preprocessor asks its ``LabelManager``.
        """
        if any(isinstance(v, tuple) for k, v in self.labels.items() if k != "ignore"):
            keys: list[LabelOrRegion] = [_members(v) for k, v in self.labels.items()
                                         if k not in ("background", "ignore") and _members(v) != (0,)]
        else:
            keys = list(self.foreground_labels)
        if self.annotated_classes_key is not None:
            keys.append(self.annotated_classes_key)
        return keys

    def check_regions_class_order(self) -> tuple[int, ...] | None:
        """``regions_class_order`` (None without regions), checked against the regions.

        Raises
        ------
        PlanError
            The labels define regions but ``regions_class_order`` is missing or its length differs.
        """
        if not self.has_regions:
            return None
        rco = self.regions_class_order
        n = len(self.foreground_regions)
        if rco is None:
            raise PlanError("the labels define regions but no `regions_class_order` was given (dataset.json "
                            "`regions_class_order`); it says which label each region channel paints")
        if len(rco) != n:
            raise PlanError(f"regions_class_order {tuple(rco)} has {len(rco)} entries but the labels define {n} "
                            "regions")
        return rco

    def check_heads(self, n_channels: int, what: str = "logits") -> None:
        """Raise :class:`~nnfast.errors.GeometryError` unless ``n_channels`` equals :attr:`num_segmentation_heads`
        (and, with regions, ``regions_class_order`` is usable)."""
        self.check_regions_class_order()
        if n_channels != self.num_segmentation_heads:
            raise GeometryError(f"{what} have {n_channels} channels but the labels define "
                                f"{self.num_segmentation_heads} segmentation heads")

    # ---------------------------------------------------------------------------------------- painting
    def paint_regions(self, seg: np.ndarray, probabilities: np.ndarray, first: int = 0) -> np.ndarray:
        """Paint region channels ``first .. first + k - 1`` (``probabilities`` (k, *spatial)) into ``seg`` in place:
        voxels above 0.5 get the channel's label of ``regions_class_order``, later channels win. Returns ``seg``."""
        rco = self.check_regions_class_order()
        assert rco is not None, "paint_regions is for labels with regions"  # its callers check has_regions
        for j in range(probabilities.shape[0]):
            seg[probabilities[j] > 0.5] = rco[first + j]
        return seg

    def segmentation_from_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """nnU-Net's ``convert_probabilities_to_segmentation``: argmax over labels, or regions painted in
        ``regions_class_order`` (probability > 0.5).

        Parameters
        ----------
        probabilities : ndarray (C, *spatial), C = :attr:`num_segmentation_heads`
            Softmax probabilities (or logits: the argmax is the same) for labels; sigmoid probabilities for regions.

        Returns
        -------
        ndarray (*spatial) of :attr:`seg_dtype`

        Raises
        ------
        GeometryError
            The channel count differs from the heads.
        PlanError
            Regions without a usable ``regions_class_order``.
        """
        self.check_heads(probabilities.shape[0], "probabilities")
        if self.has_regions:
            seg = np.zeros(probabilities.shape[1:], np.uint16)
            return self.paint_regions(seg, probabilities).astype(self.seg_dtype, copy=False)
        from .native.argmax import argmax_channels  # Numba, loaded on first use

        return argmax_channels(probabilities, self.seg_dtype)

    def segmentation_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """nnU-Net's ``convert_logits_to_segmentation``: sigmoid then painting for regions, argmax for labels.

        ``logits`` (C, *spatial) float; see :meth:`segmentation_from_probabilities` for the result and errors."""
        if self.has_regions:
            logits = np.asarray(logits)
            if logits.dtype not in (np.float32, np.float64):
                logits = logits.astype(np.float32)
            return self.segmentation_from_probabilities(_sigmoid(logits))
        return self.segmentation_from_probabilities(logits)

    # ---------------------------------------------------------------------------------------- training targets
    def region_targets(self, seg: np.ndarray, *, with_ignore: bool = True, out: np.ndarray | None = None
                       ) -> np.ndarray:
        """Region channels of a label map (batchgeneratorsv2's ``ConvertSegmentationToRegionsTransform`` on
        nnU-Net's ``foreground_regions`` + ``[ignore_label]``).

        Parameters
        ----------
        seg : ndarray (*spatial), integer
            A label map (one channel, no channel axis).
        with_ignore : bool
            Append a channel ``seg == ignore_label`` when the dataset has one (nnU-Net's trainer does; its loss
            masks with it).
        out : ndarray (n_regions [+ 1], *spatial), optional
            Written in place (any numeric or bool dtype; e.g. a loader's int16 batch slot) and returned.

        Returns
        -------
        ndarray of bool (or ``out``'s dtype), (n_regions [+ 1], *spatial)
            Channel ``i`` is ``isin(seg, region_i)``.
        """
        regions = list(self.foreground_regions)
        ignore = self.ignore_label
        if with_ignore and ignore is not None:  # self.has_ignore_label
            regions.append(ignore)
        if out is None:
            out = np.zeros((len(regions), *seg.shape), bool)
        elif out.shape != (len(regions), *seg.shape):
            raise GeometryError(f"region targets of a {seg.shape} label map have shape {(len(regions), *seg.shape)}, "
                                f"the output array has {out.shape}")
        top = max((max(_members(r)) for r in regions), default=0)
        small = seg.dtype.kind in "iub" and seg.size and 0 <= int(seg.min()) and int(seg.max()) <= max(top, 255)
        for i, r in enumerate(regions):
            members = _members(r)
            if len(members) == 1:
                np.equal(seg, members[0], out=out[i], casting="unsafe")
            elif small:  # a lookup table: one gather instead of np.isin's sort-based membership test
                lut = np.zeros(max(top, int(seg.max())) + 1, bool)
                lut[list(members)] = True
                if out.dtype == np.bool_:
                    np.take(lut, seg, out=out[i], mode="clip")
                else:
                    np.copyto(out[i], np.take(lut, seg, mode="clip"), casting="unsafe")
            else:
                np.copyto(out[i], np.isin(seg, members), casting="unsafe")
        return out

    def one_hot(self, seg: np.ndarray, dtype=np.bool_) -> np.ndarray:
        """One channel per label of :attr:`all_labels` (nnU-Net's ``convert_labelmap_to_one_hot``):
        ``out[i] = seg == all_labels[i]``; ``seg`` (*spatial) integer, result (n_labels, *spatial) of ``dtype``."""
        labels = self.all_labels
        out = np.zeros((len(labels), *seg.shape), dtype)
        for i, v in enumerate(labels):
            out[i] = seg == v
        return out

    def targets(self, seg: np.ndarray) -> np.ndarray:
        """Training targets of a label map: :meth:`region_targets` with regions, else :meth:`one_hot`."""
        return self.region_targets(seg) if self.has_regions else self.one_hot(seg)

    def __repr__(self) -> str:
        rco = f", regions_class_order={self.regions_class_order}" if self.regions_class_order else ""
        return f"LabelManager({dict(self.labels)!r}{rco})"
