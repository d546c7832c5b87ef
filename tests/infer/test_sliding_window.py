"""Sliding-window prediction: tile steps, Gaussian and logits against nnU-Net's own functions and predictor, and
against a slow float64 reference written here."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nnfast.errors import GeometryError
from nnfast.infer.sliding_window import (compute_steps, gaussian_importance_map, mirror_combinations,
                                         predict_sliding_window, tile_positions)
from nnfast.network import build_network

from infer._models import dataset_json, tiny_plans
from nnunet_ref import accumulate_in_float32


# --------------------------------------------------------------------------------------------- steps / gaussian
@pytest.mark.compat
def test_steps_equal_nnunet():
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    rng = np.random.default_rng(0)
    cases = [((110,), (64,), 0.5), ((64,), (64,), 0.5), ((65,), (64,), 0.5), ((300, 17), (128, 17), 0.25)]
    for _ in range(300):
        nd = int(rng.integers(2, 4))
        patch = tuple(int(v) for v in rng.integers(1, 60, nd))
        size = tuple(p + int(rng.integers(0, 200)) for p in patch)
        cases.append((size, patch, float(rng.choice([0.1, 0.25, 0.33, 0.5, 0.7, 1.0]))))
    for size, patch, step in cases:
        assert compute_steps(size, patch, step) == compute_steps_for_sliding_window(size, patch, step), \
            (size, patch, step)
    assert compute_steps((110,), (64,), 0.5) == [[0, 23, 46]]


def test_steps_reject_bad_input():
    with pytest.raises(GeometryError, match="at least the patch"):
        compute_steps((10, 20), (16, 16))
    with pytest.raises(GeometryError, match=r"\(0, 1\]"):
        compute_steps((32,), (16,), 0.0)


@pytest.mark.compat
@pytest.mark.parametrize("patch", [(8, 16, 16), (40, 56, 40), (7, 9), (128, 128), (1, 5, 6), (56, 224, 192), (3, 1, 2)])
def test_gaussian_equals_nnunet(patch):
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    ours = gaussian_importance_map(patch, 1 / 8, 10)
    ref = compute_gaussian(tuple(patch), 1 / 8, 10, dtype=torch.float32, device=torch.device("cpu")).numpy()
    assert ours.dtype == np.float32 and ours.shape == tuple(patch)
    np.testing.assert_array_equal(ours, ref)
    assert ours.min() > 0 and ours.max() == np.float32(10)


def test_mirror_combinations_and_2d_tiles():
    assert mirror_combinations((0, 1, 2)) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_combinations(None) == [] and mirror_combinations(()) == []
    tiles = tile_positions((3, 20, 16), (16, 16), 0.5)
    assert tiles == [(d, y, 0) for d in range(3) for y in (0, 4)]


# --------------------------------------------------------------------------------------------- logits
def _net(plans, config, n_in=1, n_classes=3, seed=0):
    torch.manual_seed(seed)
    net = build_network(plans, config, n_in, n_classes, deep_supervision=False).eval()
    with torch.no_grad():
        net.decoder.seg_layers[-1].bias.copy_(torch.linspace(-0.5, 0.5, n_classes))
    return net


def _reference(net, data, patch, n_classes, step, mirror_axes):
    """Slow float64 sliding window written from nnU-Net's description (no batching, explicit padding)."""
    from scipy.ndimage import gaussian_filter

    c, *shape = data.shape
    nd = len(patch)
    lead = len(shape) - nd
    pad = [(0, 0)] * (1 + lead) + [((max(p - s, 0)) // 2, (max(p - s, 0)) - (max(p - s, 0)) // 2)
                                   for s, p in zip(shape[lead:], patch)]
    x = np.pad(data.astype(np.float64), pad)
    g = np.zeros(patch)
    g[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(g, [p / 8 for p in patch], 0, mode="constant", cval=0)
    g = g / g.max() * 10
    g[g == 0] = g[g > 0].min()
    acc = np.zeros((n_classes, *x.shape[1:]))
    w = np.zeros(x.shape[1:])
    psh = x.shape[1:]
    steps = compute_steps(psh[lead:], patch, step)
    slices = [range(psh[0])] if lead else []
    combos = [()] + [cmb for k in range(1, len(mirror_axes or ()) + 1)
                     for cmb in itertools.combinations(mirror_axes, k)]
    for corner in itertools.product(*slices, *steps):
        sl = tuple([corner[0]] if lead else []) + tuple(slice(a, a + p) for a, p in zip(corner[lead:], patch))
        tile = torch.from_numpy(x[(slice(None), *sl)][None].astype(np.float32))
        pred = 0
        for cmb in combos:
            dims = [a + 2 for a in cmb]
            out = net(torch.flip(tile, dims)) if dims else net(tile)
            pred = pred + (torch.flip(out, dims) if dims else out)[0].double().numpy()
        pred = pred / len(combos)
        acc[(slice(None), *sl)] += pred * g
        w[sl] += g
    acc /= w
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad[1:], shape))
    return acc[(slice(None), *crop)]


@pytest.mark.parametrize("shape,batch,tta", [((13, 37, 30), 1, False), ((5, 11, 20), 3, True)])
def test_logits_equal_float64_reference(shape, batch, tta):
    plans = tiny_plans()
    net = _net(plans, "3d_fullres")
    data = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    patch = plans.configuration("3d_fullres").patch_size
    axes = (0, 1, 2) if tta else None
    with torch.inference_mode():
        ref = _reference(net, data, patch, 3, 0.5, axes)
    ours = predict_sliding_window(net, data, patch, 3, step=0.5, mirror_axes=axes, device="cpu", batch_tiles=batch)
    assert ours.shape == (3, *shape) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    flat = predict_sliding_window(net, data, patch, 3, use_gaussian=False, mirror_axes=axes, device="cpu")
    assert np.abs(flat - ours).max() > 1e-3  # the weighting matters (the test can fail)


def test_2d_configuration_predicts_every_slice():
    plans = tiny_plans()
    net = _net(plans, "2d")
    data = np.random.default_rng(2).normal(size=(1, 3, 12, 20)).astype(np.float32)
    patch = plans.configuration("2d").patch_size
    with torch.inference_mode():
        ref = _reference(net, data, patch, 3, 0.5, (0, 1))
    ours = predict_sliding_window(net, data, patch, 3, mirror_axes=(0, 1), device="cpu", batch_tiles=4)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_out_accumulates_and_rejects_wrong_shape():
    plans = tiny_plans()
    net = _net(plans, "3d_fullres")
    data = np.random.default_rng(3).normal(size=(1, 8, 16, 16)).astype(np.float32)
    one = predict_sliding_window(net, data, (8, 16, 16), 3, device="cpu")
    out = one.copy()
    assert predict_sliding_window(net, data, (8, 16, 16), 3, device="cpu", out=out) is out
    np.testing.assert_allclose(out, 2 * one, rtol=1e-6)
    with pytest.raises(GeometryError, match="out must be"):
        predict_sliding_window(net, data, (8, 16, 16), 3, device="cpu", out=np.zeros((2, 8, 16, 16), np.float32))
    with pytest.raises(GeometryError, match="mirror axes"):
        predict_sliding_window(net, data, (8, 16, 16), 3, device="cpu", mirror_axes=(3,))


# --------------------------------------------------------------------------------------------- vs nnU-Net
@pytest.fixture
def nnunet_fp32(monkeypatch):
    """nnU-Net's predictor accumulates logits and weights in float16, also on the CPU (about 3 significant digits,
    far worse where tiny Gaussian corner weights underflow). Make it accumulate in float32, as nnfast does, so that
    the comparison can be tight; the float16 original is compared with a loose bound separately."""
    import nnunetv2.inference.predict_from_raw_data as m

    accumulate_in_float32(m, monkeypatch.setattr)


def _nnunet_predictor(net, plans, config, mirror_axes):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnfast.plan.nnunet_compat import to_nnunet_plans

    dj = dataset_json(plans)
    pm = PlansManager(to_nnunet_plans(plans, dj))
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror_axes is not None,
                           device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    pred.manual_initialization(net, pm, pm.get_configuration(config), [net.state_dict()], dj, "nnUNetTrainer",
                               mirror_axes)
    return pred


@pytest.mark.compat
@pytest.mark.parametrize("config,shape,tta", [("3d_fullres", (11, 30, 21), False), ("3d_fullres", (6, 17, 20), True),
                                              ("2d", (2, 20, 13), True)])
def test_logits_equal_nnunet_predictor(nnunet_fp32, config, shape, tta):
    plans = tiny_plans()
    net = _net(plans, config)
    axes = tuple(range(plans.configuration(config).ndim)) if tta else None
    data = np.random.default_rng(4).normal(size=(1, *shape)).astype(np.float32)
    ref = _nnunet_predictor(net, plans, config, axes).predict_sliding_window_return_logits(torch.from_numpy(data))
    ours = predict_sliding_window(net, data, plans.configuration(config).patch_size, 3, mirror_axes=axes,
                                  device="cpu", batch_tiles=2)
    np.testing.assert_allclose(ours, ref.float().numpy(), rtol=1e-5, atol=2e-5)


@pytest.mark.compat
def test_logits_close_to_nnunet_float16_accumulation():
    plans = tiny_plans()
    net = _net(plans, "3d_fullres")
    data = np.random.default_rng(5).normal(size=(1, 9, 24, 20)).astype(np.float32)
    ref = _nnunet_predictor(net, plans, "3d_fullres", None).predict_sliding_window_return_logits(
        torch.from_numpy(data)).float().numpy()
    ours = predict_sliding_window(net, data, (8, 16, 16), 3, device="cpu")
    err = np.abs(ours - ref)
    assert np.median(err) < 2e-3 * np.abs(ref).max()
