"""Entry point of the qatcore-conv plugin: registers the QAT convs and conv-ReLU fusion."""

from __future__ import annotations

from qatcore import Registry, hookimpl
from qatcore_conv.modules import Conv1d, Conv2d, Conv3d, ConvReLU1d, ConvReLU2d, ConvReLU3d
from qatcore_conv.transposed import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d


@hookimpl
def qatcore_register_modules(registry: Registry) -> None:
    for qat_type in (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d):
        registry.register_module(qat_type.float_types[0], qat_type)
    for fused_type in (ConvReLU1d, ConvReLU2d, ConvReLU3d):
        registry.register_fusion(fused_type.float_types, fused_type)
