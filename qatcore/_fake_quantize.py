"""The FakeQuantize module: an observer, its qparams and the kernel that applies them."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qatcore._config import OUTPUT_CHANNELS, QuantSpec
from qatcore._observer import Float32Buffers, Observer
from qatcore._plugins import plugin_manager
from qatcore._reference import (
    FLOAT32_EPS,
    fake_quantize_learnable_reference,
    fake_quantize_reference,
)
from qatcore._registry import Kernel, ObservingKernel

__all__ = ["FakeQuantize", "resolve_kernel"]


def resolve_kernel(name: str, device_type: str, *, learnable: bool = False) -> Kernel:
    """Return the kernel registered as ``(name, device_type)``, or the reference kernel.

    ``"reference"`` always returns the reference kernel. A name registered
    for some device but not this one falls back to the reference kernel,
    which runs on every device. With ``learnable=True`` the lookup uses the
    learnable kernels and their reference,
    :func:`~qatcore.fake_quantize_learnable_reference`; a name registered
    only as a plain kernel falls back to that reference too.

    Raises:
        KeyError: ``name`` is registered for no device at all.
    """
    registry = plugin_manager().registry
    if learnable:
        kernels, reference = registry.learnable_kernels, fake_quantize_learnable_reference
    else:
        kernels, reference = registry.kernels, fake_quantize_reference
    if name == "reference":
        return reference
    kernel = kernels.get((name, device_type))
    if kernel is not None:
        return kernel
    known = (key[0] == name for table in (registry.kernels, kernels) for key in table)
    if name != "default" and not any(known):
        raise KeyError(kernels.missing_message((name, device_type)))
    return reference


class FakeQuantize(Float32Buffers):
    """Observe a tensor's range and fake-quantize the tensor with the resulting qparams.

    In training mode with the observer enabled, each call first folds the
    input's finite range into the observer and recomputes the qparams. Then
    the input is fake-quantized with them, as in ``torch.ao.quantization``'s
    ``FakeQuantize``. In eval mode the qparams stay as they are.

    With ``spec.learnable`` the scale, and an affine spec's zero point, are
    float32 ``nn.Parameter``s trained by gradient descent: LSQ for symmetric
    specs, LSQ+ for affine ones. The observer initialises them. While it is
    enabled in training mode, every call overwrites them with the observer's
    qparams, as ``torch.ao``'s ``_LearnableFakeQuantize`` does with static
    estimation on. After :func:`qatcore.freeze_observers`, the optimizer's
    updates are what changes them. The gradients reach the parameters in both
    phases. A symmetric spec's zero point is a float32 buffer fixed at the
    spec's middle code. The scale and zero-point gradients are multiplied by
    LSQ's gradient scale ``1 / sqrt(numel_per_scale * quant_max)``, where
    ``numel_per_scale`` counts the input's elements per channel (per-channel)
    or in the whole input (per-tensor).

    The switches ``observer_enabled`` and ``fake_quant_enabled`` are plain
    attributes, because they change rarely and a compiled graph should see
    them as constants.

    Buffers (parameters where learnable):
        scale: float32, ``()`` per-tensor or ``(C,)`` per-channel.
        zero_point: int32, same shape; float32 when learnable.

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
        # Plain attributes go straight into the instance dict: nn.Module's
        # __setattr__ would only check that no parameter, buffer or module has
        # the name, and a swap builds thousands of these modules.
        self.__dict__.update(spec=spec, channels=channels if spec.per_channel else None)
        self.observer = observer or plugin_manager().registry.create_observer(spec, self.channels)
        # Fails early on an unknown kernel name. The CPU kernel is cached now,
        # so that a compiled graph's first call finds the cache as later ones do.
        cpu_kernel = resolve_kernel(spec.kernel, "cpu", learnable=spec.learnable)

        shape = () if self.channels is None else (self.channels,)
        if spec.learnable:
            self._init_learnable_qparams(shape)
        else:
            self.register_buffer("scale", torch.ones(shape, dtype=torch.float32))
            self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        kernels: dict[str, Kernel] = {"cpu": cpu_kernel}
        self.__dict__.update(observer_enabled=True, fake_quant_enabled=True, _kernels=kernels)

    def _init_learnable_qparams(self, shape: tuple[int, ...]) -> None:
        self.scale = nn.Parameter(torch.ones(shape, dtype=torch.float32))
        if self.spec.symmetric:
            # The middle code, as the observers compute it for symmetric specs.
            middle = 0 if self.spec.signed else (self.quant_min + self.quant_max + 1) // 2
            self.register_buffer("zero_point", torch.full(shape, middle, dtype=torch.float32))
        else:
            self.zero_point = nn.Parameter(torch.zeros(shape, dtype=torch.float32))

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
            kernel = resolve_kernel(self.spec.kernel, device_type, learnable=self.spec.learnable)
            self._kernels[device_type] = kernel
        return kernel

    def grad_factor(self, x: torch.Tensor) -> float:
        """Return LSQ's gradient scale for input ``x``: ``1 / sqrt(numel_per_scale * quant_max)``.

        It uses only the input's shape, so no tensor value is read. An empty
        input counts as one element per scale.
        """
        numel = x.numel()
        if self.spec.axis is not None and x.dim() > self.spec.axis:
            numel //= max(x.shape[self.spec.axis], 1)
        return 1.0 / math.sqrt(max(numel, 1) * self.quant_max)

    def observing_kernel(self, device_type: str) -> ObservingKernel | None:
        """Return the kernel that runs this module's training step on ``device_type``, if any.

        See :meth:`Registry.register_observing_kernel`. Learnable specs and
        compiled graphs have none. The lookup runs once per device type.
        """
        if self.spec.learnable or torch.compiler.is_compiling():
            return None
        cache = self.__dict__.setdefault("_observing_kernels", {})
        if device_type not in cache:
            table = plugin_manager().registry.observing_kernels
            cache[device_type] = table.get((self.spec.kernel, device_type))
        return cache[device_type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled and self.training:
            fused = self.observing_kernel(x.device.type) if self.fake_quant_enabled else None
            out = fused(x, self) if fused is not None else None
            if out is not None:
                return out
            self.observer(x.detach())
            scale, zero_point = self.observer.calculate_qparams()
            # The qparams are parameters when learnable; writing the
            # observer's values into them is no step autograd should see.
            with torch.no_grad():
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
        if not self.fake_quant_enabled:
            return x
        kernel = self.kernel(x.device.type)
        if self.spec.learnable:
            return kernel(
                x,
                self.scale,
                self.zero_point,
                self.quant_min,
                self.quant_max,
                self.spec.axis,
                self.grad_factor(x),
            )
        return kernel(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max, self.spec.axis
        )

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return copies of the scale (float32) and zero point (int32) in use.

        A learned scale is clamped to at least float32 eps and a learned
        zero point is rounded half to even and clamped to the integer range,
        as the fake quantization applies them.
        """
        if not self.spec.learnable:
            return self.scale.detach().clone(), self.zero_point.detach().clone()
        scale = torch.clamp(self.scale.detach(), min=FLOAT32_EPS)
        zero_point = torch.round(self.zero_point.detach()).clamp(self.quant_min, self.quant_max)
        return scale.clone(), zero_point.to(torch.int32)

    def get_extra_state(self) -> torch.Tensor:
        """Return what the saved qparams mean: ``[quant_min, quant_max, symmetric, axis]``.

        It is saved in the ``state_dict`` as ``_extra_state``, so that a
        load checks that the qparams were trained for this module's codes.
        ``axis`` is -1 for a per-tensor spec.
        """
        axis = self.spec.axis if isinstance(self.spec.axis, int) else -1
        return torch.tensor(
            [self.quant_min, self.quant_max, int(self.spec.symmetric), axis], dtype=torch.int64
        )

    def set_extra_state(self, state: Any) -> None:
        """Accept the saved ``_extra_state``, which :meth:`_load_from_state_dict` has checked."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = f"{prefix}_extra_state"
        expected = self.get_extra_state()
        mismatch = key in state_dict and not torch.equal(
            torch.as_tensor(state_dict[key]).cpu(), expected
        )
        if mismatch:
            error_msgs.append(
                f"{prefix[:-1] or '<root>'}: its saved qparams were trained for "
                f"{_describe_extra_state(state_dict[key])}, but this fake quantizer uses "
                f"{_describe_extra_state(expected)}; load the state_dict into the model "
                "swapped with the QConfig it was trained with"
            )
            state_dict = {name: value for name, value in state_dict.items() if name != key}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A state_dict without the key, such as one saved before qatcore
        # recorded the codes, stays among the missing keys: load_state_dict
        # rejects it unless strict=False, where the caller sees it listed.
        if mismatch and key in missing_keys:
            missing_keys.remove(key)  # reported above

    def __getstate__(self) -> dict[str, Any]:
        # Kernels are looked up again after unpickling, in the new process's registry.
        state = self.__dict__.copy()
        state["_kernels"] = {}
        state.pop("_observing_kernels", None)
        return state

    def extra_repr(self) -> str:
        return (
            f"bits={self.spec.bits}, signed={self.spec.signed}, "
            f"symmetric={self.spec.symmetric}, axis={self.spec.axis}, "
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, "
            f"learnable={self.spec.learnable}, "
            f"observer_enabled={self.observer_enabled}, "
            f"fake_quant_enabled={self.fake_quant_enabled}"
        )


def _describe_extra_state(state: Any) -> str:
    values = [int(value) for value in torch.as_tensor(state).flatten().tolist()]
    if len(values) != 4:
        return f"an unknown scheme {values}"
    quant_min, quant_max, symmetric, axis = values
    scheme = "symmetric" if symmetric else "affine"
    per = "per tensor" if axis < 0 else f"per channel along axis {axis}"
    return f"{scheme} codes [{quant_min}, {quant_max}] {per}"
