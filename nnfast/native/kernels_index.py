"""Imports every kernel module so that their warm-ups register (used by :func:`nnfast.native.warmup`)."""
# Each kernel module is imported here as it is added; keep this list in sync with nnfast/native/__init__.py.
from . import normalize  # noqa: F401
from . import resample, resample_seg  # noqa: F401
from . import augment, augment_intensity, ds_targets  # noqa: F401
from . import crop, intensity, class_locations  # noqa: F401
from . import components  # noqa: F401
from . import confusion  # noqa: F401
from . import morphology  # noqa: F401
from . import argmax  # noqa: F401
