import subprocess
import sys

import pytest

from nnfast.cli.main import build_parser, main


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from nnfast.cli.main import build_parser\n"
        "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'numba', 'zarr', 'SimpleITK', 'dask', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--task", "1", "--no-such-flag"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_abbreviated_flags_are_not_accepted():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--task", "1", "--work", "2"])


def test_missing_root_is_reported_without_traceback(monkeypatch, capsys):
    for var in ("NNFAST_RAW", "nnUNet_raw"):
        monkeypatch.delenv(var, raising=False)
    assert main(["verify", "--task", "1"]) == 2
    err = capsys.readouterr().err
    assert "NNFAST_RAW" in err and "Traceback" not in err


def test_every_stage_command_exists():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"demo", "synth", "convert", "verify", "plan", "preprocess"} <= set(sub.choices)
