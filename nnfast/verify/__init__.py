"""Dataset verification: every problem of a raw dataset (files, dataset.json, geometry, labels, values) in one report.

:func:`verify_dataset` is the entry point; :class:`VerifyReport` holds :class:`Problem` records.
:func:`nifti_integrity_problem` detects truncated NIfTI files, which SimpleITK reads without complaint.
"""
from .checks import verify_dataset
from ..io.nifti_integrity import nifti_integrity_problem
from .report import Problem, VerifyReport

__all__ = ["verify_dataset", "VerifyReport", "Problem", "nifti_integrity_problem"]
