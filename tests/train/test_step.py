"""Training / validation steps on a tiny network (CPU): nnU-Net's order, loss goes down, pseudo-Dice counts equal
nnU-Net's ``validation_step`` arithmetic."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nnfast.network import PlainConvUNet
from nnfast.plan.schema import Architecture
from nnfast.train.config import TrainConfig
from nnfast.train.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_scales, deep_supervision_weights
from nnfast.train.optim import build_optimizer
from nnfast.train.step import (ValidationResult, make_grad_scaler, pseudo_dice, resolve_amp, resolve_compile,
                               summarize_validation, train_step, validation_step)

ARCH = Architecture(n_stages=3, features_per_stage=(4, 8, 8), kernel_sizes=((3, 3),) * 3,
                    strides=((1, 1), (2, 2), (2, 2)), n_conv_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1))


def _batch(seed=0, size=16, n_classes=3, ds=True):
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros((2, 1, size, size))
    target[:, :, 4:12, 4:12] = 1
    target[:, :, 6:9, 6:9] = 2
    data = target * 0.5 + 0.3 * torch.randn(target.shape, generator=g)
    if not ds:
        return {"data": data, "target": target}
    targets = []
    for s in deep_supervision_scales(ARCH.strides):
        k = int(round(1 / s[0]))
        targets.append(target[:, :, ::k, ::k].clone())  # nearest downsampling like nnU-Net's DA
    return {"data": data, "target": targets}


def _setup(seed=0, ds=True):
    torch.manual_seed(seed)
    net = PlainConvUNet(ARCH, 1, 3, deep_supervision=ds)
    loss = DiceCELoss(batch_dice=True)
    if ds:
        loss = DeepSupervisionLoss(loss, deep_supervision_weights(ARCH.n_stages - 1))
    opt = build_optimizer(net.parameters(), TrainConfig())
    return net, loss, opt


def test_a_few_steps_reduce_the_loss():
    net, loss_fn, opt = _setup()
    batch = _batch()
    net.train()
    losses = [float(train_step(net, batch, loss_fn, opt)) for _ in range(12)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses


def test_step_order_equals_nnunet_train_step():
    """Same parameters after one step as nnU-Net's train_step body (zero_grad, loss, backward, clip 12, step)."""
    net, loss_fn, opt = _setup(seed=3, ds=False)
    ref_net = copy.deepcopy(net)
    ref_opt = build_optimizer(ref_net.parameters(), TrainConfig())
    batch = _batch(seed=1, ds=False)
    net.train(), ref_net.train()
    for _ in range(2):
        ours = train_step(net, batch, loss_fn, opt, grad_clip=12)
        ref_opt.zero_grad(set_to_none=True)
        out = ref_net(batch["data"])
        ref = loss_fn(out, batch["target"])
        ref.backward()
        torch.nn.utils.clip_grad_norm_(ref_net.parameters(), 12)
        ref_opt.step()
        assert ours.requires_grad is False and float(ours) == float(ref.detach())
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradient_clipping_is_applied():
    net, loss_fn, opt = _setup(seed=4, ds=False)
    batch = _batch(ds=False)
    seen = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        seen.append(max_norm)
        return orig(params, max_norm, *a, **k)

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        train_step(net, batch, loss_fn, opt, grad_clip=0.5)
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters() if p.grad is not None))
        train_step(net, batch, loss_fn, opt, grad_clip=None)
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    assert seen == [0.5] and norm <= 0.5 + 1e-5


def test_scaler_path_matches_plain_path_in_float32():
    """GradScaler (CPU) scale -> unscale_ -> clip -> step -> update gives the plain step's result in float32."""
    net, loss_fn, opt = _setup(seed=5)
    net2 = copy.deepcopy(net)
    opt2 = build_optimizer(net2.parameters(), TrainConfig())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    batch = _batch(seed=2)
    for _ in range(2):
        a = train_step(net, batch, loss_fn, opt)
        b = train_step(net2, batch, loss_fn, opt2, scaler=scaler)
        assert abs(float(a) - float(b)) < 1e-6
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _nnunet_counts(output, target, ignore_label=None):
    """nnU-Net's validation_step arithmetic (label training) with its get_tp_fp_fn_tn."""
    from nnunetv2.training.loss.dice import get_tp_fp_fn_tn

    axes = [0] + list(range(2, output.ndim))
    output_seg = output.argmax(1)[:, None]
    onehot = torch.zeros(output.shape, dtype=torch.float16)
    onehot.scatter_(1, output_seg, 1)
    target = target.clone()
    mask = None
    if ignore_label is not None:
        mask = (target != ignore_label).float()
        target[target == ignore_label] = 0
    tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=axes, mask=mask)
    return tp.numpy()[1:], fp.numpy()[1:], fn.numpy()[1:]


@pytest.mark.compat
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_validation_counts_equal_nnunet(ignore_label):
    net, loss_fn, _ = _setup(seed=6)
    net.eval()
    batch = _batch(seed=3)
    if ignore_label is not None:
        g = torch.Generator().manual_seed(0)
        for t in batch["target"]:
            t[torch.rand(t.shape, generator=g) < 0.2] = ignore_label
        loss_fn = DeepSupervisionLoss(DiceCELoss(batch_dice=True, ignore_label=ignore_label), loss_fn.weights)
    res = validation_step(net, batch, loss_fn, ignore_label=ignore_label)
    with torch.no_grad():
        out = net(batch["data"])
        ref_loss = loss_fn(out, batch["target"])
    tp, fp, fn = _nnunet_counts(out[0], batch["target"][0], ignore_label)
    np.testing.assert_array_equal(res.tp.numpy(), tp)
    np.testing.assert_array_equal(res.fp.numpy(), fp)
    np.testing.assert_array_equal(res.fn.numpy(), fn)
    assert res.tp.dtype == torch.int64 and res.tp.shape == (2,)
    assert abs(float(res.loss) - float(ref_loss)) < 1e-6
    # validation does not build a graph
    assert not res.loss.requires_grad


def test_validation_step_without_deep_supervision_and_summary():
    net, loss_fn, _ = _setup(seed=7, ds=False)
    net.eval()
    batch = _batch(seed=4, ds=False)
    r1 = validation_step(net, batch, loss_fn)
    r2 = validation_step(net, _batch(seed=5, ds=False), loss_fn)
    loss, dice, mean = summarize_validation([r1, r2])
    tp, fp, fn = (r1.tp + r2.tp).numpy(), (r1.fp + r2.fp).numpy(), (r1.fn + r2.fn).numpy()
    np.testing.assert_allclose(dice, 2 * tp / (2 * tp + fp + fn))
    assert abs(loss - (float(r1.loss) + float(r2.loss)) / 2) < 1e-6
    assert abs(mean - np.nanmean(dice)) < 1e-12


def test_pseudo_dice_nan_for_absent_class():
    d = pseudo_dice([3, 0], [1, 0], [0, 0])
    assert d[0] == pytest.approx(6 / 7) and np.isnan(d[1])
    z = torch.zeros(2, dtype=torch.int64)
    _, dice, mean = summarize_validation([ValidationResult(torch.tensor(0.5), z, z, z)])
    assert np.all(np.isnan(dice)) and np.isnan(mean)
    with pytest.raises(ValueError):
        summarize_validation([])


def test_amp_compile_and_scaler_decisions():
    assert resolve_amp("auto", "cpu") is None
    assert resolve_amp("fp16", "cpu") is None
    assert resolve_amp("auto", "cuda") is torch.float16
    assert resolve_amp("bf16", "cuda") is torch.bfloat16
    assert resolve_amp("off", "cuda") is None
    with pytest.raises(ValueError):
        resolve_amp("fp8", "cuda")
    assert make_grad_scaler(None, "cpu") is None
    assert make_grad_scaler(torch.bfloat16, "cuda") is None
    assert resolve_compile("auto", "cpu") is False
    assert resolve_compile("on", "cpu") is True
    assert resolve_compile("on", "mps") is False
    assert resolve_compile("off", "cuda") is False
    with pytest.raises(ValueError):
        resolve_compile("yes", "cpu")
