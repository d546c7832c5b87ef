"""Imports every kernel module so that their warm-ups register (used by :func:`nnfast.native.warmup`).

:data:`MODULES` names them, for the callers that warm them up by name (the install-time compile,
:mod:`nnfast.native.precompile`)."""
# Each kernel module is imported here as it is added; keep this list in sync with nnfast/native/__init__.py.
from . import normalize  # noqa: F401
from . import resample, resample_seg  # noqa: F401
from . import augment, augment_intensity, ds_targets  # noqa: F401
from . import crop, intensity, class_locations  # noqa: F401
from . import components  # noqa: F401
from . import confusion  # noqa: F401
from . import morphology  # noqa: F401
from . import argmax  # noqa: F401

#: Every kernel module, the costliest to compile first (single-core compile seconds of their warm-ups, measured at
#: load ~5: augment 49, confusion 27, components 19, augment_intensity 14, morphology 13, resample 13, intensity 10,
#: crop 6, resample_seg 6, argmax 2.5, normalize 2, ds_targets 1.7, class_locations 1.3), so that processes taking
#: the next free module in this order (:mod:`nnfast.native.precompile`) finish together.
MODULES = ("augment", "confusion", "components", "augment_intensity", "morphology", "resample", "intensity", "crop",
           "resample_seg", "argmax", "normalize", "ds_targets", "class_locations")
