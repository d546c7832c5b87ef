"""Both cores on one case: kernels run on slabs from threads (``nnfast.native._jit.run_slabs``) give the serial
kernels' results bit for bit and compile no signature the serial call did not."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from nnfast.native import _jit
from nnfast.native._jit import kernel_threads, run_slabs, slab_threads
from nnfast.native.class_locations import count_labels
from nnfast.native.crop import label_outside_mask, nonzero_mask_and_bbox
from nnfast.native.normalize import ct_normalize, zscore_normalize
from nnfast.native.resample import resize_image, resize_image_separate_z
from nnfast.native.resample_seg import resize_labels, resize_labels_separate_z


def _signatures():
    import numba

    out = {}
    for mod in ("crop", "normalize", "resample", "resample_seg", "class_locations"):
        m = __import__(f"nnfast.native.{mod}", fromlist=["_"])
        for name, obj in vars(m).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher):
                out[f"{mod}.{name}"] = set(obj.signatures)
    return out


def _same(a, b):
    """Equal bit for bit (NaN payloads and signed zeros included), recursively for tuples/lists."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _image(rng, shape, nan=False):
    img = (rng.normal(0, 300, shape) + 40).astype(np.float32)
    img[:, : shape[1] // 5] = 0  # a background slab to crop / clip against
    if nan:
        img[0, 3, 4, 5] = np.nan
    return img


def _labels(rng, shape):
    seg = np.zeros(shape, np.int16)
    seg[:, 3:-3, 4:-4, 2:-5] = 1
    seg[:, 5:9, 6:12, 4:8] = 2
    seg[rng.random(shape) < 0.02] = 3
    return seg


CASES = {
    "ct_normalize": lambda r: ct_normalize(_image(r, (1, 23, 30, 17))[0], -50.0, 300.0, 40.0, 120.0),
    "zscore_masked": lambda r: zscore_normalize(_image(r, (1, 23, 30, 17))[0], r.random((23, 30, 17)) < 0.7),
    "zscore_all": lambda r: zscore_normalize(_image(r, (1, 23, 30, 17))[0], None),
    "resize_image_cubic": lambda r: resize_image(_image(r, (2, 19, 26, 15), nan=True), (31, 17, 22)),
    "resize_image_linear": lambda r: resize_image(_image(r, (1, 19, 26, 15)), (11, 40, 9), order=1),
    "resize_image_nearest": lambda r: resize_image(_image(r, (1, 19, 26, 15)), (25, 20, 30), order=0),
    "resize_image_x_only": lambda r: resize_image(_image(r, (1, 19, 26, 15)), (33, 26, 15)),  # column slabs
    "separate_z_0": lambda r: resize_image_separate_z(_image(r, (1, 9, 26, 25)), (13, 31, 18), axis=0),
    "separate_z_2_linear": lambda r: resize_image_separate_z(_image(r, (1, 26, 25, 7)), (21, 30, 11), axis=2,
                                                             order_z=1),
    "separate_z_shrink": lambda r: resize_image_separate_z(_image(r, (1, 12, 26, 25)), (5, 31, 18), axis=0),
    "resize_labels": lambda r: resize_labels(_labels(r, (1, 21, 28, 19)), (30, 17, 25)),
    "resize_labels_separate_z": lambda r: resize_labels_separate_z(_labels(r, (1, 9, 28, 19))[0], (14, 35, 12),
                                                                   axis=0),
    "count_labels": lambda r: count_labels(_labels(r, (1, 21, 28, 19)), [0, 1, 2, 3, -1]),
    "count_labels_view": lambda r: count_labels(_labels(r, (1, 21, 28, 19))[:, ::-1, 2:], [1, 2, 3]),
    "nonzero_mask_bbox": lambda r: nonzero_mask_and_bbox(_image(r, (1, 23, 30, 17))),
    "nonzero_mask_bbox_view": lambda r: nonzero_mask_and_bbox(_image(r, (2, 17, 23, 30)).transpose(0, 3, 1, 2)),
    "nonzero_mask_bbox_empty": lambda r: nonzero_mask_and_bbox(np.zeros((1, 9, 8, 7), np.float32)),
    "label_outside_mask": lambda r: label_outside_mask(_labels(r, (1, 21, 28, 19)), r.random((21, 28, 19)) < 0.5),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("threads", [2, 3])
def test_slabs_equal_serial_bit_for_bit_without_new_signatures(name, threads):
    with slab_threads(1):
        serial = CASES[name](np.random.default_rng(7))
    before = _signatures()
    with slab_threads(threads, min_items=1):  # tiny slabs: every cut, uneven slab sizes
        sliced = CASES[name](np.random.default_rng(7))
    _same(serial, sliced)
    after = _signatures()
    assert {k: v - before[k] for k, v in after.items() if v - before[k]} == {}, "slabs compiled new signatures"


def test_run_slabs_cuts_across_threads_and_stays_serial_off_the_main_thread():
    seen = []
    lock = threading.Lock()
    together = threading.Barrier(3, timeout=30)

    def record(a, b):
        with lock:
            seen.append((a, b, threading.current_thread().name))
        if len(together_needed):
            together.wait()  # the three slabs run at the same time (else: BrokenBarrierError)

    together_needed = [True]

    with slab_threads(3, min_items=1):
        run_slabs(record, 10)
        assert kernel_threads() == 3
        off_main = []
        t = threading.Thread(target=lambda: off_main.append(kernel_threads()))
        t.start()
        t.join()
    assert sorted((a, b) for a, b, _ in seen) == [(0, 3), (3, 6), (6, 10)]
    assert len({name for _, _, name in seen}) == 3
    assert off_main == [1]  # a thread pool's threads already share the cores
    seen.clear()
    together_needed.clear()
    with slab_threads(2):  # below MIN_ITEMS_PER_THREAD per thread: one call
        run_slabs(record, 10, items=_jit.MIN_ITEMS_PER_THREAD)
    assert [(a, b) for a, b, _ in seen] == [(0, 10)]


def test_pool_workers_keep_one_thread(monkeypatch):
    """A pool worker's Numba thread count (limit_threads) is what kernel_threads gives it."""
    import numba

    before = numba.get_num_threads()
    try:
        _jit.limit_threads(1)
        assert kernel_threads() == 1
    finally:
        numba.set_num_threads(before)
