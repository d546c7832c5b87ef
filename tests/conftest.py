"""Shared test set-up: makes ``tests/`` importable (fixture factories in ``factories.py``) and pins the Numba thread
count so that tests on 2 cores do not oversubscribe."""
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
# spawned worker processes import test helpers by module name too
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))
