"""Start-up time of ``nnfast --help`` (must not import torch) next to nnU-Net's ``nnUNetv2_plan_and_preprocess -h``."""
import subprocess
import sys

import pytest


def _run(cmd):
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.mark.benchmark(group="cli-startup")
def test_nnfast_help(benchmark):
    benchmark.pedantic(_run, args=([sys.executable, "-m", "nnfast.cli", "--help"],), rounds=5, iterations=1)


@pytest.mark.compat
@pytest.mark.benchmark(group="cli-startup")
def test_nnunet_help(benchmark):
    code = ("import sys; sys.argv=['nnUNetv2_plan_and_preprocess','-h']\n"
            "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry as e\n"
            "try:\n    e()\nexcept SystemExit:\n    pass\n")
    benchmark.pedantic(_run, args=([sys.executable, "-c", code],), rounds=3, iterations=1)
