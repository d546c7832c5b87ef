"""nnU-Net's default network: a plain-convolution U-Net built from a plan's :class:`~nnfast.plan.schema.Architecture`.

Equivalent to dynamic-network-architectures' ``PlainConvUNet`` (``architectures/unet.py`` with
``building_blocks/plain_conv_encoder.py``, ``unet_decoder.py``, ``simple_conv_blocks.py``) as nnU-Net v2 instantiates
it from its plans, and with the *same module tree*, so that ``state_dict`` keys and shapes are identical and weights
move both ways (an nnU-Net checkpoint's ``network_weights`` load into this module with ``strict=True`` and back).
That module tree has two quirks we keep on purpose:

- every conv block registers its conv and norm twice (as ``conv``/``norm`` and inside ``all_modules``), so the state
  dict names each tensor twice;
- the decoder holds a reference to the encoder (``decoder.encoder``), so every encoder tensor appears again under
  ``decoder.encoder.``.

Layout (``ndim`` = 2 or 3 spatial axes; tensors are ``(b, c, *spatial)`` with the spatial axes in nnU-Net's order
after transposition):

- encoder stage ``s``: ``n_conv_per_stage[s]`` blocks conv -> InstanceNorm(affine, eps) -> LeakyReLU(0.01); the first
  conv of the stage has stride ``strides[s]`` (downsampling by strided convolution, no pooling), padding
  ``(k - 1) // 2``.
- decoder stage ``i`` (lowest resolution first): ConvTranspose(kernel = stride = stride of the encoder stage below)
  -> concatenate the skip ``[upsampled, skip]`` -> ``n_conv_per_stage_decoder[i]`` blocks (``2 * f`` -> ``f``
  features) -> 1x1 segmentation conv with bias. Segmentation heads exist for every decoder stage whether or not deep
  supervision is on (so weights load either way).
- ``deep_supervision=True``: ``forward`` returns a list of ``n_stages - 1`` logit maps, highest resolution first;
  otherwise the full-resolution logits only.

Weights are initialised like nnU-Net (``InitWeights_He(1e-2)``): ``kaiming_normal_(a=0.01)`` on every (transposed)
conv weight, biases zero; norm layers keep PyTorch's defaults (weight 1, bias 0).

The residual-encoder variant (nnU-Net's ResEnc presets) lives in :mod:`nnfast.network_residual`;
:func:`build_network` picks the class the plan's ``Architecture.network_class`` names.

Shared by training (:mod:`nnfast.train` builds and trains it) and inference (:mod:`nnfast.infer` loads checkpoints
into it), which is why it lives beside them and not in either.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union, cast

import torch
from torch import nn

from .errors import InputTypeError, PlanError
from .plan.schema import Architecture, Plans

__all__ = [
    "ConvDropoutNormReLU",
    "StackedConvBlocks",
    "PlainConvEncoder",
    "UNetDecoder",
    "PlainConvUNet",
    "NETWORK_CLASSES",
    "network_from_architecture",
    "build_network",
    "network_input_channels",
    "set_deep_supervision",
    "init_weights_he",
    "unwrap",
]

# layer constructors by spatial ndim; typed as plain constructors because torch types each class's sizes for its own
# ndim (``int | tuple[int, int]`` vs ``int | tuple[int, int, int]``), which mypy would meet to ``int`` for the pair
_CONV: dict[int, Callable[..., nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSP_CONV: dict[int, Callable[..., nn.Module]] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE_NORM: dict[int, Callable[..., nn.Module]] = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}

NetworkOutput = Union[torch.Tensor, list[torch.Tensor]]


class ConvDropoutNormReLU(nn.Module):
    """conv -> InstanceNorm -> LeakyReLU (no dropout; nnU-Net's plans never use it); ``nonlin=False``: conv -> norm.

    Attributes ``conv``, ``norm``, ``nonlin`` and ``all_modules`` (the ``nn.Sequential`` that runs them) mirror
    dynamic-network-architectures' block of the same name.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int], conv_bias: bool, norm_eps: float, norm_affine: bool,
                 negative_slope: float, nonlin: bool = True) -> None:
        super().__init__()
        self.input_channels = in_channels
        self.output_channels = out_channels
        self.stride = list(stride)
        self.conv = _CONV[ndim](in_channels, out_channels, tuple(kernel_size), tuple(stride),
                                padding=[(k - 1) // 2 for k in kernel_size], dilation=1, bias=conv_bias)
        self.norm = _INSTANCE_NORM[ndim](out_channels, eps=norm_eps, affine=norm_affine)
        if nonlin:
            self.nonlin = nn.LeakyReLU(negative_slope=negative_slope, inplace=True)
            self.all_modules = nn.Sequential(self.conv, self.norm, self.nonlin)
        else:  # the second conv of a residual block (nnfast.network_residual): conv -> norm
            self.all_modules = nn.Sequential(self.conv, self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class StackedConvBlocks(nn.Module):
    """``num_convs`` :class:`ConvDropoutNormReLU` blocks in ``convs``; only the first one is strided."""

    def __init__(self, ndim: int, num_convs: int, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 initial_stride: Sequence[int], conv_bias: bool, norm_eps: float, norm_affine: bool,
                 negative_slope: float) -> None:
        super().__init__()
        ones = [1] * ndim
        self.convs = nn.Sequential(*[
            ConvDropoutNormReLU(ndim, in_channels if i == 0 else out_channels, out_channels, kernel_size,
                                initial_stride if i == 0 else ones, conv_bias, norm_eps, norm_affine, negative_slope)
            for i in range(num_convs)
        ])
        self.output_channels = out_channels
        self.initial_stride = list(initial_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class SkipEncoder(nn.Module):
    """What the decoder reads of an encoder: ``stages`` run in order after an optional ``stem``; ``forward`` returns
    every stage's output (the skips, highest resolution first, bottleneck last), and the topology attributes
    ``output_channels``, ``strides``, ``kernel_sizes`` (dynamic-network-architectures' names)."""

    def _set_stages(self, arch: Architecture, stages: Sequence[nn.Module]) -> None:
        self.stages = nn.Sequential(*stages)
        self.output_channels = list(arch.features_per_stage)
        self.strides = [list(s) for s in arch.strides]
        self.kernel_sizes = [list(k) for k in arch.kernel_sizes]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self._modules.get("stem")  # a residual encoder's stem conv; a plain encoder has none
        if stem is not None:
            x = stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class PlainConvEncoder(SkipEncoder):
    """Encoder: ``stages[s]`` is ``nn.Sequential(StackedConvBlocks)``; ``forward`` returns every stage's output
    (the skips, highest resolution first, bottleneck last)."""

    def __init__(self, arch: Architecture, in_channels: int) -> None:
        super().__init__()
        nd = arch.ndim
        stages = []
        c_in = in_channels
        for s in range(arch.n_stages):
            stages.append(nn.Sequential(StackedConvBlocks(
                nd, arch.n_conv_per_stage[s], c_in, arch.features_per_stage[s], arch.kernel_sizes[s], arch.strides[s],
                arch.conv_bias, arch.norm_eps, arch.norm_affine, arch.nonlin_negative_slope)))
            c_in = arch.features_per_stage[s]
        self._set_stages(arch, stages)


class UNetDecoder(nn.Module):
    """Decoder; ``stages``, ``transpconvs`` and ``seg_layers`` are ordered lowest resolution first.

    It keeps the encoder as the submodule ``encoder`` (as dynamic-network-architectures does), which only matters
    for the state-dict keys.
    """

    def __init__(self, encoder: PlainConvEncoder, arch: Architecture, num_classes: int,
                 deep_supervision: bool) -> None:
        super().__init__()
        nd = arch.ndim
        self.deep_supervision = deep_supervision
        self.encoder = encoder
        self.num_classes = num_classes
        feats = encoder.output_channels
        n = len(feats)
        stages, transpconvs, seg_layers = [], [], []
        for s in range(1, n):
            f_below, f_skip = feats[-s], feats[-(s + 1)]
            stride = tuple(encoder.strides[-s])
            transpconvs.append(_TRANSP_CONV[nd](f_below, f_skip, stride, stride, bias=arch.conv_bias))
            stages.append(StackedConvBlocks(
                nd, arch.n_conv_per_stage_decoder[s - 1], 2 * f_skip, f_skip, encoder.kernel_sizes[-(s + 1)],
                [1] * nd, arch.conv_bias, arch.norm_eps, arch.norm_affine, arch.nonlin_negative_slope))
            seg_layers.append(_CONV[nd](f_skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor]) -> NetworkOutput:
        x = skips[-1]
        last = len(self.stages) - 1
        outputs = []
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            if self.deep_supervision:
                outputs.append(self.seg_layers[s](x))
            elif s == last:
                return self.seg_layers[-1](x)
        return outputs[::-1]


def check_unet_arguments(arch: Architecture, in_channels: int, num_classes: int) -> None:
    """The channel counts and stage count every U-Net needs; :class:`~nnfast.errors.PlanError` otherwise."""
    if in_channels < 1 or num_classes < 1:
        raise PlanError(f"a network needs at least one input channel and one output class, got "
                        f"in_channels={in_channels}, num_classes={num_classes}")
    if arch.n_stages < 2:
        raise PlanError(f"a U-Net needs at least 2 stages, the architecture has n_stages={arch.n_stages}")


class EncoderDecoderUNet(nn.Module):
    """An encoder (plain or residual) and nnU-Net's :class:`UNetDecoder` on its skips: the frame both U-Nets share.

    The encoder is registered first and the decoder second, so state-dict keys (``encoder.*``, ``decoder.*``) equal
    dynamic-network-architectures'.
    """

    def __init__(self, arch: Architecture, encoder: nn.Module, num_classes: int, deep_supervision: bool) -> None:
        super().__init__()
        self.architecture = arch
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder, arch, num_classes, deep_supervision)  # type: ignore[arg-type]

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    def forward(self, x: torch.Tensor) -> NetworkOutput:
        return self.decoder(self.encoder(x))


class PlainConvUNet(EncoderDecoderUNet):
    """nnU-Net's default U-Net for one plan configuration.

    Parameters
    ----------
    arch : Architecture
        The configuration's topology (``plans.configuration(name).architecture``).
    in_channels : int
        Number of input image channels (modalities).
    num_classes : int
        Number of output channels: labels including background (softmax training) or regions.
    deep_supervision : bool
        Return the logits of every decoder stage (list, highest resolution first) instead of the last only.

    Notes
    -----
    Input ``(b, in_channels, *patch)`` float; every spatial size must be divisible by the product of the strides
    along that axis (the planner's patch sizes are). Output logits ``(b, num_classes, *patch)`` (and, with deep
    supervision, the lower-resolution maps ``patch / cumprod(strides)[i]`` for ``i = 1 .. n_stages - 2``).
    """

    def __init__(self, arch: Architecture, in_channels: int, num_classes: int, deep_supervision: bool = False,
                 initialize: bool = True) -> None:
        check_unet_arguments(arch, in_channels, num_classes)
        super().__init__(arch, PlainConvEncoder(arch, in_channels), num_classes, deep_supervision)
        if initialize:
            self.apply(init_weights_he)


def init_weights_he(module: nn.Module, negative_slope: float = 1e-2) -> None:
    """nnU-Net's ``InitWeights_He``: ``kaiming_normal_(a=negative_slope)`` on (transposed) conv weights, bias 0.

    Use as ``net.apply(init_weights_he)``; other modules are left unchanged.
    """
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=negative_slope)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)


#: the ``Architecture.network_class`` values nnfast builds (nnU-Net's plans name them with their module path,
#: ``dynamic_network_architectures.architectures.unet.<name>``; :mod:`nnfast.plan.nnunet_compat` maps them)
NETWORK_CLASSES = ("PlainConvUNet", "ResidualEncoderUNet")


def network_from_architecture(arch: Architecture, num_input_channels: int, num_classes: int,
                              deep_supervision: bool = True, initialize: bool = True) -> nn.Module:
    """The network an :class:`~nnfast.plan.schema.Architecture` describes: :class:`PlainConvUNet` or
    :class:`~nnfast.network_residual.ResidualEncoderUNet` (by ``arch.network_class``), initialised like nnU-Net.

    Raises
    ------
    PlanError
        Unknown ``network_class`` or invalid counts.
    """
    if arch.network_class == "PlainConvUNet":
        return PlainConvUNet(arch, num_input_channels, num_classes, deep_supervision, initialize)
    if arch.network_class == "ResidualEncoderUNet":
        from .network_residual import ResidualEncoderUNet

        return ResidualEncoderUNet(arch, num_input_channels, num_classes, deep_supervision, initialize)
    raise PlanError(f"network class {arch.network_class!r} is not implemented; nnfast builds {list(NETWORK_CLASSES)}")


def build_network(plans: Plans, config_name: str, num_input_channels: int | None = None,
                  num_classes: int | None = None, deep_supervision: bool = True) -> nn.Module:
    """The network of configuration ``config_name`` (nnU-Net's ``get_network_from_plans`` with ``allow_init=True``),
    of the class its architecture names (``PlainConvUNet`` or ``ResidualEncoderUNet``).

    Parameters
    ----------
    plans : Plans
        Plans of the dataset.
    config_name : str
        Configuration name (``2d``, ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``); inheritance is resolved.
    num_input_channels : int, optional
        Default: :func:`network_input_channels` (image channels; for the cascade's full-resolution stage nnU-Net adds
        one channel per foreground label).
    num_classes : int, optional
        Segmentation heads; default: the plans' labels (including background without the ignore label); pass the
        number of regions for region-based training.
    deep_supervision : bool
        See :class:`PlainConvUNet`.

    Raises
    ------
    PlanError
        If the configuration does not exist, its network class is unknown or the counts are invalid.
    """
    if num_input_channels is None or num_classes is None:
        from .labels import LabelManager

        labels = LabelManager.from_plans(plans)
        if num_input_channels is None:
            num_input_channels = network_input_channels(plans, config_name, len(labels.foreground_labels))
        if num_classes is None:
            num_classes = labels.num_segmentation_heads
    return network_from_architecture(plans.configuration(config_name).architecture, num_input_channels, num_classes,
                                     deep_supervision)


def network_input_channels(plans: Plans, config_name: str, n_foreground_labels: int) -> int:
    """Input channels of the network of ``config_name``: the image channels, plus one per foreground label for the
    second stage of a cascade (its ``previous_stage`` segmentation, nnU-Net's ``MoveSegAsOneHotToDataTransform``)."""
    conf = plans.configuration(config_name)
    return plans.num_input_channels + (int(n_foreground_labels) if conf.previous_stage else 0)


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module behind ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``) wrappers."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = cast(nn.Module, net._orig_mod)  # torch.compile's wrapper; Module.__getattr__ says Tensor | Module
        elif isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            net = net.module
        else:
            return net


def set_deep_supervision(net: nn.Module, on: bool) -> None:
    """Switch deep supervision on or off (nnU-Net's ``set_deep_supervision_enabled``); works through
    ``torch.compile`` and DDP wrappers.

    Raises
    ------
    TypeError
        If ``net`` is not a U-Net with a ``decoder.deep_supervision`` switch.
    """
    mod = unwrap(net)
    decoder = getattr(mod, "decoder", None)
    if decoder is None or not hasattr(decoder, "deep_supervision"):
        raise InputTypeError(f"set_deep_supervision needs a PlainConvUNet-like module with decoder.deep_supervision, "
                             f"got {type(mod).__name__}")
    decoder.deep_supervision = bool(on)
