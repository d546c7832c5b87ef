"""Fixtures of the evaluation tests; helpers live in ``_helpers.py``."""
from __future__ import annotations

import pytest

from evaluate._helpers import make_nnunet_inline


@pytest.fixture
def nnunet_inline(monkeypatch):
    """nnU-Net's evaluation, postprocessing and ensembling functions with an in-process pool."""
    return make_nnunet_inline(monkeypatch)
