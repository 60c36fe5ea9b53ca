"""Entry point of the qatcore-linear plugin: registers the QAT linear and its fusions."""

from __future__ import annotations

from torch import nn

from qatcore import Registry, hookimpl
from qatcore_linear.linear_bn import LinearBn1d, LinearBnReLU1d
from qatcore_linear.modules import Linear, LinearReLU


@hookimpl
def qatcore_register_modules(registry: Registry) -> None:
    registry.register_module(nn.Linear, Linear)
    for fused_type in (LinearReLU, LinearBn1d, LinearBnReLU1d):
        registry.register_fusion(fused_type.float_types, fused_type)
