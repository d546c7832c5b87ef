"""Build hook: compile nnfast's Numba kernels while pip builds the package (issue 13, goal 1: the first run after
``pip install`` loads them instead of compiling). Everything else is declared in ``pyproject.toml``.

``build_kernels`` is the last ``build`` subcommand, which setuptools runs both for a wheel and for an editable install
(PEP 660: ``editable_wheel`` runs the ``build`` subcommands with ``editable_mode`` set). It runs
``python -m nnfast.native.precompile`` in the build environment (numpy and numba are in ``[build-system].requires``)
on the package's source tree (editable: the tree the install runs from) or on its copy in ``build/lib`` (a wheel,
which then carries the cache). It never fails the build: on any error it prints one warning line and the kernels
compile on first use, as they would without it.

``NNFAST_INSTALL_COMPILE``: ``all`` (default), ``none`` (skip it: the kernels compile on first use), or
comma-separated kernel modules (e.g. ``crop,normalize,resample,resample_seg,class_locations``: preprocessing only).
"""
import os
import subprocess
import sys

from setuptools import Command, setup
from setuptools.command.build import build

ROOT = os.path.dirname(os.path.abspath(__file__))


class build_kernels(Command):
    description = "compile nnfast's Numba kernels into Numba's on-disk cache (never fails the build)"
    user_options: list = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def get_outputs(self):
        return []  # the cache is not a module: an editable install maps nothing for it

    def run(self):
        which = os.environ.get("NNFAST_INSTALL_COMPILE", "all").strip()
        if which.lower() in ("none", "0", "no", "false"):
            sys.stderr.write("nnfast: NNFAST_INSTALL_COMPILE=none: the Numba kernels compile on first use\n")
            return
        root = ROOT if self.editable_mode else os.path.abspath(self.build_lib)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "nnfast.native.precompile"]
        if which.lower() not in ("", "all", "1", "yes", "true"):
            cmd += ["--modules", which]
        try:
            res = subprocess.run(cmd, cwd=root,
                                 env={**os.environ, "PYTHONPATH": path}, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=1800)
            lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
            message = lines[-1] if lines else f"exit code {res.returncode}"
            ok = res.returncode == 0
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the install goes on
            message, ok = f"{type(e).__name__}: {e}", False
        if ok:
            sys.stderr.write(message + "\n")
        else:
            sys.stderr.write(f"WARNING: nnfast: the Numba kernels were not compiled at install ({message[-400:]}); "
                             "they compile on first use instead (~1 min of CPU, once)\n")


class build_with_kernels(build):
    sub_commands = [*build.sub_commands, ("build_kernels", None)]


setup(cmdclass={"build": build_with_kernels, "build_kernels": build_kernels})
