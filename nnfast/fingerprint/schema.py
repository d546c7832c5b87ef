"""The dataset fingerprint as a frozen dataclass, written as versioned JSON.

Same content as nnU-Net v2's ``dataset_fingerprint.json`` (spacings, shapes after crop, per-channel foreground intensity
statistics, median relative size after cropping), plus the case ids and a schema version. :meth:`Fingerprint.to_nnunet`
/ :meth:`Fingerprint.from_nnunet` convert to and from nnU-Net's file.

Axis order: ``spacings`` and ``shapes_after_crop`` are in reader order (SimpleITK array order z, y, x), NOT transposed,
as in nnU-Net.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["IntensityStats", "Fingerprint", "FINGERPRINT_SCHEMA_VERSION"]

FINGERPRINT_SCHEMA_VERSION = 1

_STAT_KEYS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensity statistics of one channel over the dataset (each non-empty case weighted equally)."""

    mean: float
    median: float
    std: float
    min: float
    max: float
    percentile_99_5: float
    percentile_00_5: float

    def to_json(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in _STAT_KEYS}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "IntensityStats":
        return cls(**{k: float(d[k]) for k in _STAT_KEYS})


@dataclass(frozen=True)
class Fingerprint:
    """Dataset fingerprint (nnU-Net v2 ``DatasetFingerprintExtractor`` semantics)."""

    case_ids: tuple[str, ...]
    spacings: tuple[tuple[float, ...], ...]
    shapes_after_crop: tuple[tuple[int, ...], ...]
    foreground_intensity_properties_per_channel: tuple[IntensityStats, ...]
    median_relative_size_after_cropping: float
    schema_version: int = FINGERPRINT_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "case_ids": list(self.case_ids),
            "spacings": [list(map(float, s)) for s in self.spacings],
            "shapes_after_crop": [list(map(int, s)) for s in self.shapes_after_crop],
            "foreground_intensity_properties_per_channel": {
                str(i): st.to_json() for i, st in enumerate(self.foreground_intensity_properties_per_channel)
            },
            "median_relative_size_after_cropping": float(self.median_relative_size_after_cropping),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Fingerprint":
        version = d.get("schema_version")
        if version != FINGERPRINT_SCHEMA_VERSION:
            from ..errors import PlanError

            raise PlanError(
                f"fingerprint schema version {version!r} is not supported (expected {FINGERPRINT_SCHEMA_VERSION}); "
                "rerun `nnfast plan --force`"
            )
        props = d["foreground_intensity_properties_per_channel"]
        return cls(
            case_ids=tuple(d["case_ids"]),
            spacings=tuple(tuple(float(x) for x in s) for s in d["spacings"]),
            shapes_after_crop=tuple(tuple(int(x) for x in s) for s in d["shapes_after_crop"]),
            foreground_intensity_properties_per_channel=tuple(
                IntensityStats.from_json(props[str(i)]) for i in range(len(props))
            ),
            median_relative_size_after_cropping=float(d["median_relative_size_after_cropping"]),
        )

    def to_nnunet(self) -> dict[str, Any]:
        """nnU-Net v2's ``dataset_fingerprint.json`` content."""
        d = self.to_json()
        del d["schema_version"], d["case_ids"]
        return d

    @classmethod
    def from_nnunet(cls, d: dict[str, Any], case_ids: tuple[str, ...] | None = None) -> "Fingerprint":
        """Build from nnU-Net's ``dataset_fingerprint.json`` content (case ids are not stored there)."""
        n = len(d["spacings"])
        return cls.from_json(
            {**d, "schema_version": FINGERPRINT_SCHEMA_VERSION, "case_ids": list(case_ids or [f"case_{i}" for i in range(n)])}
        )

    def channel_stats(self, channel: int) -> IntensityStats:
        return self.foreground_intensity_properties_per_channel[channel]

    def asdict(self) -> dict[str, Any]:
        return asdict(self)
