"""Quantization specs and configs: how one tensor, and one module, is quantized."""

from __future__ import annotations

import numbers
import types
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["OUTPUT_CHANNELS", "QConfig", "QuantSpec"]

OUTPUT_CHANNELS = "output_channels"
"""``QuantSpec.axis`` value for one scale per output channel, wherever a module keeps them.

Each QAT module resolves it to its own axis: 0 for conv and linear weights,
1 for transposed conv weights and for every output."""

MIN_BITS = 2
MAX_BITS = 16


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _to_int(value: object) -> object:
    """Convert integral numbers such as ``numpy.int64`` to int; leave the rest to validators."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _check_bits(instance: QuantSpec, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"QuantSpec.bits must be an int, got {_describe(value)}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"QuantSpec.bits must be between {MIN_BITS} and {MAX_BITS}, got {value}")


def _check_bool(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, bool):
        owner = type(instance).__name__
        raise ValueError(f"{owner}.{attribute.name} must be a bool, got {_describe(value)}")


def _check_axis(instance: QuantSpec, attribute: attrs.Attribute, value: object) -> None:
    if value is None or value == OUTPUT_CHANNELS:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"QuantSpec.axis must be None (per-tensor), an int (per-channel along that axis) "
            f"or {OUTPUT_CHANNELS!r} (per output channel), got {_describe(value)}"
        )
    if value < 0:
        raise ValueError(
            f"QuantSpec.axis must be a non-negative channel axis, got {value}; "
            "count axes from the front (0 is the output-channel axis of a conv weight)"
        )


def _check_name(instance: QuantSpec, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"QuantSpec.{attribute.name} must be a non-empty str, got {_describe(value)}"
        )


def _freeze_options(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ValueError(
            f"QuantSpec.observer_options must be a mapping of option names to values, "
            f"got {_describe(value)}"
        )
    for key in value:
        if not isinstance(key, str):
            raise ValueError(f"QuantSpec.observer_options keys must be str, got {_describe(key)}")
    return types.MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class QuantSpec:
    """Describe how one tensor is quantized.

    The integer range ``[quant_min, quant_max]`` follows from ``bits``,
    ``signed`` and ``narrow_range``: signed 8-bit is ``[-128, 127]``
    (``[-127, 127]`` narrow), unsigned 8-bit is ``[0, 255]`` (``[1, 255]``
    narrow).

    Attributes:
        bits: Bit width of the integer codes, 2 to 16.
        signed: Signed (``int``) or unsigned (``uint``) codes.
        symmetric: Symmetric range around zero (zero point fixed) or affine
            range with a computed zero point.
        axis: ``None`` for one scale per tensor, the channel axis for one
            scale per channel, or :data:`OUTPUT_CHANNELS` for one scale per
            output channel along whatever axis the module keeps them.
        narrow_range: Drop the lowest code of a signed range, or code 0 of an
            unsigned one.
        observer: Name of the registered observer that records the range.
        observer_options: Keyword options passed to the observer factory.
        kernel: Name of the fake-quant kernel; ``"default"`` picks the
            registered kernel for the tensor's device, ``"reference"`` forces
            the core's reference kernel.
        power_of_two: Round each scale up to a power of two, for fixed-point
            targets whose rescaling is a shift.
        learnable: Train the scale (and, for an affine spec, the zero point)
            by gradient descent, as LSQ (symmetric) and LSQ+ (affine) do,
            starting from the observer's qparams.

    Raises:
        ValueError: A field has the wrong type or a value outside its range.
    """

    bits: int = attrs.field(default=8, converter=_to_int, validator=_check_bits)
    signed: bool = attrs.field(default=True, validator=_check_bool)
    symmetric: bool = attrs.field(default=True, validator=_check_bool)
    axis: int | str | None = attrs.field(default=None, converter=_to_int, validator=_check_axis)
    narrow_range: bool = attrs.field(default=False, validator=_check_bool)
    observer: str = attrs.field(default="moving_average_minmax", validator=_check_name)
    observer_options: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_freeze_options, hash=False
    )
    kernel: str = attrs.field(default="default", validator=_check_name)
    power_of_two: bool = attrs.field(default=False, validator=_check_bool)
    learnable: bool = attrs.field(default=False, validator=_check_bool)

    def __attrs_post_init__(self) -> None:
        if self.power_of_two and self.learnable:
            raise ValueError(
                "QuantSpec cannot be both power_of_two and learnable: gradient steps move a "
                "learned scale off powers of two; choose one of them"
            )

    @property
    def quant_min(self) -> int:
        """Smallest integer code."""
        if self.signed:
            return -(2 ** (self.bits - 1)) + int(self.narrow_range)
        return int(self.narrow_range)

    @property
    def quant_max(self) -> int:
        """Largest integer code."""
        if self.signed:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1

    @property
    def per_channel(self) -> bool:
        """Whether each channel along ``axis`` has its own scale and zero point."""
        return self.axis is not None

    def resolve_axis(self, output_channel_axis: int) -> QuantSpec:
        """Return this spec with :data:`OUTPUT_CHANNELS` replaced by ``output_channel_axis``.

        A spec with an int axis, or none, is returned unchanged. QAT modules
        call this before building a fake quantizer.
        """
        if self.axis != OUTPUT_CHANNELS:
            return self
        return attrs.evolve(self, axis=output_channel_axis)

    def __getstate__(self) -> dict[str, Any]:
        state = {field.name: getattr(self, field.name) for field in attrs.fields(QuantSpec)}
        state["observer_options"] = dict(self.observer_options)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Fields added after a spec was pickled take their defaults.
        for field in attrs.fields(QuantSpec):
            if field.name not in state and field.default is not attrs.NOTHING:
                object.__setattr__(self, field.name, field.default)
        for name, value in state.items():
            if name == "observer_options":
                value = _freeze_options(value)
            object.__setattr__(self, name, value)


def _check_spec(instance: QConfig, attribute: attrs.Attribute, value: object) -> None:
    if value is not None and not isinstance(value, QuantSpec):
        raise ValueError(
            f"QConfig.{attribute.name} must be a QuantSpec or None, got {_describe(value)}"
        )


@attrs.frozen(kw_only=True)
class QConfig:
    """Pair the specs for a module's weight and its output (activation).

    Either spec may be ``None``: that tensor then stays float.

    Raises:
        ValueError: ``weight`` or ``activation`` is neither a QuantSpec nor None.
    """

    weight: QuantSpec | None = attrs.field(default=None, validator=_check_spec)
    activation: QuantSpec | None = attrs.field(default=None, validator=_check_spec)
