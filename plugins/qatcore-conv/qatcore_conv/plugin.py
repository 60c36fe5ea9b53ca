"""Entry point of the qatcore-conv plugin: registers the QAT convs and their fusions."""

from __future__ import annotations

from qatcore import Registry, hookimpl
from qatcore_conv.conv_bn import (
    ConvBn1d,
    ConvBn2d,
    ConvBn3d,
    ConvBnReLU1d,
    ConvBnReLU2d,
    ConvBnReLU3d,
)
from qatcore_conv.modules import Conv1d, Conv2d, Conv3d, ConvReLU1d, ConvReLU2d, ConvReLU3d
from qatcore_conv.transposed import (
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    ConvTransposeReLU1d,
    ConvTransposeReLU2d,
    ConvTransposeReLU3d,
)
from qatcore_conv.transposed_bn import (
    ConvTransposeBn1d,
    ConvTransposeBn2d,
    ConvTransposeBn3d,
    ConvTransposeBnReLU1d,
    ConvTransposeBnReLU2d,
    ConvTransposeBnReLU3d,
)


@hookimpl
def qatcore_register_modules(registry: Registry) -> None:
    for qat_type in (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d):
        registry.register_module(qat_type.float_types[0], qat_type)
    fused_types = (
        ConvReLU1d,
        ConvReLU2d,
        ConvReLU3d,
        ConvBn1d,
        ConvBn2d,
        ConvBn3d,
        ConvBnReLU1d,
        ConvBnReLU2d,
        ConvBnReLU3d,
        ConvTransposeReLU1d,
        ConvTransposeReLU2d,
        ConvTransposeReLU3d,
        ConvTransposeBn1d,
        ConvTransposeBn2d,
        ConvTransposeBn3d,
        ConvTransposeBnReLU1d,
        ConvTransposeBnReLU2d,
        ConvTransposeBnReLU3d,
    )
    for fused_type in fused_types:
        registry.register_fusion(fused_type.float_types, fused_type)
