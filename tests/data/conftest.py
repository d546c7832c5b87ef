"""Small preprocessed cases for the loader tests, written both as nnfast stores and as nnU-Net v2 blosc2 files
(fixtures prefixed ``ld_`` so that they do not collide with other tests in this folder)."""
from __future__ import annotations

import math

import numpy as np
import pytest


def make_case(shape, seed: int, channels: int = 1, labels: int = 2, empty: bool = False):
    """A preprocessed case: float32 image (c, x, y, z), int8 seg (1, x, y, z) with labels 0..``labels`` in
    ellipsoids and -1 outside an elliptic field of view, nnU-Net-style class locations ``{label: (n, 4)}``."""
    rng = np.random.default_rng(seed)
    gx, gy, gz = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    fov = (gy / 0.95) ** 2 + (gz / 0.9) ** 2 < 1
    seg = np.zeros(shape, np.int8)
    if not empty:
        for lab in range(1, labels + 1):
            c = rng.uniform(-0.5, 0.5, 3)
            r = rng.uniform(0.15, 0.35, 3)
            seg[((gx - c[0]) / r[0]) ** 2 + ((gy - c[1]) / r[1]) ** 2 + ((gz - c[2]) / r[2]) ** 2 < 1] = lab
    seg[~fov] = -1
    image = np.stack([(rng.normal(0, 1, shape) + 2.0 * (seg > 0) * (ch + 1)).astype(np.float32)
                      for ch in range(channels)])
    image[:, ~fov] = 0
    locs = {}
    for lab in range(1, labels + 1):
        idx = np.argwhere(seg == lab)
        n = max(min(500, len(idx)), math.ceil(len(idx) * 0.01)) if len(idx) else 0
        sel = idx[rng.choice(len(idx), n, replace=False)] if n else np.zeros((0, 3), np.int64)
        locs[lab] = np.concatenate([np.zeros((len(sel), 1), np.int64), sel], 1)
    return image, seg[None], locs


def write_cases(root, shapes, channels=1, labels=2, empty=(), seed=0):
    """Write cases to ``root/stores`` (nnfast) and ``root/nnunet`` (nnU-Net blosc2 + pkl); returns
    ``(stores folder, nnunet folder, {case_id: (image, seg, locs)})``."""
    from nnfast.io.store import store_path, write_case

    stores, nn = root / "stores", root / "nnunet"
    stores.mkdir(parents=True, exist_ok=True)
    nn.mkdir(parents=True, exist_ok=True)
    cases = {}
    for i, shape in enumerate(shapes):
        cid = f"case_{i:03d}"
        image, seg, locs = make_case(shape, seed + i, channels, labels, empty=i in empty)
        cases[cid] = (image, seg, locs)
        write_case(store_path(stores, cid), image, seg, locs, {"shape": list(shape)}, "test", (16, 32, 32))
        _write_nnunet(nn / cid, image, seg, locs)
    return stores, nn, cases


def _write_nnunet(prefix, image, seg, locs):
    try:
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    except ImportError:  # pragma: no cover - without nnunetv2 the nnU-Net folder is not written
        return
    blocks, chunks = comp_blosc2_params(image.shape, (16, 32, 32), image.itemsize)
    bs, cs = comp_blosc2_params(seg.shape, (16, 32, 32), seg.itemsize)
    nnUNetDatasetBlosc2.save_case(image, seg, {"class_locations": locs}, str(prefix), chunks=chunks, blocks=blocks,
                                  chunks_seg=cs, blocks_seg=bs)


@pytest.fixture(scope="session")
def ld_cases(tmp_path_factory):
    """Four 3D cases (one without foreground), one channel, labels 1-2."""
    root = tmp_path_factory.mktemp("loader_cases")
    return write_cases(root, [(20, 40, 44), (14, 36, 30), (24, 30, 38), (10, 20, 24)], empty=(3,))


@pytest.fixture(scope="session")
def ld_cases_2ch(tmp_path_factory):
    """Three 2-channel cases."""
    root = tmp_path_factory.mktemp("loader_cases_2ch")
    return write_cases(root, [(12, 40, 44), (10, 36, 30), (16, 30, 38)], channels=2, seed=10)


@pytest.fixture(scope="session")
def ld_write_cases():
    """:func:`write_cases` for test modules that build their own cases."""
    return write_cases
