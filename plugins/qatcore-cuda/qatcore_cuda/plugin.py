"""Entry point of the qatcore-cuda plugin: registers the Triton kernel for CUDA tensors.

The hook registers the kernel only where it can run. Otherwise it raises
:class:`qatcore.PluginUnavailable` with every missing requirement, and
``qatcore plugins`` lists the plugin as skipped with that reason.
"""

from __future__ import annotations

from qatcore import PluginUnavailable, Registry, hookimpl
from qatcore_cuda.kernel import fake_quantize_cuda, unavailable_reason


@hookimpl
def qatcore_register_kernels(registry: Registry) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise PluginUnavailable(reason)
    registry.register_kernel("default", "cuda", fake_quantize_cuda)
