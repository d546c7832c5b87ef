"""nnU-Net's residual-encoder U-Net (the ResEnc presets): dynamic-network-architectures' ``ResidualEncoderUNet``.

Built from a plan's :class:`~nnfast.plan.schema.Architecture` with ``network_class == "ResidualEncoderUNet"``, where
``n_conv_per_stage[s]`` is the number of residual blocks of encoder stage ``s`` (nnU-Net's ``n_blocks_per_stage``).
Same module tree as dynamic-network-architectures (``architectures/unet.py``, ``building_blocks/residual_encoders.py``
and ``residual.py``), so ``state_dict`` names and shapes are equal and weights move both ways:

- ``encoder.stem``: one conv block (conv -> InstanceNorm -> LeakyReLU) from the input channels to
  ``features_per_stage[0]``, stride 1, kernel ``kernel_sizes[0]``;
- ``encoder.stages[s].blocks[i]``: ResNet-D basic blocks (``BasicBlockD``): ``conv1`` (conv -> norm -> LeakyReLU,
  strided in the stage's first block), ``conv2`` (conv -> norm, no nonlinearity), plus the skip: identity, or
  ``skip`` = [AvgPool(kernel = stride = the block's stride) if strided] + [1x1 conv without bias -> norm if the
  channel count changes]; output ``LeakyReLU(conv2(conv1(x)) + skip(x))``;
- the decoder is the plain U-Net decoder of :mod:`nnfast.network` (transposed conv, concatenated skip,
  ``n_conv_per_stage_decoder`` conv blocks, 1x1 segmentation heads), holding the encoder as ``decoder.encoder``.

Initialisation as nnU-Net's ``ResidualEncoderUNet.initialize``: He on every conv, and the last norm of every residual
block (``conv2.norm``) set to weight 0, bias 0, so that each block starts as its skip path.

Stochastic depth, squeeze-excitation and bottleneck blocks (never in nnU-Net's plans) are not implemented.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import PlanError
from .network import EncoderDecoderUNet, SkipEncoder, check_unet_arguments, init_weights_he
from .plan.schema import Architecture

__all__ = ["BasicBlockD", "StackedResidualBlocks", "ResidualEncoder", "ResidualEncoderUNet", "init_last_norm_to_zero"]

_AVG_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _conv_block(ndim: int, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int], arch: Architecture,
                *, nonlin: bool = True, bias: bool | None = None):
    from .network import ConvDropoutNormReLU

    return ConvDropoutNormReLU(ndim, c_in, c_out, kernel, stride, arch.conv_bias if bias is None else bias,
                               arch.norm_eps, arch.norm_affine, arch.nonlin_negative_slope, nonlin=nonlin)


class BasicBlockD(nn.Module):
    """ResNet-D basic block: ``LeakyReLU(conv2(conv1(x)) + skip(x))`` (dynamic-network-architectures' name)."""

    def __init__(self, ndim: int, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int],
                 arch: Architecture) -> None:
        super().__init__()
        self.input_channels, self.output_channels, self.stride = c_in, c_out, list(stride)
        self.conv1 = _conv_block(ndim, c_in, c_out, kernel, stride, arch)
        self.conv2 = _conv_block(ndim, c_out, c_out, kernel, [1] * ndim, arch, nonlin=False)
        self.nonlin2 = nn.LeakyReLU(negative_slope=arch.nonlin_negative_slope, inplace=True)
        strided = any(s != 1 for s in stride)
        ops: list[nn.Module] = []
        if strided:
            ops.append(_AVG_POOL[ndim](tuple(stride), tuple(stride)))
        if c_in != c_out:
            ops.append(_conv_block(ndim, c_in, c_out, [1] * ndim, [1] * ndim, arch, nonlin=False, bias=False))
        self.skip = nn.Sequential(*ops) if ops else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x) if self.skip is not None else x
        out = self.conv2(self.conv1(x))
        out += residual
        return self.nonlin2(out)


class StackedResidualBlocks(nn.Module):
    """``n_blocks`` :class:`BasicBlockD` in ``blocks``; only the first is strided and changes the channel count."""

    def __init__(self, ndim: int, n_blocks: int, c_in: int, c_out: int, kernel: Sequence[int],
                 initial_stride: Sequence[int], arch: Architecture) -> None:
        super().__init__()
        if n_blocks < 1:
            raise PlanError(f"a residual encoder stage needs at least one block, got {n_blocks}")
        ones = [1] * ndim
        self.blocks = nn.Sequential(*[
            BasicBlockD(ndim, c_in if i == 0 else c_out, c_out, kernel, initial_stride if i == 0 else ones, arch)
            for i in range(n_blocks)])
        self.output_channels = c_out
        self.initial_stride = list(initial_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResidualEncoder(SkipEncoder):
    """Stem + one :class:`StackedResidualBlocks` per stage; ``forward`` returns every stage's output (the skips)."""

    def __init__(self, arch: Architecture, in_channels: int) -> None:
        super().__init__()
        from .network import StackedConvBlocks

        nd = arch.ndim
        stem_channels = arch.features_per_stage[0]
        self.stem = StackedConvBlocks(nd, 1, in_channels, stem_channels, arch.kernel_sizes[0], [1] * nd,
                                      arch.conv_bias, arch.norm_eps, arch.norm_affine, arch.nonlin_negative_slope)
        stages = []
        c_in = stem_channels
        for s in range(arch.n_stages):
            stages.append(StackedResidualBlocks(nd, arch.n_conv_per_stage[s], c_in, arch.features_per_stage[s],
                                                arch.kernel_sizes[s], arch.strides[s], arch))
            c_in = arch.features_per_stage[s]
        self._set_stages(arch, stages)


def init_last_norm_to_zero(module: nn.Module) -> None:
    """nnU-Net's ``init_last_bn_before_add_to_0``: the last norm of every residual block starts at weight 0, bias 0."""
    if isinstance(module, BasicBlockD) and module.conv2.norm.weight is not None:
        nn.init.constant_(module.conv2.norm.weight, 0)
        nn.init.constant_(module.conv2.norm.bias, 0)


class ResidualEncoderUNet(EncoderDecoderUNet):
    """nnU-Net's ResEnc U-Net for one plan configuration (see the module docstring).

    Parameters
    ----------
    arch : Architecture
        ``network_class == "ResidualEncoderUNet"``; ``n_conv_per_stage`` holds the residual blocks per stage.
    in_channels, num_classes : int
        Input image channels; output channels (labels including background, or regions).
    deep_supervision : bool
        Return every decoder stage's logits (list, highest resolution first).
    initialize : bool
        nnU-Net's initialisation (He, then :func:`init_last_norm_to_zero`).

    Notes
    -----
    Input ``(b, in_channels, *patch)``, spatial axes in nnU-Net's order after transposition; every spatial size
    divisible by the product of the strides along it.
    """

    def __init__(self, arch: Architecture, in_channels: int, num_classes: int, deep_supervision: bool = False,
                 initialize: bool = True) -> None:
        check_unet_arguments(arch, in_channels, num_classes)
        super().__init__(arch, ResidualEncoder(arch, in_channels), num_classes, deep_supervision)
        if initialize:
            self.apply(init_weights_he)
            self.apply(init_last_norm_to_zero)
