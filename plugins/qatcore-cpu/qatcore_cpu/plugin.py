"""Entry point of the qatcore-cpu plugin: registers the CPU fake-quant kernels."""

from __future__ import annotations

from qatcore import Registry, hookimpl
from qatcore_cpu import native
from qatcore_cpu.kernel import fake_quantize_cpu
from qatcore_cpu.learnable import fake_quantize_learnable_cpu
from qatcore_cpu.observing import observe_and_fake_quantize_cpu


@hookimpl
def qatcore_register_kernels(registry: Registry) -> None:
    registry.register_kernel("default", "cpu", fake_quantize_cpu)
    registry.register_kernel("default", "cpu", fake_quantize_learnable_cpu, learnable=True)
    registry.register_observing_kernel("default", "cpu", observe_and_fake_quantize_cpu)


@hookimpl
def qatcore_plugin_notes() -> list[str]:
    reason = native.status()
    return [] if reason is None else [reason]
