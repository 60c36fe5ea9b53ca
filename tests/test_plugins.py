"""Plugin discovery from installed distributions, failure isolation, switches, in-process plugins.

Scenarios that need other installed distributions or environment switches
run in child processes (``tests/plugin_fixtures/plugin_scenarios.py``), one
per configuration, and each child's report is shared by the tests that read it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import qatcore
from qatcore import QATModule, QuantSpec, RegistryError
from qatcore._plugins import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, ENV_STRICT, PluginManager
from qatcore._registry import Entry

FIXTURES = Path(__file__).parent / "plugin_fixtures"

# -- installed distributions for the child processes ---------------------------


def install_distribution(
    site: Path, name: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """Lay out a distribution in ``site`` as pip installs it: modules and a dist-info folder.

    ``entry_points`` maps entry-point names of group ``qatcore`` to module
    names, and ``modules`` maps module names to their source.
    """
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))

    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    entry_lines = [f"{entry} = {target}" for entry, target in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(["[qatcore]", *entry_lines]) + "\n")
    (dist_info / "INSTALLER").write_text("pip\n")
    recorded = [f"{module}.py" for module in modules] + [
        f"{dist_info.name}/{file}" for file in ("METADATA", "entry_points.txt", "INSTALLER")
    ]
    (dist_info / "RECORD").write_text(
        "".join(f"{path},,\n" for path in recorded) + f"{dist_info.name}/RECORD,,\n"
    )


def observer_plugin_source(observer: str) -> str:
    """Return the source of a plugin module that registers one observer named ``observer``."""
    return f"""\
        from torch import nn

        from qatcore import hookimpl


        def _factory(spec, channels, **options):
            return nn.Identity()


        @hookimpl
        def qatcore_register_observers(registry):
            registry.register_observer({observer!r}, _factory)
        """


BROKEN_IMPORT_SOURCE = """\
    raise RuntimeError("qatcore_broken fails to import on purpose")
    """

# The plugin registers an observer in one hook and a preset in another, then
# raises after the preset, so neither entry may reach the registry.
FAILING_REGISTRATION_SOURCE = """\
    from torch import nn

    from qatcore import QConfig, QuantSpec, hookimpl


    def _factory(spec, channels, **options):
        return nn.Identity()


    @hookimpl
    def qatcore_register_observers(registry):
        registry.register_observer("halfway_minmax", _factory)


    @hookimpl
    def qatcore_register_qconfigs(registry):
        registry.register_qconfig("halfway", QConfig(weight=QuantSpec()))
        raise RuntimeError("qatcore_halfway fails while registering on purpose")
    """

# Plugins whose requirement is missing: one raises PluginUnavailable at import,
# the other in its kernel hook, after its observer hook registered an observer.
UNAVAILABLE_AT_IMPORT_SOURCE = """\
    from qatcore import PluginUnavailable

    raise PluginUnavailable("needs the imaginary accelerator library")
    """

UNAVAILABLE_IN_HOOK_SOURCE = """\
    from torch import nn

    from qatcore import PluginUnavailable, hookimpl


    def _factory(spec, channels, **options):
        return nn.Identity()


    @hookimpl
    def qatcore_register_observers(registry):
        registry.register_observer("gpu_minmax", _factory)


    @hookimpl
    def qatcore_register_kernels(registry):
        raise PluginUnavailable("no GPU device was found")
    """

UNAVAILABLE_SITE = [
    {
        "name": "qatcore-accelerator",
        "version": "0.2.0",
        "entry_points": {"accelerator": "qatcore_accelerator"},
        "modules": {"qatcore_accelerator": UNAVAILABLE_AT_IMPORT_SOURCE},
    },
    {
        "name": "qatcore-gpu",
        "version": "1.3.0",
        "entry_points": {"gpu": "qatcore_gpu"},
        "modules": {"qatcore_gpu": UNAVAILABLE_IN_HOOK_SOURCE},
    },
]

BROKEN_DISTRIBUTION = {
    "name": "qatcore-broken",
    "version": "3.1.4",
    "entry_points": {"broken": "qatcore_broken"},
    "modules": {"qatcore_broken": BROKEN_IMPORT_SOURCE},
}

BROKEN_SITE = [
    BROKEN_DISTRIBUTION,
    {
        "name": "qatcore-halfway",
        "version": "2.7.1",
        "entry_points": {"halfway": "qatcore_halfway"},
        "modules": {"qatcore_halfway": FAILING_REGISTRATION_SOURCE},
    },
    # Two distributions that register the same observer name.
    {
        "name": "qatcore-dup-a",
        "version": "1.0.0",
        "entry_points": {"dup_a": "qatcore_dup_a"},
        "modules": {"qatcore_dup_a": observer_plugin_source("shared_minmax")},
    },
    {
        "name": "qatcore-dup-b",
        "version": "1.0.0",
        "entry_points": {"dup_b": "qatcore_dup_b"},
        "modules": {"qatcore_dup_b": observer_plugin_source("shared_minmax")},
    },
    # A third-party distribution whose entry point sorts before the
    # first-party ones and that takes a first-party observer name.
    {
        "name": "qatcore-aaa-clash",
        "version": "0.0.1",
        "entry_points": {"aaa_clash": "qatcore_aaa_clash"},
        "modules": {"qatcore_aaa_clash": observer_plugin_source("minmax")},
    },
    # Two distributions that declare the same entry-point name.
    {
        "name": "qatcore-twin-a",
        "version": "1.0.0",
        "entry_points": {"twin": "qatcore_twin_a"},
        "modules": {"qatcore_twin_a": observer_plugin_source("twin_a_minmax")},
    },
    {
        "name": "qatcore-twin-b",
        "version": "1.0.0",
        "entry_points": {"twin": "qatcore_twin_b"},
        "modules": {"qatcore_twin_b": observer_plugin_source("twin_b_minmax")},
    },
]


def run_scenario(
    scenario: str, workdir: Path, *, site: Path | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a scenario of ``plugin_scenarios`` in a child Python and return its report.

    The child gets this process's environment without its plugin switches,
    plus ``env``. It finds the distributions installed in ``site`` through
    ``PYTHONPATH``.
    """
    environ = {key: value for key, value in os.environ.items() if not key.startswith("QATCORE_")}
    paths = [str(FIXTURES)]
    if site is not None:
        paths.append(str(site))
    if environ.get("PYTHONPATH"):
        paths.append(environ["PYTHONPATH"])
    environ["PYTHONPATH"] = os.pathsep.join(paths)
    environ.update(env or {})

    # The working directory is a temporary one, so that the child imports
    # qatcore as installed rather than from the checkout.
    completed = subprocess.run(
        [sys.executable, "-m", "plugin_scenarios", scenario],
        cwd=workdir,
        env=environ,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, f"scenario {scenario!r} failed:\n{completed.stderr}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


def failure_named(report: dict[str, Any], name: str) -> dict[str, Any]:
    failures = {failure["name"]: failure for failure in report["failures"]}
    assert name in failures, f"no failure reported for {name!r}: {report['failures']}"
    return failures[name]


# -- first-party plugins, in this process --------------------------------------

FIRST_PARTY = [
    pytest.param("conv", "qatcore-conv", id="conv"),
    pytest.param("cpu", "qatcore-cpu", id="cpu"),
    pytest.param("observers", "qatcore-observers", id="observers"),
    pytest.param("x86", "qatcore-x86", id="x86"),
]


@pytest.mark.usefixtures("first_party_plugins")
@pytest.mark.parametrize(("entry_name", "distribution"), FIRST_PARTY)
def test_first_party_plugin_discovered(
    entry_name: str, distribution: str, fresh_plugin_manager: PluginManager
) -> None:
    entry_points = importlib.metadata.entry_points(group="qatcore", name=entry_name)
    infos = {info.name: info for info in fresh_plugin_manager.plugins()}

    assert [entry.dist.name for entry in entry_points] == [distribution]
    assert entry_name in infos
    assert infos[entry_name].distribution == distribution
    assert infos[entry_name].version == importlib.metadata.version(distribution)


FIRST_PARTY_REGISTRATIONS = [
    pytest.param("modules", nn.Conv1d, "conv", id="conv1d"),
    pytest.param("modules", nn.Conv2d, "conv", id="conv2d"),
    pytest.param("modules", nn.Conv3d, "conv", id="conv3d"),
    pytest.param("fusions", (nn.Conv1d, nn.ReLU), "conv", id="conv1d-relu"),
    pytest.param("fusions", (nn.Conv2d, nn.ReLU), "conv", id="conv2d-relu"),
    pytest.param("fusions", (nn.Conv3d, nn.ReLU), "conv", id="conv3d-relu"),
    pytest.param("observers", "minmax", "observers", id="minmax"),
    pytest.param("observers", "moving_average_minmax", "observers", id="moving_average_minmax"),
    pytest.param("kernels", ("default", "cpu"), "cpu", id="cpu-kernel"),
    pytest.param("qconfigs", "x86", "x86", id="x86-preset"),
]


@pytest.mark.usefixtures("first_party_plugins")
@pytest.mark.parametrize(("table", "key", "plugin"), FIRST_PARTY_REGISTRATIONS)
def test_first_party_registration_attributed(
    table: str, key: object, plugin: str, fresh_plugin_manager: PluginManager
) -> None:
    lookup = fresh_plugin_manager.registry.tables()[table]
    infos = {info.name: info for info in fresh_plugin_manager.plugins()}

    assert key in lookup
    assert lookup.entry(key).plugin == plugin
    assert key in infos[plugin].registrations.get(table, [])


@pytest.mark.usefixtures("first_party_plugins")
def test_installed_plugins_load_cleanly(fresh_plugin_manager: PluginManager) -> None:
    assert fresh_plugin_manager.failures() == []
    assert fresh_plugin_manager.blocked() == []


# -- in-process plugins ------------------------------------------------------------


def _identity_observer(spec: QuantSpec, channels: int | None, **options: Any) -> nn.Module:
    return nn.Identity()


class ExtraObserverPlugin:
    @qatcore.hookimpl
    def qatcore_register_observers(self, registry: qatcore.Registry) -> None:
        registry.register_observer("extra_minmax", _identity_observer)


class FailingRegistrationPlugin:
    @qatcore.hookimpl
    def qatcore_register_observers(self, registry: qatcore.Registry) -> None:
        registry.register_observer("halfway_minmax", _identity_observer)
        raise RuntimeError("fails while registering on purpose")


def test_in_process_plugin_counts(fresh_plugin_manager: PluginManager) -> None:
    name = qatcore.register_plugin(ExtraObserverPlugin(), name="extra")

    assert name == "extra"
    assert "extra" in fresh_plugin_manager.names()
    assert fresh_plugin_manager.registry.observers.entry("extra_minmax") == Entry(
        _identity_observer, "extra"
    )
    infos = {info.name: info for info in fresh_plugin_manager.plugins()}
    assert infos["extra"] == qatcore._plugins.PluginInfo(
        "extra", None, None, {"observers": ["extra_minmax"]}
    )


def test_unregister_plugin_removes_registrations(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_plugin(ExtraObserverPlugin(), name="extra")
    assert "extra_minmax" in fresh_plugin_manager.registry.observers

    qatcore.unregister_plugin("extra")

    assert "extra" not in fresh_plugin_manager.names()
    assert "extra_minmax" not in fresh_plugin_manager.registry.observers
    assert fresh_plugin_manager.registry.registrations("extra") == {}


def test_register_plugin_name_taken(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_plugin(ExtraObserverPlugin(), name="extra")

    with pytest.raises(ValueError, match="cannot register plugin 'extra'"):
        qatcore.register_plugin(ExtraObserverPlugin(), name="extra")


def test_unregister_unknown_plugin(fresh_plugin_manager: PluginManager) -> None:
    with pytest.raises(KeyError, match="no plugin named 'missing' is registered"):
        qatcore.unregister_plugin("missing")


def test_failing_registration_hook_reported(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_plugin(FailingRegistrationPlugin(), name="halfway")

    failures = fresh_plugin_manager.failures()

    assert [(failure.name, failure.stage) for failure in failures] == [("halfway", "register")]
    assert str(failures[0].error) == "fails while registering on purpose"
    assert "halfway_minmax" not in fresh_plugin_manager.registry.observers
    assert "halfway" not in {info.name for info in fresh_plugin_manager.plugins()}


def test_strict_manager_raises_on_failing_hook() -> None:
    manager = PluginManager(strict=True)
    manager.register(FailingRegistrationPlugin(), name="halfway")

    for _ in range(2):
        with pytest.raises(qatcore.PluginError, match="plugin 'halfway' failed to register"):
            manager.registry  # noqa: B018


class UnavailablePlugin:
    """Registers an observer, then finds its requirement missing in the kernel hook."""

    @qatcore.hookimpl
    def qatcore_register_observers(self, registry: qatcore.Registry) -> None:
        registry.register_observer("gpu_minmax", _identity_observer)

    @qatcore.hookimpl
    def qatcore_register_kernels(self, registry: qatcore.Registry) -> None:
        raise qatcore.PluginUnavailable("no GPU device was found")


def skips_of(manager: PluginManager, name: str) -> list[qatcore._plugins.PluginSkip]:
    """Return the skips of plugin ``name``; installed plugins may report skips of their own."""
    return [skip for skip in manager.skipped() if skip.name == name]


def test_unavailable_plugin_reported_as_skipped(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_plugin(UnavailablePlugin(), name="gpu")

    skipped = skips_of(fresh_plugin_manager, "gpu")

    assert skipped == [
        qatcore._plugins.PluginSkip("gpu", None, None, "register", "no GPU device was found")
    ]
    assert skipped[0].describe() == "plugin 'gpu' is unavailable: no GPU device was found"
    assert "gpu" not in {failure.name for failure in fresh_plugin_manager.failures()}


def test_unavailable_plugin_registers_nothing(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_plugin(UnavailablePlugin(), name="gpu")

    assert "gpu_minmax" not in fresh_plugin_manager.registry.observers
    assert "gpu" not in {info.name for info in fresh_plugin_manager.plugins()}


def test_unavailable_plugin_skip_recorded_once(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_plugin(UnavailablePlugin(), name="gpu")
    fresh_plugin_manager.skipped()

    # Registering another plugin rebuilds the registry, which calls the hook again.
    qatcore.register_plugin(ExtraObserverPlugin(), name="extra")

    assert len(skips_of(fresh_plugin_manager, "gpu")) == 1
    assert "extra_minmax" in fresh_plugin_manager.registry.observers


def test_unregister_forgets_skip(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_plugin(UnavailablePlugin(), name="gpu")
    assert skips_of(fresh_plugin_manager, "gpu") != []

    qatcore.unregister_plugin("gpu")

    assert skips_of(fresh_plugin_manager, "gpu") == []


def test_strict_manager_skips_unavailable_plugin() -> None:
    manager = PluginManager(strict=True)
    manager.register(UnavailablePlugin(), name="gpu")

    assert len(skips_of(manager, "gpu")) == 1
    assert "gpu" not in {failure.name for failure in manager.failures()}


def test_unavailable_plugin_not_logged_as_warning(
    fresh_plugin_manager: PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    qatcore.register_plugin(UnavailablePlugin(), name="gpu")

    with caplog.at_level("DEBUG", logger="qatcore._plugins"):
        fresh_plugin_manager.skipped()

    records = [record for record in caplog.records if "'gpu'" in record.getMessage()]
    assert [record.levelname for record in records] == ["DEBUG"]
    assert "no GPU device was found" in records[0].getMessage()


# -- qatcore.register_module ---------------------------------------------------------


class Block(nn.Module):
    """A user's float module type."""


class StubQATModule(QATModule, nn.Module):
    """A QAT type that is registered, never built."""

    float_types = (Block,)

    @classmethod
    def from_float(cls, module, qconfig, *, name=""):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def to_float(self) -> nn.Module:
        raise NotImplementedError


def register_module_as(form: str, float_type: type[nn.Module], *, override: bool = False) -> type:
    """Register a new QAT type for ``float_type`` by a call or a decorator; return the type."""
    if form == "call":

        class QATByCall(StubQATModule):
            float_types = (float_type,)

        assert qatcore.register_module(float_type, QATByCall, override=override) is None
        return QATByCall

    @qatcore.register_module(float_type, override=override)
    class QATByDecorator(StubQATModule):
        float_types = (float_type,)

    return QATByDecorator


REGISTER_FORMS = [pytest.param("call", id="call"), pytest.param("decorator", id="decorator")]


@pytest.mark.parametrize("form", REGISTER_FORMS)
def test_register_module_maps_user_type(form: str, fresh_plugin_manager: PluginManager) -> None:
    qat_type = register_module_as(form, Block)

    assert isinstance(qat_type, type)
    assert issubclass(qat_type, StubQATModule)
    assert fresh_plugin_manager.registry.modules.entry(Block) == Entry(qat_type, "user")


@pytest.mark.usefixtures("first_party_plugins")
@pytest.mark.parametrize("form", REGISTER_FORMS)
def test_register_module_conflicts_with_plugin(
    form: str, fresh_plugin_manager: PluginManager
) -> None:
    conv_type = fresh_plugin_manager.registry.modules[nn.Conv2d]

    with pytest.raises(RegistryError, match=r"torch\.nn\.Conv2d from plugin 'user' conflicts"):
        register_module_as(form, nn.Conv2d)

    assert fresh_plugin_manager.registry.modules.entry(nn.Conv2d) == Entry(conv_type, "conv")
    # A rebuild of the registry must not bring the rejected mapping back.
    qatcore.register_plugin(ExtraObserverPlugin(), name="extra")
    assert fresh_plugin_manager.registry.modules.entry(nn.Conv2d) == Entry(conv_type, "conv")


@pytest.mark.usefixtures("first_party_plugins")
@pytest.mark.parametrize("form", REGISTER_FORMS)
def test_register_module_override_replaces_plugin(
    form: str, fresh_plugin_manager: PluginManager
) -> None:
    qat_type = register_module_as(form, nn.Conv2d, override=True)

    assert fresh_plugin_manager.registry.modules.entry(nn.Conv2d) == Entry(qat_type, "user")
    # The user's mapping outlives a rebuild of the registry from the plugins.
    qatcore.register_plugin(ExtraObserverPlugin(), name="extra")
    assert fresh_plugin_manager.registry.modules.entry(nn.Conv2d) == Entry(qat_type, "user")


# -- broken, failing and conflicting distributions, in a child process -------------


@pytest.fixture(scope="module")
def broken_site_report(
    tmp_path_factory: pytest.TempPathFactory, first_party_plugins: None
) -> dict[str, Any]:
    site = tmp_path_factory.mktemp("broken-site")
    for distribution in BROKEN_SITE:
        install_distribution(site, **distribution)
    return run_scenario("broken_site", tmp_path_factory.mktemp("workdir"), site=site)


def test_import_failure_reported(broken_site_report: dict[str, Any]) -> None:
    failure = failure_named(broken_site_report, "broken")

    assert failure["distribution"] == "qatcore-broken"
    assert failure["version"] == "3.1.4"
    assert failure["stage"] == "import"
    assert failure["error"] == "RuntimeError: qatcore_broken fails to import on purpose"


def test_import_failure_logged(broken_site_report: dict[str, Any]) -> None:
    records = [record for record in broken_site_report["log"] if "'broken'" in record["message"]]

    assert len(records) == 1
    assert records[0]["logger"] == "qatcore._plugins"
    assert records[0]["level"] == "WARNING"
    assert "qatcore-broken 3.1.4" in records[0]["message"]
    assert "fails to import on purpose" in records[0]["message"]
    assert not records[0]["has_traceback"], "the warning is one line; debug logs the traceback"


def test_other_plugins_load_beside_failures(broken_site_report: dict[str, Any]) -> None:
    plugins = broken_site_report["plugins"]

    for name, distribution in [
        ("conv", "qatcore-conv"),
        ("cpu", "qatcore-cpu"),
        ("observers", "qatcore-observers"),
        ("x86", "qatcore-x86"),
        ("dup_a", "qatcore-dup-a"),
    ]:
        assert plugins.get(name, {}).get("distribution") == distribution, name
    for failed in ("broken", "halfway", "dup_b"):
        assert failed not in plugins


def test_swap_works_beside_failures(broken_site_report: dict[str, Any]) -> None:
    swap = broken_site_report["swap"]

    assert swap["error"] is None
    assert swap["value"]["type"] == "qatcore_conv.modules.Conv2d"
    assert swap["value"]["output_shape"] == [1, 2, 3, 3]


def test_registration_failure_drops_partial_entries(broken_site_report: dict[str, Any]) -> None:
    failure = failure_named(broken_site_report, "halfway")

    assert failure["distribution"] == "qatcore-halfway"
    assert failure["version"] == "2.7.1"
    assert failure["stage"] == "register"
    assert failure["error"] == "RuntimeError: qatcore_halfway fails while registering on purpose"
    assert "'halfway_minmax'" not in broken_site_report["observers"]
    assert "'halfway'" not in broken_site_report["qconfigs"]


def test_duplicate_key_names_both_plugins(broken_site_report: dict[str, Any]) -> None:
    failure = failure_named(broken_site_report, "dup_b")

    assert failure["distribution"] == "qatcore-dup-b"
    assert failure["stage"] == "register"
    assert "observer 'shared_minmax' from plugin 'dup_b'" in failure["error"]
    assert "registered by plugin 'dup_a'" in failure["error"]
    assert broken_site_report["observers"]["'shared_minmax'"] == "dup_a"


def test_duplicate_entry_point_name_reported(broken_site_report: dict[str, Any]) -> None:
    failure = failure_named(broken_site_report, "twin")
    loaded = [
        observer
        for observer in ("'twin_a_minmax'", "'twin_b_minmax'")
        if observer in broken_site_report["observers"]
    ]

    assert "qatcore-twin-a" in failure["description"]
    assert "qatcore-twin-b" in failure["description"]
    assert len(loaded) == 1


# -- switches, each in a child process -------------------------------------------------


@pytest.fixture(scope="module")
def strict_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    site = tmp_path_factory.mktemp("strict-site")
    install_distribution(site, **BROKEN_DISTRIBUTION)
    workdir = tmp_path_factory.mktemp("workdir")
    return run_scenario("strict", workdir, site=site, env={ENV_STRICT: "1"})


def test_strict_first_lookup_raises(strict_report: dict[str, Any]) -> None:
    error = strict_report["first_lookup"]["error"]

    assert error is not None
    assert error["type"] == "PluginError"
    assert error["plugin"] == "broken"
    assert error["distribution"] == "qatcore-broken"
    assert "plugin 'broken' from qatcore-broken 3.1.4 failed to import" in error["message"]


def test_strict_every_lookup_raises(strict_report: dict[str, Any]) -> None:
    error = strict_report["second_lookup"]["error"]

    assert error is not None, f"the second lookup returned {strict_report['second_lookup']}"
    assert error["type"] == "PluginError"
    assert error["plugin"] == "broken"


@pytest.fixture(scope="module")
def unavailable_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    site = tmp_path_factory.mktemp("unavailable-site")
    for distribution in UNAVAILABLE_SITE:
        install_distribution(site, **distribution)
    workdir = tmp_path_factory.mktemp("workdir")
    # Strict mode is on: a skip must not raise there either.
    return run_scenario("unavailable_site", workdir, site=site, env={ENV_STRICT: "1"})


def skip_named(report: dict[str, Any], name: str) -> dict[str, Any]:
    assert report["skipped"]["error"] is None, report["skipped"]["error"]
    skipped = {skip["name"]: skip for skip in report["skipped"]["value"]}
    assert name in skipped, f"no skip reported for {name!r}: {report['skipped']}"
    return skipped[name]


def test_unavailable_at_import_reported(unavailable_report: dict[str, Any]) -> None:
    skip = skip_named(unavailable_report, "accelerator")

    assert skip["distribution"] == "qatcore-accelerator"
    assert skip["version"] == "0.2.0"
    assert skip["stage"] == "import"
    assert skip["reason"] == "needs the imaginary accelerator library"
    assert "accelerator" not in unavailable_report["names"]


def test_unavailable_in_hook_reported(unavailable_report: dict[str, Any]) -> None:
    skip = skip_named(unavailable_report, "gpu")

    assert skip["distribution"] == "qatcore-gpu"
    assert skip["version"] == "1.3.0"
    assert skip["stage"] == "register"
    assert skip["description"] == (
        "plugin 'gpu' from qatcore-gpu 1.3.0 is unavailable: no GPU device was found"
    )
    assert "'gpu_minmax'" not in unavailable_report["observers"]
    assert "gpu" not in unavailable_report["plugins"]


def test_unavailable_is_no_failure(unavailable_report: dict[str, Any]) -> None:
    failed = {failure["name"] for failure in unavailable_report["failures"]}

    assert not failed & {"accelerator", "gpu"}
    assert [record for record in unavailable_report["log"] if "'gpu'" in record["message"]] == []
    assert [
        record for record in unavailable_report["log"] if "'accelerator'" in record["message"]
    ] == []


@pytest.fixture(scope="module")
def blocked_report(
    tmp_path_factory: pytest.TempPathFactory, first_party_plugins: None
) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("workdir")
    return run_scenario("blocked", workdir, env={ENV_BLOCK: "cpu"})


def test_blocked_plugin_skipped(blocked_report: dict[str, Any]) -> None:
    assert blocked_report["blocked"] == ["cpu"]
    assert "cpu" not in blocked_report["names"]
    assert "cpu" not in blocked_report["plugins"]
    assert {"conv", "observers", "x86"} <= set(blocked_report["plugins"])


def test_blocked_kernel_falls_back_to_reference(blocked_report: dict[str, Any]) -> None:
    assert not blocked_report["cpu_kernel_registered"]
    assert blocked_report["resolves_to_reference"]
    assert blocked_report["fake_quantize_uses_reference"]
    assert blocked_report["fake_quantize_output_finite"]


@pytest.fixture(scope="module")
def autoload_disabled_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("workdir")
    return run_scenario("autoload_disabled", workdir, env={ENV_DISABLE_AUTOLOAD: "1"})


def test_autoload_disabled_is_core_alone(autoload_disabled_report: dict[str, Any]) -> None:
    assert autoload_disabled_report["core_alone"]["error"] is None


def test_autoload_disabled_counts_in_process_plugin(
    autoload_disabled_report: dict[str, Any],
) -> None:
    registered = autoload_disabled_report["registered"]

    assert registered["name"] == "inline"
    assert registered["names"] == ["inline"]
    assert registered["plugins"] == {
        "inline": {
            "distribution": None,
            "version": None,
            "registrations": {"observers": ["'inline_minmax'"], "qconfigs": ["'inline'"]},
        }
    }
    assert registered["qconfig_matches"] == {"value": True, "error": None}
    assert registered["qconfigs"] == {"'inline'": "inline"}
    assert registered["observers"] == {"'inline_minmax'": "inline"}


def test_autoload_disabled_unregister_removes(autoload_disabled_report: dict[str, Any]) -> None:
    unregistered = autoload_disabled_report["unregistered"]

    assert unregistered["names"] == []
    assert unregistered["observers"] == {}
    assert unregistered["qconfig"]["error"]["type"] == "KeyError"
    assert "no qconfig registered for 'inline'" in unregistered["qconfig"]["error"]["message"]


@pytest.mark.skipif(
    bool(importlib.metadata.entry_points(group="qatcore")),
    reason="a qatcore entry point is installed; test_autoload_disabled_is_core_alone covers this",
)
def test_core_alone_in_process(
    fresh_plugin_manager: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    import core_alone

    core_alone.check_core_alone()


def test_third_party_clash_blames_third_party(broken_site_report: dict[str, Any]) -> None:
    failure = failure_named(broken_site_report, "aaa_clash")

    assert failure["stage"] == "register"
    assert "'minmax' from plugin 'aaa_clash' conflicts" in failure["description"]
    assert "plugin 'observers'" in failure["description"]
    assert "observers" in broken_site_report["plugins"]


class OverridingObserverPlugin:
    @qatcore.hookimpl
    def qatcore_register_observers(self, registry: qatcore.Registry) -> None:
        registry.register_observer("widest", _identity_observer)
        registry.register_observer("minmax", _identity_observer, override=True)


@pytest.mark.usefixtures("first_party_plugins")
def test_plugin_override_replaces_first_party(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_plugin(OverridingObserverPlugin(), name="overriding")

    observers = fresh_plugin_manager.registry.observers

    assert fresh_plugin_manager.failures() == []
    assert observers.entry("minmax").plugin == "overriding"
    assert observers.entry("widest").plugin == "overriding"


@pytest.mark.usefixtures("first_party_plugins")
def test_later_plugin_conflicting_with_user_fails(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_observer("mine", _identity_observer)

    class Later:
        @qatcore.hookimpl
        def qatcore_register_observers(self, registry: qatcore.Registry) -> None:
            registry.register_observer("mine", _identity_observer)

    qatcore.register_plugin(Later(), name="later")

    failures = fresh_plugin_manager.failures()
    assert [failure.name for failure in failures] == ["later"]
    assert "plugin 'user'" in failures[0].describe()
    assert fresh_plugin_manager.registry.observers.entry("mine").plugin == "user"


def test_unknown_blocked_name_warns(
    fresh_plugin_manager: PluginManager, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setenv(ENV_BLOCK, "qatcore-x86")

    with caplog.at_level("WARNING", logger="qatcore._plugins"):
        fresh_plugin_manager.names()

    assert "QATCORE_BLOCK_PLUGINS names qatcore-x86" in caplog.text
    assert "match no installed qatcore entry point" in caplog.text


def test_hook_with_unknown_argument_rejected(fresh_plugin_manager: PluginManager) -> None:
    class BadArguments:
        @qatcore.hookimpl
        def qatcore_register_modules(self, registry, extra):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(ValueError, match="cannot register plugin 'bad'"):
        qatcore.register_plugin(BadArguments(), name="bad")

    assert "bad" not in fresh_plugin_manager.names()


def test_misspelled_hook_rejected(fresh_plugin_manager: PluginManager) -> None:
    class Misspelled:
        @qatcore.hookimpl
        def qatcore_register_module(self, registry):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(ValueError, match="cannot register plugin 'typo'"):
        qatcore.register_plugin(Misspelled(), name="typo")
