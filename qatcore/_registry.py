"""The registry: what each plugin provides, and which plugin provided it."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs
import torch
from torch import nn

if TYPE_CHECKING:
    from qatcore._config import QConfig, QuantSpec
    from qatcore._fake_quantize import FakeQuantize
    from qatcore._observer import Observer

__all__ = [
    "Converter",
    "Entry",
    "Exporter",
    "Kernel",
    "ObserverFactory",
    "ObservingKernel",
    "Registry",
    "RegistryError",
    "Table",
]

K = TypeVar("K")
V = TypeVar("V")

Kernel = Callable[..., torch.Tensor]
"""A fake-quant kernel: ``kernel(x, scale, zero_point, quant_min, quant_max, axis)``.

A learnable kernel takes ``grad_factor`` as a seventh argument and also
returns gradients for the scale and zero point."""

ObservingKernel = Callable[[torch.Tensor, "FakeQuantize"], "torch.Tensor | None"]
"""A kernel for a FakeQuantize's training step: ``kernel(x, fake_quantize)``, see
:meth:`Registry.register_observing_kernel`."""

Converter = Callable[[nn.Module], nn.Module]
"""Build an int8 model from a QAT model: ``converter(qat_model)``, see
:meth:`Registry.register_converter`."""

Exporter = Callable[..., Any]
"""Write a QAT model to a file: ``exporter(qat_model, path, example_inputs, **options)``,
see :meth:`Registry.register_exporter`."""

ObserverFactory = Callable[..., "Observer"]
"""Build an observer: ``factory(spec, channels, **spec.observer_options)``."""

# First-party plugins and what they provide, so that the error of a missed
# lookup can name the distribution to install.
_PROVIDERS: dict[str, dict[object, str]] = {
    "module mapping": {
        nn.Conv1d: "qatcore-conv",
        nn.Conv2d: "qatcore-conv",
        nn.Conv3d: "qatcore-conv",
        nn.ConvTranspose1d: "qatcore-conv",
        nn.ConvTranspose2d: "qatcore-conv",
        nn.ConvTranspose3d: "qatcore-conv",
        nn.Linear: "qatcore-linear",
    },
    "fusion": {
        **{
            pattern: "qatcore-conv"
            for conv, bn in (
                (nn.Conv1d, nn.BatchNorm1d),
                (nn.Conv2d, nn.BatchNorm2d),
                (nn.Conv3d, nn.BatchNorm3d),
                (nn.ConvTranspose1d, nn.BatchNorm1d),
                (nn.ConvTranspose2d, nn.BatchNorm2d),
                (nn.ConvTranspose3d, nn.BatchNorm3d),
            )
            for pattern in ((conv, nn.ReLU), (conv, bn), (conv, bn, nn.ReLU))
        },
        (nn.Linear, nn.ReLU): "qatcore-linear",
        (nn.Linear, nn.BatchNorm1d): "qatcore-linear",
        (nn.Linear, nn.BatchNorm1d, nn.ReLU): "qatcore-linear",
    },
    "observer": {
        "minmax": "qatcore-observers",
        "moving_average_minmax": "qatcore-observers",
        "histogram": "qatcore-observers",
    },
    "kernel": {("default", "cpu"): "qatcore-cpu", ("default", "cuda"): "qatcore-cuda"},
    "learnable kernel": {("default", "cpu"): "qatcore-cpu"},
    "observing kernel": {("default", "cpu"): "qatcore-cpu"},
    "qconfig": {"x86": "qatcore-x86", "arm": "qatcore-arm", "tensorrt": "qatcore-tensorrt"},
    "converter": {"x86": "qatcore-x86", "arm": "qatcore-arm"},
    "exporter": {"onnx": "qatcore-onnx", "tensorrt": "qatcore-tensorrt"},
}


USER = "user"
"""Plugin name of entries registered with ``qatcore.register_*`` calls."""


def install_hint(distribution: str) -> str:
    """Return the advice for a missing key that the first-party ``distribution`` provides."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return f"install the {distribution} plugin to provide it"
    return (
        f"the {distribution} plugin provides it and is installed but not loaded: it failed "
        "to load, it reported a missing requirement, or QATCORE_BLOCK_PLUGINS or "
        "QATCORE_DISABLE_PLUGIN_AUTOLOAD skipped it; run `qatcore plugins` to see which"
    )


FIRST_PARTY = frozenset(
    distribution for provided in _PROVIDERS.values() for distribution in provided.values()
)
"""Distributions of the first-party plugins, which load before third-party ones."""


class RegistryError(ValueError):
    """A registration conflicts with an earlier one, or is malformed."""


def describe_key(key: object) -> str:
    """Return a readable name for a registry key: a class, a tuple of classes or a value."""
    if isinstance(key, type):
        if getattr(nn, key.__name__, None) is key:
            return f"torch.nn.{key.__name__}"
        return f"{key.__module__}.{key.__qualname__}"
    if isinstance(key, tuple):
        return "(" + ", ".join(describe_key(part) for part in key) + ")"
    return repr(key)


@attrs.frozen
class Entry(Generic[V]):
    """A registered value, the plugin that registered it, and whether it may replace another."""

    value: V
    plugin: str
    override: bool = attrs.field(default=False, eq=False)


class Table(Mapping[K, V]):
    """One kind of registration, keyed like a dict and remembering each entry's plugin.

    Lookups speak the mapping protocol: ``key in table``, ``table.get(key)``
    and ``table[key]``, whose ``KeyError`` names what is registered and
    which distribution would provide the key.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[K, Entry[V]] = {}

    def __getitem__(self, key: K) -> V:
        try:
            return self._entries[key].value
        except KeyError:
            raise KeyError(self.missing_message(key)) from None

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, key: K) -> Entry[V]:
        """Return the value and plugin registered under ``key``."""
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(self.missing_message(key)) from None

    def provider_hint(self, key: object) -> str | None:
        """Return the first-party distribution that provides ``key``, if there is one."""
        return _PROVIDERS.get(self.kind, {}).get(key)

    def missing_message(self, key: object) -> str:
        """Describe a missed lookup: the key, what is registered, and what to install."""
        registered = ", ".join(sorted(describe_key(k) for k in self._entries)) or "none"
        message = f"no {self.kind} registered for {describe_key(key)} (registered: {registered})"
        hint = self.provider_hint(key)
        if hint is not None:
            message += "; " + install_hint(hint)
        return message

    def add(self, key: K, value: V, *, plugin: str, override: bool = False) -> None:
        """Register ``value`` under ``key`` for ``plugin``.

        Raises:
            RegistryError: ``key`` is registered already and ``override`` is false.
        """
        self.check_free(key, plugin=plugin, override=override)
        self._entries[key] = Entry(value, plugin, override)

    def check_free(self, key: K, *, plugin: str, override: bool = False) -> None:
        """Raise :class:`RegistryError` if ``key`` is taken and ``override`` is false."""
        previous = self._entries.get(key)
        if previous is not None and not override:
            raise RegistryError(
                f"{self.kind} {describe_key(key)} from plugin {plugin!r} conflicts with the "
                f"one registered by plugin {previous.plugin!r}; pass override=True to replace it"
            )

    def merge_plan(self, other: Table[K, V]) -> list[tuple[K, Entry[V]]]:
        """Return the entries of ``other`` that a merge adds, checking every key first.

        An entry of ``other`` registered with ``override=True`` replaces this
        table's. A user's entry registered with ``override=True`` stays when
        a plugin registers the same key, and the plugin's entry is dropped.

        Raises:
            RegistryError: A key is in both tables and neither side overrides.
        """
        added = []
        for key, entry in other._entries.items():
            previous = self._entries.get(key)
            user_kept = previous is not None and previous.plugin == USER and previous.override
            if user_kept and entry.plugin != USER:
                continue
            self.check_free(key, plugin=entry.plugin, override=entry.override)
            added.append((key, entry))
        return added

    def update(self, other: Table[K, V]) -> None:
        """Add every entry of ``other`` as :meth:`merge_plan` decides, or none on a conflict."""
        for key, entry in self.merge_plan(other):
            self._entries[key] = entry

    def by_plugin(self, plugin: str) -> list[K]:
        """Return the keys that ``plugin`` registered."""
        return [key for key, entry in self._entries.items() if entry.plugin == plugin]


def _check_name(what: str, value: object, example: str = "") -> None:
    if not isinstance(value, str) or not value:
        raise RegistryError(f"{what} must be a non-empty str{example}, got {value!r}")


def _describe_types(types: tuple[type, ...]) -> str:
    return "(" + ", ".join(describe_key(kind) for kind in types) + ")"


def _check_device_type(value: object) -> None:
    _check_name("device type", value, " such as 'cpu' or 'cuda'")
    try:
        device_type = torch.device(value).type
    except RuntimeError:
        device_type = None
    if device_type != value:
        raise RegistryError(
            f"device type must be a torch device type without an index, such as 'cpu' or "
            f"'cuda', got {value!r}; kernels are looked up by tensor.device.type"
        )


def _check_type(kind: str, value: object, base: type | None = None) -> None:
    if not isinstance(value, type) or (base is not None and not issubclass(value, base)):
        expected = f"a subclass of {describe_key(base)}" if base is not None else "a class"
        raise RegistryError(f"{kind} must be {expected}, got {value!r}")


class Registry:
    """Everything the installed plugins provide, keyed for lookup.

    Plugins receive a registry in their registration hooks and call its
    ``register_*`` methods. Each entry records the registering plugin. A
    second registration of the same key is an error naming both plugins,
    unless it passes ``override=True``.

    Attributes:
        modules: Float module type to QAT module type.
        fusions: Tuple of float module types, in call order, to fused QAT type.
        observers: Observer name to observer factory.
        kernels: ``(kernel name, device type)`` to fake-quant kernel.
        learnable_kernels: ``(kernel name, device type)`` to learnable
            fake-quant kernel, for specs with ``learnable=True``.
        observing_kernels: ``(kernel name, device type)`` to a kernel that
            runs a :class:`FakeQuantize`'s whole training step.
        qconfigs: Preset name to :class:`QConfig`.
        converters: Backend name to the converter that builds its int8 model.
        exporters: Format name to the exporter that writes it.
    """

    def __init__(self, plugin: str = "user") -> None:
        self.plugin = plugin
        self.modules: Table[type[nn.Module], type[nn.Module]] = Table("module mapping")
        self.fusions: Table[tuple[type[nn.Module], ...], type[nn.Module]] = Table("fusion")
        self.observers: Table[str, ObserverFactory] = Table("observer")
        self.kernels: Table[tuple[str, str], Kernel] = Table("kernel")
        self.learnable_kernels: Table[tuple[str, str], Kernel] = Table("learnable kernel")
        self.observing_kernels: Table[tuple[str, str], ObservingKernel] = Table("observing kernel")
        self.qconfigs: Table[str, QConfig] = Table("qconfig")
        self.converters: Table[str, Converter] = Table("converter")
        self.exporters: Table[str, Exporter] = Table("exporter")

    def tables(self) -> dict[str, Table[Any, Any]]:
        """Return every table by its attribute name."""
        return {
            "modules": self.modules,
            "fusions": self.fusions,
            "observers": self.observers,
            "kernels": self.kernels,
            "learnable_kernels": self.learnable_kernels,
            "observing_kernels": self.observing_kernels,
            "qconfigs": self.qconfigs,
            "converters": self.converters,
            "exporters": self.exporters,
        }

    def register_module(
        self, float_type: type[nn.Module], qat_type: type[nn.Module], *, override: bool = False
    ) -> None:
        """Map ``float_type`` to ``qat_type``, which must implement :class:`QATModule`.

        Raises:
            RegistryError: Either is not a module class, ``qat_type`` does not
                implement the QAT protocol, or ``float_type`` is mapped already.
        """
        from qatcore._protocol import QATModule

        _check_type("float_type", float_type, nn.Module)
        _check_type("qat_type", qat_type, QATModule)
        declared = getattr(qat_type, "float_types", None)
        if declared is not None and tuple(declared) != (float_type,):
            raise RegistryError(
                f"{describe_key(qat_type)} is built from {_describe_types(declared)} "
                f"(its float_types), so it cannot be the QAT type of {describe_key(float_type)}"
            )
        self.modules.add(float_type, qat_type, plugin=self.plugin, override=override)

    def register_fusion(
        self,
        pattern: tuple[type[nn.Module], ...],
        fused_qat_type: type[nn.Module],
        *,
        override: bool = False,
    ) -> None:
        """Fuse consecutive modules of ``pattern`` into one ``fused_qat_type``.

        Raises:
            RegistryError: The pattern has fewer than two module classes,
                ``fused_qat_type`` does not implement the QAT protocol, or the
                pattern is registered already.
        """
        from qatcore._protocol import QATModule

        if not isinstance(pattern, tuple) or len(pattern) < 2:
            raise RegistryError(
                f"a fusion pattern must be a tuple of at least two module classes, got {pattern!r}"
            )
        for part in pattern:
            _check_type("each fusion pattern member", part, nn.Module)
        _check_type("fused_qat_type", fused_qat_type, QATModule)
        declared = getattr(fused_qat_type, "float_types", None)
        if declared is not None and tuple(declared) != pattern:
            raise RegistryError(
                f"{describe_key(fused_qat_type)} is built from {_describe_types(declared)} "
                f"(its float_types), so it cannot fuse {_describe_types(pattern)}"
            )
        self.fusions.add(pattern, fused_qat_type, plugin=self.plugin, override=override)

    def register_observer(
        self, name: str, factory: ObserverFactory, *, override: bool = False
    ) -> None:
        """Make ``factory(spec, channels, **options)`` available as ``QuantSpec(observer=name)``.

        Raises:
            RegistryError: ``factory`` is not callable, or ``name`` is taken.
        """
        _check_name("observer name", name)
        if not callable(factory):
            raise RegistryError(f"observer factory for {name!r} must be callable, got {factory!r}")
        self.observers.add(name, factory, plugin=self.plugin, override=override)

    def register_kernel(
        self,
        name: str,
        device_type: str,
        kernel: Kernel,
        *,
        learnable: bool = False,
        override: bool = False,
    ) -> None:
        """Use ``kernel`` for ``QuantSpec(kernel=name)`` on tensors of ``device_type``.

        With ``learnable=True`` the kernel serves specs with
        ``learnable=True`` instead: it is called as ``kernel(x, scale,
        zero_point, quant_min, quant_max, axis, grad_factor)`` and gives
        gradients to the scale and zero point as
        :func:`qatcore.fake_quantize_learnable_reference` does. The two kinds
        are separate tables, so one name and device type can have both.

        Raises:
            RegistryError: ``kernel`` is not callable, ``name`` is
                ``"reference"`` (the core's own), or the pair is taken.
        """
        _check_name("kernel name", name)
        _check_device_type(device_type)
        if not callable(kernel):
            raise RegistryError(f"kernel {name!r} for {device_type!r} must be callable")
        if name == "reference":
            raise RegistryError(
                "the kernel name 'reference' is the core's reference kernel and cannot be "
                "registered; register under 'default' or a name of your own"
            )
        table = self.learnable_kernels if learnable else self.kernels
        table.add((name, device_type), kernel, plugin=self.plugin, override=override)

    def register_observing_kernel(
        self, name: str, device_type: str, kernel: ObservingKernel, *, override: bool = False
    ) -> None:
        """Let ``kernel`` run the training step of ``QuantSpec(kernel=name)`` on ``device_type``.

        In training mode with its observer and fake quantization enabled, a
        non-learnable :class:`FakeQuantize` calls ``kernel(x, fake_quantize)``
        in place of its three steps: observe ``x``, compute the qparams,
        fake-quantize ``x``. The kernel returns the fake-quantized ``x`` and
        leaves the observer's buffers and the module's ``scale`` and
        ``zero_point`` exactly as the three steps would. For an observer,
        spec or input it does not handle it returns ``None``, and the module
        runs the three steps. It is never called while a graph is compiled.
        A plain kernel of the same name and device type, registered with
        :meth:`register_kernel`, serves eval mode and the declined steps.

        Raises:
            RegistryError: ``kernel`` is not callable, ``name`` is
                ``"reference"``, or the pair is taken.
        """
        _check_name("kernel name", name)
        _check_device_type(device_type)
        if not callable(kernel):
            raise RegistryError(f"observing kernel {name!r} for {device_type!r} must be callable")
        if name == "reference":
            raise RegistryError(
                "the kernel name 'reference' is the core's reference kernel and cannot be "
                "registered; register under 'default' or a name of your own"
            )
        self.observing_kernels.add(
            (name, device_type), kernel, plugin=self.plugin, override=override
        )

    def register_qconfig(self, name: str, qconfig: QConfig, *, override: bool = False) -> None:
        """Make ``qconfig`` available as ``qatcore.get_qconfig(name)``.

        Raises:
            RegistryError: ``qconfig`` is not a QConfig, or ``name`` is taken.
        """
        from qatcore._config import QConfig

        _check_name("qconfig name", name)
        if not isinstance(qconfig, QConfig):
            raise RegistryError(f"qconfig {name!r} must be a QConfig, got {qconfig!r}")
        self.qconfigs.add(name, qconfig, plugin=self.plugin, override=override)

    def register_converter(
        self, backend: str, converter: Converter, *, override: bool = False
    ) -> None:
        """Make ``converter`` serve ``qatcore.convert(model, backend)``.

        ``converter(qat_model)`` returns the int8 model and leaves
        ``qat_model`` unchanged. It reads the model through
        :func:`qatcore.quantized_layers` (or :func:`qatcore.replace_layers`)
        and raises :class:`qatcore.DeployError` naming the module, the
        operation and the backend for anything the backend cannot run.

        Raises:
            RegistryError: ``converter`` is not callable, or ``backend`` is taken.
        """
        _check_name("backend name", backend)
        if not callable(converter):
            raise RegistryError(f"converter for {backend!r} must be callable, got {converter!r}")
        self.converters.add(backend, converter, plugin=self.plugin, override=override)

    def register_exporter(self, format: str, exporter: Exporter, *, override: bool = False) -> None:
        """Make ``exporter`` serve ``qatcore.export(model, path, example_inputs, format=format)``.

        ``exporter(qat_model, path, example_inputs, **options)`` writes the
        file, leaves ``qat_model`` unchanged and returns what it measured or
        ``None``. It raises :class:`qatcore.DeployError` naming the module,
        the operation and the format for anything it cannot write.

        Raises:
            RegistryError: ``exporter`` is not callable, or ``format`` is taken.
        """
        _check_name("export format", format)
        if not callable(exporter):
            raise RegistryError(f"exporter for {format!r} must be callable, got {exporter!r}")
        self.exporters.add(format, exporter, plugin=self.plugin, override=override)

    def merge(self, other: Registry) -> None:
        """Add ``other``'s entries, or none of them when one conflicts.

        Each entry keeps the ``override`` flag it was registered with; see
        :meth:`Table.merge_plan`.

        Raises:
            RegistryError: A key is taken and neither entry overrides.
        """
        mine = self.tables()
        plans = {name: mine[name].merge_plan(table) for name, table in other.tables().items()}
        for name, added in plans.items():
            for key, entry in added:
                mine[name]._entries[key] = entry

    def create_observer(self, spec: QuantSpec, channels: int | None) -> Observer:
        """Build the observer that ``spec`` names.

        Raises:
            KeyError: No observer of that name is registered.
            ValueError: The observer rejects ``spec.observer_options``.
        """
        factory = self.observers[spec.observer]
        try:
            return factory(spec, channels, **spec.observer_options)
        except TypeError as error:
            options = dict(spec.observer_options)
            raise ValueError(
                f"observer {spec.observer!r} does not accept observer_options={options}: {error}"
            ) from None

    def registrations(self, plugin: str) -> dict[str, list[object]]:
        """Return, per table, the keys that ``plugin`` registered."""
        found = {name: table.by_plugin(plugin) for name, table in self.tables().items()}
        return {name: keys for name, keys in found.items() if keys}
