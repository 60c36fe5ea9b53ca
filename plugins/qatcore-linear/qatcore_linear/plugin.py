"""Entry point of the qatcore-linear plugin: registers the QAT linear and linear-ReLU fusion."""

from __future__ import annotations

from torch import nn

from qatcore import Registry, hookimpl
from qatcore_linear.modules import Linear, LinearReLU


@hookimpl
def qatcore_register_modules(registry: Registry) -> None:
    registry.register_module(nn.Linear, Linear)
    registry.register_fusion((nn.Linear, nn.ReLU), LinearReLU)
