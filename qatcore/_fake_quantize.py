"""The FakeQuantize module: an observer, its qparams and the kernel that applies them."""

from __future__ import annotations

from typing import Any

import torch

from qatcore._config import OUTPUT_CHANNELS, QuantSpec
from qatcore._observer import Float32Buffers, Observer
from qatcore._plugins import plugin_manager
from qatcore._reference import fake_quantize_reference
from qatcore._registry import Kernel

__all__ = ["FakeQuantize", "resolve_kernel"]


def resolve_kernel(name: str, device_type: str) -> Kernel:
    """Return the kernel registered as ``(name, device_type)``, or the reference kernel.

    ``"reference"`` always returns the reference kernel. A name registered
    for some device but not this one falls back to the reference kernel,
    which runs on every device.

    Raises:
        KeyError: ``name`` is registered for no device at all.
    """
    if name == "reference":
        return fake_quantize_reference
    kernels = plugin_manager().registry.kernels
    kernel = kernels.get((name, device_type))
    if kernel is not None:
        return kernel
    if name != "default" and not any(key[0] == name for key in kernels):
        raise KeyError(kernels.missing_message((name, device_type)))
    return fake_quantize_reference


class FakeQuantize(Float32Buffers):
    """Observe a tensor's range and fake-quantize the tensor with the resulting qparams.

    In training mode with the observer enabled, each call first folds the
    input's finite range into the observer and recomputes the qparams. Then
    the input is fake-quantized with them, as in ``torch.ao.quantization``'s
    ``FakeQuantize``. In eval mode the qparams stay as they are.

    The switches ``observer_enabled`` and ``fake_quant_enabled`` are plain
    attributes, because they change rarely and a compiled graph should see
    them as constants.

    Buffers:
        scale: float32, ``()`` per-tensor or ``(C,)`` per-channel.
        zero_point: int32, same shape.

    Args:
        spec: How the tensor is quantized.
        channels: Channel count along ``spec.axis``; required for per-channel specs.
        observer: An observer to use instead of the one ``spec.observer`` names.

    Raises:
        KeyError: ``spec.observer`` or ``spec.kernel`` is not registered; the
            message names the plugin to install.
        ValueError: A per-channel spec comes without a channel count, or
            its axis is still :data:`~qatcore.OUTPUT_CHANNELS`.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self, spec: QuantSpec, *, channels: int | None = None, observer: Observer | None = None
    ) -> None:
        super().__init__()
        if spec.axis == OUTPUT_CHANNELS:
            raise ValueError(
                f"QuantSpec(axis={OUTPUT_CHANNELS!r}) names no axis until a module resolves "
                "it; call spec.resolve_axis(axis) with the tensor's output-channel axis"
            )
        if spec.per_channel and (channels is None or channels < 1):
            raise ValueError(
                f"per-channel fake quantization along axis {spec.axis} needs the channel "
                f"count, got channels={channels!r}"
            )
        self.spec = spec
        self.channels = channels if spec.per_channel else None
        self.observer = observer or plugin_manager().registry.create_observer(spec, self.channels)
        resolve_kernel(spec.kernel, "cpu")  # fails early on an unknown kernel name

        shape = () if self.channels is None else (self.channels,)
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.observer_enabled = True
        self.fake_quant_enabled = True
        self._kernels: dict[str, Kernel] = {}

    @property
    def quant_min(self) -> int:
        """Smallest integer code."""
        return self.spec.quant_min

    @property
    def quant_max(self) -> int:
        """Largest integer code."""
        return self.spec.quant_max

    def kernel(self, device_type: str) -> Kernel:
        """Return the kernel for tensors of ``device_type``, looked up once per device type."""
        kernel = self._kernels.get(device_type)
        if kernel is None:
            kernel = resolve_kernel(self.spec.kernel, device_type)
            self._kernels[device_type] = kernel
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled and self.training:
            self.observer(x.detach())
            scale, zero_point = self.observer.calculate_qparams()
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        if not self.fake_quant_enabled:
            return x
        kernel = self.kernel(x.device.type)
        return kernel(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max, self.spec.axis
        )

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return copies of the scale and zero point in use."""
        return self.scale.detach().clone(), self.zero_point.detach().clone()

    def __getstate__(self) -> dict[str, Any]:
        # Kernels are looked up again after unpickling, in the new process's registry.
        state = self.__dict__.copy()
        state["_kernels"] = {}
        return state

    def extra_repr(self) -> str:
        return (
            f"bits={self.spec.bits}, signed={self.spec.signed}, "
            f"symmetric={self.spec.symmetric}, axis={self.spec.axis}, "
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, "
            f"observer_enabled={self.observer_enabled}, "
            f"fake_quant_enabled={self.fake_quant_enabled}"
        )
