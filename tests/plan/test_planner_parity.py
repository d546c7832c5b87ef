"""nnfast's planner against nnU-Net v2's real ``ExperimentPlanner`` and ``nnUNetPlannerResEncM/L/XL`` on synthetic
fingerprints: every field equal.

The whole exported ``nnUNetPlans.json`` dict is compared (all configurations, every key: spacing, patch size, batch size,
strides, kernel sizes, stages, features, batch_dice, normalization, masks, median sizes, transposition, original
medians, resampling, reader/writer, ...), so a 3d_lowres that exists on one side only fails too.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnfast.plan.nnunet_compat import from_nnunet_plans, to_nnunet_plans
from nnfast.plan.planner import plan_experiment
from plan.plan_reference_nnunet import dataset_info, make_dataset_json, make_fingerprint, run_nnunet_planner

pytestmark = pytest.mark.compat


def _diff(ref, ours, path="plans") -> list[str]:
    """Human-readable list of differing fields (empty when equal)."""
    if isinstance(ref, dict) and isinstance(ours, dict):
        out = []
        for k in sorted(set(ref) | set(ours), key=str):
            if k not in ours:
                out.append(f"{path}.{k}: only in nnU-Net ({ref[k]!r:.200})")
            elif k not in ref:
                out.append(f"{path}.{k}: only in nnfast ({ours[k]!r:.200})")
            else:
                out += _diff(ref[k], ours[k], f"{path}.{k}")
        return out
    if ref != ours or type(ref) is bool and type(ours) is not bool:
        return [f"{path}: nnU-Net {ref!r} vs nnfast {ours!r}"]
    return []


def _plan_both(fp, dj, workdir: Path, **kwargs):
    ref = run_nnunet_planner(fp, dj, workdir, **kwargs)
    ours = plan_experiment(fp, dataset_info(workdir, dj), **kwargs)
    if kwargs.get("preset", "default") != "default":
        assert ref["experiment_planner_used"].startswith("nnUNetPlannerResEnc")  # the reference really is ResEnc
    exported = json.loads(json.dumps(to_nnunet_plans(ours, dj)))
    exported.pop("nnfast")
    return ref, ours, exported


def _assert_identical(ref, exported):
    problems = _diff(ref, exported)
    assert not problems, "nnfast plans differ from nnU-Net's:\n" + "\n".join(problems)


def _rng_fingerprint(seed, n, spacing_lo, spacing_hi, shape_lo, shape_hi, **kw):
    rng = np.random.default_rng(seed)
    spacings = [tuple(rng.uniform(spacing_lo, spacing_hi)) for _ in range(n)]
    shapes = [tuple(int(v) for v in rng.integers(shape_lo, shape_hi)) for _ in range(n)]
    return make_fingerprint(spacings, shapes, **kw)


# name -> (fingerprint, dataset.json, planner kwargs)
CASES = {
    "isotropic_1mm": (
        _rng_fingerprint(1, 20, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (120, 150, 150), (200, 250, 250)),
        make_dataset_json(["CT"], 2, 20), {}),
    "anisotropic_10th_percentile": (
        _rng_fingerprint(2, 14, (3.0, 0.7, 0.7), (6.0, 0.9, 0.9), (15, 480, 480), (40, 512, 512)),
        make_dataset_json(["CT"], 3, 14), {}),
    "anisotropic_last_axis_transposed": (
        _rng_fingerprint(3, 9, (0.6, 0.6, 4.0), (0.8, 0.8, 8.0), (256, 256, 10), (300, 300, 30)),
        make_dataset_json(["T2"], 2, 9), {}),
    "large_ct_lowres": (
        make_fingerprint([(0.8, 0.8, 0.8)] * 10, [(400, 512, 512)] * 10),
        make_dataset_json(["CT"], 2, 10), {}),
    "large_aniso_lowres": (
        _rng_fingerprint(4, 11, (1.5, 0.7, 0.7), (2.5, 0.8, 0.8), (200, 450, 450), (350, 512, 512)),
        make_dataset_json(["CT"], 5, 11), {}),
    "hippocampus_like": (
        make_fingerprint([(1.0, 1.0, 1.0)] * 260, [(36, 50, 35)] * 260),
        make_dataset_json(["MRI"], 3, 260), {}),
    "mri_multichannel_mask": (
        _rng_fingerprint(5, 16, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (130, 160, 130), (150, 190, 150), n_channels=3,
                         median_relative_size_after_cropping=0.62),
        make_dataset_json(["T1", "T2", "FLAIR"], 4, 16), {}),
    "ct_many_labels_cropped": (
        _rng_fingerprint(6, 12, (1.5, 1.5, 1.5), (1.5, 1.5, 1.5), (200, 200, 200), (300, 280, 280),
                         median_relative_size_after_cropping=0.5),
        make_dataset_json(["CT"], 105, 12), {}),
    "mixed_channels_even_cases": (
        _rng_fingerprint(7, 8, (2.0, 0.7, 0.7), (3.0, 0.8, 0.8), (60, 200, 200), (91, 301, 301), n_channels=3,
                         median_relative_size_after_cropping=0.7),
        make_dataset_json(["CT", "noNorm", "ADC"], 2, 8), {}),
    "two_d_dataset": (
        make_fingerprint([(999.0, 1.0, 1.0)] * 30, [(1, 512 - 2 * i, 384 + i) for i in range(30)],
                         n_channels=3),
        make_dataset_json(["R", "G", "B"], 2, 30), {}),
    "gpu_24gb_overwrite_spacing": (
        _rng_fingerprint(8, 10, (2.0, 0.7, 0.7), (3.0, 0.8, 0.8), (100, 300, 300), (160, 400, 400)),
        make_dataset_json(["CT"], 3, 10), {"gpu_memory_target_in_gb": 24.0,
                                           "overwrite_target_spacing": [2.0, 1.0, 1.0]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plans_identical_to_nnunet(name, tmp_path):
    fp, dj, kwargs = CASES[name]
    ref, ours, exported = _plan_both(fp, dj, tmp_path, **kwargs)
    _assert_identical(ref, exported)

    # nnU-Net's own file, read by nnfast, gives the same plans as nnfast's planner
    back = from_nnunet_plans(ref, dj)
    for c in ours.configurations:
        assert back.configuration(c) == ours.configuration(c)

    configs = set(ref["configurations"])
    if name == "hippocampus_like":  # documented Dataset004_Hippocampus plans
        fr = ours.configuration("3d_fullres")
        assert fr.patch_size == (40, 56, 40) and fr.architecture.n_stages == 4 and fr.batch_size == 9
        assert ours.configuration("2d").patch_size == (56, 40) and ours.configuration("2d").batch_size == 366
    if name in ("large_ct_lowres", "large_aniso_lowres"):
        assert {"3d_lowres", "3d_cascade_fullres"} <= configs
        assert ours.configuration("3d_cascade_fullres").previous_stage == "3d_lowres"
        assert ours.configuration("3d_fullres").batch_dice and not ours.configuration("3d_lowres").batch_dice
    if name == "anisotropic_10th_percentile":
        median_z = float(np.median([s[0] for s in fp.spacings]))
        assert ours.configuration("3d_fullres").spacing[0] < median_z  # the 10th-percentile rule fired
    if name == "anisotropic_last_axis_transposed":
        assert ours.transpose_forward == (2, 0, 1) and ours.transpose_backward == (1, 2, 0)
    if name == "mri_multichannel_mask":
        assert ours.configuration("3d_fullres").use_mask_for_norm == (True, True, True)
    if name == "mixed_channels_even_cases":
        c = ours.configuration("2d")
        assert c.normalization_schemes == ("CTNormalization", "NoNormalization", "ZScoreNormalization")
        assert c.use_mask_for_norm == (False, False, True)
    if name == "two_d_dataset":
        assert configs == {"2d"}


_axis_spacing = st.floats(0.3, 6.0, allow_nan=False, allow_infinity=False)


@st.composite
def _fingerprints(draw):
    n = draw(st.integers(1, 9))
    base_sp = [draw(_axis_spacing) for _ in range(3)]
    base_sh = [draw(st.integers(8, 400)) for _ in range(3)]
    spacings, shapes = [], []
    for _ in range(n):
        spacings.append(tuple(s * draw(st.floats(0.8, 1.25)) for s in base_sp))
        shapes.append(tuple(max(4, int(s * draw(st.floats(0.7, 1.3)))) for s in base_sh))
    n_ch = draw(st.integers(1, 2))
    names = draw(st.lists(st.sampled_from(["CT", "T1", "noNorm", "zscore"]), min_size=n_ch, max_size=n_ch))
    rel = draw(st.sampled_from([0.5, 0.9]))
    n_labels = draw(st.integers(2, 12))
    gpu = draw(st.sampled_from([8.0, 8.0, 11.0, 40.0]))
    return make_fingerprint(spacings, shapes, n_ch, rel), make_dataset_json(names, n_labels, n), gpu


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_fingerprints())
def test_random_fingerprints_identical_to_nnunet(example):
    fp, dj, gpu = example
    with tempfile.TemporaryDirectory(prefix="nnfast-plan-hyp-") as d:
        ref, _, exported = _plan_both(fp, dj, Path(d), gpu_memory_target_in_gb=gpu)
    _assert_identical(ref, exported)



# ResEnc-M on every named case, L and XL on the cases that exercise lowres, 2D-only and the documented dataset
# (the slowest case, large_aniso_lowres, only for M: nnU-Net builds many networks for it)
RESENC_CASES = [("resenc-m", name) for name in CASES] + [
    (p, name) for p in ("resenc-l", "resenc-xl")
    for name in ("large_ct_lowres", "two_d_dataset", "hippocampus_like", "gpu_24gb_overwrite_spacing")]


@pytest.mark.parametrize("preset,name", RESENC_CASES)
def test_resenc_plans_identical_to_nnunet(preset, name, tmp_path):
    fp, dj, kwargs = CASES[name]
    kwargs = {k: v for k, v in kwargs.items() if k != "gpu_memory_target_in_gb"}  # each preset's own target
    ref, ours, exported = _plan_both(fp, dj, tmp_path, preset=preset, **kwargs)
    _assert_identical(ref, exported)
    fr = ours.configuration(ours.available_configurations[-1] if name == "two_d_dataset" else "3d_fullres")
    assert fr.architecture.network_class == "ResidualEncoderUNet"
    assert fr.architecture.n_blocks_per_stage == (1, 3, 4, 6, 6, 6, 6, 6)[:fr.architecture.n_stages]
    assert ours.plans_name == {"resenc-m": "nnfast_ResEncM_plans", "resenc-l": "nnfast_ResEncL_plans",
                               "resenc-xl": "nnfast_ResEncXL_plans"}[preset]

    # nnU-Net's ResEnc file read by nnfast: the same configurations (data identifiers aside where nnU-Net shares the
    # default plans' 2d/3d_fullres data although the target spacing was overwritten)
    back = from_nnunet_plans(ref, dj)
    for c in ours.configurations:
        a, b = back.configuration(c), ours.configuration(c)
        if "overwrite_target_spacing" in kwargs:
            a = dataclasses.replace(a, data_identifier=b.data_identifier)
        assert a == b
    if name == "hippocampus_like":  # the whole dataset fits one batch under ResEnc's max_dataset_covered = 1
        assert ours.configuration("3d_fullres").patch_size == (40, 56, 40)


@st.composite
def _preset_fingerprints(draw):
    fp, dj, _ = draw(_fingerprints())
    return fp, dj, draw(st.sampled_from(["resenc-m", "resenc-l", "resenc-xl"]))


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_preset_fingerprints())
def test_random_fingerprints_resenc_identical_to_nnunet(example):
    fp, dj, preset = example
    with tempfile.TemporaryDirectory(prefix="nnfast-plan-hyp-") as d:
        ref, _, exported = _plan_both(fp, dj, Path(d), preset=preset)
    _assert_identical(ref, exported)
