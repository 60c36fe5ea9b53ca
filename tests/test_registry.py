"""The registry: validated registrations, per-plugin attribution, mapping lookups, atomic merges."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import nn

import qatcore
from qatcore import QATModule, QConfig, QuantSpec, Registry, RegistryError
from qatcore._registry import FIRST_PARTY, Entry, Table


class QATLinear(QATModule, nn.Linear):
    """A QAT type that the registry tests register but never build."""

    float_types = (nn.Linear,)

    @classmethod
    def from_float(cls, module, qconfig, *, name=""):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def to_float(self) -> nn.Module:
        raise NotImplementedError


class OtherQATLinear(QATLinear):
    """A second QAT type for nn.Linear, to replace QATLinear with."""


class QATLinearReLU(QATLinear):
    """A fused QAT type for the pattern (nn.Linear, nn.ReLU)."""

    float_types = (nn.Linear, nn.ReLU)


class OtherQATLinearReLU(QATLinearReLU):
    """A second fused QAT type for (nn.Linear, nn.ReLU), to replace QATLinearReLU with."""


def observer_factory(spec: QuantSpec, channels: int | None, **options: Any) -> nn.Module:
    return nn.Identity()


def other_observer_factory(spec: QuantSpec, channels: int | None, **options: Any) -> nn.Module:
    return nn.Identity()


def kernel(x: torch.Tensor, *args: object) -> torch.Tensor:
    return x


def other_kernel(x: torch.Tensor, *args: object) -> torch.Tensor:
    return x


QCONFIG = QConfig(weight=QuantSpec(axis=0), activation=QuantSpec(signed=False))
OTHER_QCONFIG = QConfig(weight=QuantSpec(bits=4))

# One valid registration per table: the table's attribute name, the key, and
# calls that register a first and a second value under that key.
Register = Callable[..., None]
REGISTRATIONS = [
    pytest.param(
        "modules",
        nn.Linear,
        lambda registry, **kw: registry.register_module(nn.Linear, QATLinear, **kw),
        lambda registry, **kw: registry.register_module(nn.Linear, OtherQATLinear, **kw),
        QATLinear,
        OtherQATLinear,
        id="module",
    ),
    pytest.param(
        "fusions",
        (nn.Linear, nn.ReLU),
        lambda registry, **kw: registry.register_fusion((nn.Linear, nn.ReLU), QATLinearReLU, **kw),
        lambda registry, **kw: registry.register_fusion(
            (nn.Linear, nn.ReLU), OtherQATLinearReLU, **kw
        ),
        QATLinearReLU,
        OtherQATLinearReLU,
        id="fusion",
    ),
    pytest.param(
        "observers",
        "custom_minmax",
        lambda registry, **kw: registry.register_observer("custom_minmax", observer_factory, **kw),
        lambda registry, **kw: registry.register_observer(
            "custom_minmax", other_observer_factory, **kw
        ),
        observer_factory,
        other_observer_factory,
        id="observer",
    ),
    pytest.param(
        "kernels",
        ("fast", "cpu"),
        lambda registry, **kw: registry.register_kernel("fast", "cpu", kernel, **kw),
        lambda registry, **kw: registry.register_kernel("fast", "cpu", other_kernel, **kw),
        kernel,
        other_kernel,
        id="kernel",
    ),
    pytest.param(
        "observing_kernels",
        ("fast", "cpu"),
        lambda registry, **kw: registry.register_observing_kernel("fast", "cpu", kernel, **kw),
        lambda registry, **kw: registry.register_observing_kernel(
            "fast", "cpu", other_kernel, **kw
        ),
        kernel,
        other_kernel,
        id="observing-kernel",
    ),
    pytest.param(
        "qconfigs",
        "custom",
        lambda registry, **kw: registry.register_qconfig("custom", QCONFIG, **kw),
        lambda registry, **kw: registry.register_qconfig("custom", OTHER_QCONFIG, **kw),
        QCONFIG,
        OTHER_QCONFIG,
        id="qconfig",
    ),
]
REGISTRATION_ARGS = ("table", "key", "register_first", "register_second", "first", "second")


@pytest.mark.parametrize(REGISTRATION_ARGS, REGISTRATIONS)
def test_registration_attributed_to_plugin(
    table: str,
    key: object,
    register_first: Register,
    register_second: Register,
    first: object,
    second: object,
) -> None:
    registry = Registry(plugin="alpha")

    register_first(registry)

    assert registry.tables()[table][key] is first
    assert registry.tables()[table].entry(key) == Entry(first, "alpha")
    assert registry.registrations("alpha") == {table: [key]}


@pytest.mark.parametrize(REGISTRATION_ARGS, REGISTRATIONS)
def test_duplicate_registration_names_both_plugins(
    table: str,
    key: object,
    register_first: Register,
    register_second: Register,
    first: object,
    second: object,
) -> None:
    registry = Registry(plugin="alpha")
    register_first(registry)
    registry.plugin = "beta"

    with pytest.raises(RegistryError, match="from plugin 'beta' conflicts") as excinfo:
        register_second(registry)

    assert "registered by plugin 'alpha'" in str(excinfo.value)
    assert "override=True" in str(excinfo.value)
    assert registry.tables()[table].entry(key) == Entry(first, "alpha")


@pytest.mark.parametrize(REGISTRATION_ARGS, REGISTRATIONS)
def test_override_replaces_registration(
    table: str,
    key: object,
    register_first: Register,
    register_second: Register,
    first: object,
    second: object,
) -> None:
    registry = Registry(plugin="alpha")
    register_first(registry)
    registry.plugin = "beta"

    register_second(registry, override=True)

    assert registry.tables()[table].entry(key) == Entry(second, "beta")
    assert registry.registrations("alpha") == {}
    assert registry.registrations("beta") == {table: [key]}


class NotAModule:
    pass


# Malformed registrations: the call, and text the RegistryError must contain.
INVALID_REGISTRATIONS = [
    pytest.param(
        lambda registry: registry.register_module(nn.Linear(2, 2), QATLinear),
        r"float_type must be a subclass of torch\.nn\.Module, got Linear\(",
        id="module-float-instance",
    ),
    pytest.param(
        lambda registry: registry.register_module(NotAModule, QATLinear),
        r"float_type must be a subclass of torch\.nn\.Module, got <class '.*NotAModule'>",
        id="module-float-not-module",
    ),
    pytest.param(
        lambda registry: registry.register_module(nn.Linear, nn.Linear),
        r"qat_type must be a subclass of qatcore\._protocol\.QATModule, got <class 'torch",
        id="module-qat-not-qat",
    ),
    pytest.param(
        lambda registry: registry.register_module(nn.Linear, "QATLinear"),
        r"qat_type must be a subclass of qatcore\._protocol\.QATModule, got 'QATLinear'",
        id="module-qat-str",
    ),
    pytest.param(
        lambda registry: registry.register_fusion([nn.Linear, nn.ReLU], QATLinearReLU),
        r"fusion pattern must be a tuple of at least two module classes, got \[",
        id="fusion-list",
    ),
    pytest.param(
        lambda registry: registry.register_fusion((nn.Linear,), QATLinearReLU),
        r"fusion pattern must be a tuple of at least two module classes, got \(<class",
        id="fusion-one-member",
    ),
    pytest.param(
        lambda registry: registry.register_fusion((nn.Linear, "relu"), QATLinearReLU),
        r"each fusion pattern member must be a subclass of torch\.nn\.Module, got 'relu'",
        id="fusion-member-str",
    ),
    pytest.param(
        lambda registry: registry.register_fusion((nn.Linear, nn.ReLU), nn.Linear),
        r"fused_qat_type must be a subclass of qatcore\._protocol\.QATModule",
        id="fusion-type-not-qat",
    ),
    pytest.param(
        lambda registry: registry.register_observer("custom", "minmax"),
        r"observer factory for 'custom' must be callable, got 'minmax'",
        id="observer-not-callable",
    ),
    pytest.param(
        lambda registry: registry.register_observer("", observer_factory),
        r"observer name must be a non-empty str, got ''",
        id="observer-name-empty",
    ),
    pytest.param(
        lambda registry: registry.register_observer(None, observer_factory),
        r"observer name must be a non-empty str, got None",
        id="observer-name-none",
    ),
    pytest.param(
        lambda registry: registry.register_kernel("fast", "cpu", "kernel"),
        r"kernel 'fast' for 'cpu' must be callable",
        id="kernel-not-callable",
    ),
    pytest.param(
        lambda registry: registry.register_kernel("reference", "cpu", kernel),
        r"'reference' is the core's reference kernel and cannot be registered",
        id="kernel-reference-name",
    ),
    pytest.param(
        lambda registry: registry.register_kernel("", "cpu", kernel),
        r"kernel name must be a non-empty str, got ''",
        id="kernel-name-empty",
    ),
    pytest.param(
        lambda registry: registry.register_kernel("fast", torch.device("cpu"), kernel),
        r"device type must be a non-empty str.*, got device\(type='cpu'\)",
        id="kernel-device-object",
    ),
    pytest.param(
        lambda registry: registry.register_observing_kernel("fast", "cpu", "kernel"),
        r"observing kernel 'fast' for 'cpu' must be callable",
        id="observing-kernel-not-callable",
    ),
    pytest.param(
        lambda registry: registry.register_observing_kernel("reference", "cpu", kernel),
        r"'reference' is the core's reference kernel and cannot be registered",
        id="observing-kernel-reference-name",
    ),
    pytest.param(
        lambda registry: registry.register_qconfig("custom", QuantSpec()),
        r"qconfig 'custom' must be a QConfig, got QuantSpec\(",
        id="qconfig-not-qconfig",
    ),
    pytest.param(
        lambda registry: registry.register_qconfig(8, QCONFIG),
        r"qconfig name must be a non-empty str, got 8",
        id="qconfig-name-int",
    ),
]


@pytest.mark.parametrize(("register", "message"), INVALID_REGISTRATIONS)
def test_malformed_registration_rejected(
    register: Callable[[Registry], None], message: str
) -> None:
    registry = Registry(plugin="alpha")

    with pytest.raises(RegistryError, match=message):
        register(registry)

    assert registry.registrations("alpha") == {}


def test_registry_error_is_value_error() -> None:
    assert issubclass(RegistryError, ValueError)


@pytest.fixture
def observers() -> Table[str, object]:
    table: Table[str, object] = Table("observer")
    table.add("minmax", observer_factory, plugin="observers")
    table.add("custom", other_observer_factory, plugin="user")
    return table


def test_table_is_mapping(observers: Table[str, object]) -> None:
    assert isinstance(observers, Mapping)
    assert "minmax" in observers
    assert "histogram" not in observers
    assert observers["minmax"] is observer_factory
    assert observers.get("custom") is other_observer_factory
    assert observers.get("histogram") is None
    assert observers.get("histogram", observer_factory) is observer_factory
    assert len(observers) == 2
    assert list(observers) == ["minmax", "custom"]
    assert dict(observers.items()) == {"minmax": observer_factory, "custom": other_observer_factory}


def test_table_miss_lists_registered(observers: Table[str, object]) -> None:
    with pytest.raises(KeyError, match=r"no observer registered for 'kl_divergence'") as excinfo:
        observers["kl_divergence"]

    assert "(registered: 'custom', 'minmax')" in str(excinfo.value)
    assert "install" not in str(excinfo.value)


def test_table_entry_miss_raises_key_error(observers: Table[str, object]) -> None:
    with pytest.raises(KeyError, match=r"no observer registered for 'histogram'"):
        observers.entry("histogram")


# Keys that a first-party plugin provides, and the distribution that provides them.
FIRST_PARTY_KEYS = [
    pytest.param("modules", nn.Conv2d, "torch.nn.Conv2d", "qatcore-conv", id="conv2d"),
    pytest.param("modules", nn.Conv3d, "torch.nn.Conv3d", "qatcore-conv", id="conv3d"),
    pytest.param(
        "fusions",
        (nn.Conv2d, nn.ReLU),
        "(torch.nn.Conv2d, torch.nn.ReLU)",
        "qatcore-conv",
        id="conv2d-relu",
    ),
    pytest.param("observers", "minmax", "'minmax'", "qatcore-observers", id="minmax"),
    pytest.param(
        "observers",
        "moving_average_minmax",
        "'moving_average_minmax'",
        "qatcore-observers",
        id="moving_average_minmax",
    ),
    pytest.param("kernels", ("default", "cpu"), "('default', 'cpu')", "qatcore-cpu", id="cpu"),
    pytest.param("qconfigs", "x86", "'x86'", "qatcore-x86", id="x86"),
]


def _hint(distribution: str) -> str:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return f"install the {distribution} plugin"
    return f"the {distribution} plugin provides it and is installed but not loaded"


def test_install_hint_for_missing_distribution() -> None:
    from qatcore._registry import install_hint

    assert install_hint("qatcore-not-a-distribution") == (
        "install the qatcore-not-a-distribution plugin to provide it"
    )


@pytest.mark.parametrize(("table", "key", "described", "distribution"), FIRST_PARTY_KEYS)
def test_miss_names_distribution_to_install(
    table: str, key: object, described: str, distribution: str
) -> None:
    lookup = Registry().tables()[table]

    with pytest.raises(KeyError, match=_hint(distribution)) as excinfo:
        lookup[key]

    message = str(excinfo.value)
    assert f"registered for {described}" in message
    assert "(registered: none)" in message


def test_every_first_party_key_has_an_install_hint() -> None:
    manager = qatcore.plugin_manager()
    distributions = {
        info.name: info.distribution
        for info in manager.plugins()
        if info.distribution in FIRST_PARTY
    }
    if not distributions:
        pytest.skip("no first-party plugin is installed")

    for table in manager.registry.tables().values():
        for key in table:
            plugin = table.entry(key).plugin
            if plugin in distributions:
                assert table.provider_hint(key) == distributions[plugin], (table.kind, key)


def test_miss_names_registered_and_distribution() -> None:
    registry = Registry(plugin="user")
    registry.register_module(nn.Linear, QATLinear)

    with pytest.raises(KeyError, match=r"registered: torch\.nn\.Linear\)") as excinfo:
        registry.modules[nn.Conv2d]

    assert _hint("qatcore-conv") in str(excinfo.value)


def test_miss_on_custom_class_has_no_hint() -> None:
    class Custom(nn.Module):
        pass

    with pytest.raises(KeyError, match=r"no module mapping registered for .*Custom") as excinfo:
        Registry().modules[Custom]

    assert "install" not in str(excinfo.value)


def test_registrations_lists_per_plugin() -> None:
    registry = Registry(plugin="qatcore")
    for plugin, register in [
        ("conv", lambda staging: staging.register_module(nn.Linear, QATLinear)),
        ("conv", lambda staging: staging.register_fusion((nn.Linear, nn.ReLU), QATLinearReLU)),
        ("observers", lambda staging: staging.register_observer("custom", observer_factory)),
        ("x86", lambda staging: staging.register_qconfig("custom", QCONFIG)),
    ]:
        staging = Registry(plugin=plugin)
        register(staging)
        registry.merge(staging)

    assert registry.registrations("conv") == {
        "modules": [nn.Linear],
        "fusions": [(nn.Linear, nn.ReLU)],
    }
    assert registry.registrations("observers") == {"observers": ["custom"]}
    assert registry.registrations("x86") == {"qconfigs": ["custom"]}
    assert registry.registrations("cpu") == {}


def _snapshot(registry: Registry) -> dict[str, dict[object, Entry[object]]]:
    return {
        name: {key: table.entry(key) for key in table} for name, table in registry.tables().items()
    }


def test_conflicting_merge_leaves_target_unchanged() -> None:
    target = Registry(plugin="x86")
    target.register_qconfig("custom", QCONFIG)
    before = _snapshot(target)
    # The new entries sit in tables that merge visits before the conflicting
    # qconfig, so a merge that stops at the first conflict would leave them behind.
    staging = Registry(plugin="extra")
    staging.register_module(nn.Linear, QATLinear)
    staging.register_observer("custom", observer_factory)
    staging.register_qconfig("custom", OTHER_QCONFIG)

    with pytest.raises(RegistryError, match="from plugin 'extra' conflicts") as excinfo:
        target.merge(staging)

    assert "registered by plugin 'x86'" in str(excinfo.value)
    assert _snapshot(target) == before
    assert nn.Linear not in target.modules
    assert "custom" not in target.observers


def test_merge_with_override_replaces_and_keeps_plugins() -> None:
    target = Registry(plugin="x86")
    target.register_qconfig("custom", QCONFIG)
    staging = Registry(plugin="user")
    staging.register_qconfig("custom", OTHER_QCONFIG, override=True)
    staging.register_observer("custom", observer_factory)

    target.merge(staging)

    assert target.qconfigs.entry("custom") == Entry(OTHER_QCONFIG, "user")
    assert target.observers.entry("custom") == Entry(observer_factory, "user")


def test_conflicting_table_update_leaves_table_unchanged() -> None:
    target: Table[str, object] = Table("observer")
    target.add("minmax", observer_factory, plugin="observers")
    other: Table[str, object] = Table("observer")
    other.add("custom", other_observer_factory, plugin="extra")
    other.add("minmax", other_observer_factory, plugin="extra")

    with pytest.raises(RegistryError, match="observer 'minmax' from plugin 'extra' conflicts"):
        target.update(other)

    assert list(target) == ["minmax"]
    assert target.entry("minmax") == Entry(observer_factory, "observers")


@pytest.mark.parametrize("device_type", ["cuda:0", "CPU", "gpu"])
def test_kernel_device_type_must_be_torch_type(device_type: str) -> None:
    registry = Registry(plugin="alpha")

    with pytest.raises(RegistryError, match="device type must be a torch device type"):
        registry.register_kernel("default", device_type, lambda *args: args[0])


def test_module_mapping_must_match_float_types() -> None:
    registry = Registry(plugin="alpha")

    with pytest.raises(RegistryError, match=r"QATLinear is built from \(torch\.nn\.Linear\)"):
        registry.register_module(nn.Conv2d, QATLinear)


def test_fusion_must_match_float_types() -> None:
    registry = Registry(plugin="alpha")

    with pytest.raises(RegistryError, match="so it cannot fuse"):
        registry.register_fusion((nn.Linear, nn.GELU), QATLinearReLU)
