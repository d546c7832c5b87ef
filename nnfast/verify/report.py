"""The result of :func:`nnfast.verify.verify_dataset`: every problem found, and a readable text form."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["Problem", "VerifyReport", "Severity"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One problem with a dataset.

    ``case`` is the case id (None for dataset-wide problems), ``file`` the file concerned (None when no single file
    is), ``what`` a short description, ``expected``/``found`` what should be there and what is.
    """

    severity: Severity
    case: str | None
    file: Path | None
    what: str
    expected: str
    found: str

    def format(self, root: Path | None = None) -> str:
        """One line: ``error: <what> [<file>]: expected <expected>; found <found>``."""
        where = ""
        if self.file is not None:
            f = Path(self.file)
            if root is not None:
                try:
                    f = f.relative_to(root)
                except ValueError:
                    pass
            where = f" [{f}]"
        return f"{self.severity}: {self.what}{where}: expected {self.expected}; found {self.found}"

    def to_json(self) -> dict:
        return {
            "severity": self.severity,
            "case": self.case,
            "file": None if self.file is None else str(self.file),
            "what": self.what,
            "expected": self.expected,
            "found": self.found,
        }


@dataclass
class VerifyReport:
    """All problems found in the dataset at ``root`` (``num_cases`` training cases were listed)."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    num_cases: int = 0
    #: case id -> CaseFingerprint of the cases without errors, when verified with ``fingerprint=True``
    case_fingerprints: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def for_case(self, case: str | None) -> list[Problem]:
        return [p for p in self.problems if p.case == case]

    def format(self) -> str:
        """Multi-line text: dataset-wide problems first, then per case (sorted), then the counts."""
        lines = [f"dataset `{self.root}`: {self.num_cases} training case(s) checked"]
        general = self.for_case(None)
        if general:
            lines.append("dataset:")
            lines += [f"  {p.format(self.root)}" for p in general]
        for case in sorted({p.case for p in self.problems if p.case is not None}):
            lines.append(f"case {case}:")
            lines += [f"  {p.format(self.root)}" for p in self.for_case(case)]
        n_err, n_warn = len(self.errors), len(self.warnings)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{n_err} error(s), {n_warn} warning(s): {verdict}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "root": str(self.root),
            "num_cases": self.num_cases,
            "ok": self.ok,
            "num_errors": len(self.errors),
            "num_warnings": len(self.warnings),
            "problems": [p.to_json() for p in self.problems],
        }
