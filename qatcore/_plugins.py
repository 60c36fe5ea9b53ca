"""The plugin manager: discovers plugins, isolates their failures, builds the registry."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterator
from typing import Any

import attrs
import pluggy

from qatcore import _hookspecs
from qatcore._registry import FIRST_PARTY, USER, Registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_BLOCK",
    "ENV_DISABLE_AUTOLOAD",
    "ENV_STRICT",
    "PluginError",
    "PluginFailure",
    "PluginInfo",
    "PluginManager",
    "PluginSkip",
    "PluginUnavailable",
    "plugin_manager",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qatcore"
ENV_BLOCK = "QATCORE_BLOCK_PLUGINS"
"""Comma-separated entry-point names that are not loaded."""
ENV_DISABLE_AUTOLOAD = "QATCORE_DISABLE_PLUGIN_AUTOLOAD"
"""When ``1``, no entry point is loaded; only in-process plugins count."""
ENV_STRICT = "QATCORE_STRICT_PLUGINS"
"""When ``1``, a plugin that fails to load raises instead of being reported."""

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _env_names(name: str) -> set[str]:
    return {part.strip() for part in os.environ.get(name, "").split(",") if part.strip()}


class PluginError(RuntimeError):
    """A plugin failed to load or to register, in strict mode.

    Attributes:
        plugin: The plugin's entry-point or in-process name.
        distribution: The distribution that provides it, if any.
    """

    def __init__(self, message: str, *, plugin: str, distribution: str | None) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.distribution = distribution


class PluginUnavailable(Exception):
    """A plugin's report that one of its requirements is missing on this machine.

    A plugin raises it at import or in a registration hook, with the reason
    as the message, such as ``"no CUDA device: torch.cuda.is_available() is
    False"``. The plugin manager reports the plugin as skipped with that
    reason instead of failed: none of its entries count, the skip is logged
    at debug level only, strict mode does not raise, and ``qatcore plugins``
    still exits with 0.

    Attributes:
        reason: Why the plugin cannot run here.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class PluginInfo:
    """A loaded plugin: its name, where it came from, what it registered, and its notes.

    ``notes`` are the lines its ``qatcore_plugin_notes`` hook returned, or
    one line naming the error that hook raised.
    """

    name: str
    distribution: str | None
    version: str | None
    registrations: dict[str, list[object]]
    notes: list[str] = attrs.field(factory=list)


@attrs.frozen
class PluginFailure:
    """A plugin that failed to import or to register, with the error."""

    name: str
    distribution: str | None
    version: str | None
    stage: str
    error: BaseException

    def describe(self) -> str:
        """Return one line naming the plugin, its distribution, the stage and the error."""
        origin = f" from {self.distribution} {self.version}" if self.distribution else ""
        return (
            f"plugin {self.name!r}{origin} failed to {self.stage}: "
            f"{type(self.error).__name__}: {self.error}"
        )


@attrs.frozen
class PluginSkip:
    """A plugin that raised :class:`PluginUnavailable` at import or in a hook, with the reason."""

    name: str
    distribution: str | None
    version: str | None
    stage: str
    reason: str

    def describe(self) -> str:
        """Return one line naming the plugin, its distribution and the reason."""
        origin = f" from {self.distribution} {self.version}" if self.distribution else ""
        return f"plugin {self.name!r}{origin} is unavailable: {self.reason}"


@attrs.define
class _Source:
    distribution: str | None = None
    version: str | None = None


class PluginManager:
    """Load qatcore plugins once, lazily, and build the registry from them.

    Entry points of group ``qatcore`` are loaded the first time the
    registry is needed. A plugin that fails to import or register is
    reported in :meth:`failures` and logged, and the others still load.
    With ``strict=True`` (or ``QATCORE_STRICT_PLUGINS=1``) the failure
    raises :class:`PluginError` instead. A plugin that raises
    :class:`PluginUnavailable` is reported in :meth:`skipped`, in strict
    mode too. ``QATCORE_BLOCK_PLUGINS=a,b`` skips the named entry points,
    and ``QATCORE_DISABLE_PLUGIN_AUTOLOAD=1`` skips them all. In-process
    plugins from :meth:`register` always count.
    """

    def __init__(self, *, strict: bool | None = None) -> None:
        self._strict = strict
        self._pm = pluggy.PluginManager(_hookspecs.PROJECT)
        self._pm.add_hookspecs(_hookspecs)
        self._sources: dict[str, _Source] = {}
        self._failures: list[PluginFailure] = []
        self._skipped: list[PluginSkip] = []
        self._blocked: list[str] = []
        self._autoloaded = False
        self._attempted: set[tuple[str, str, str | None]] = set()
        self._strict_error: PluginError | None = None
        self._logged: set[str] = set()
        self._registry: Registry | None = None
        self._user = Registry(plugin=USER)

    @property
    def strict(self) -> bool:
        """Whether a failing plugin raises instead of being reported."""
        return _env_flag(ENV_STRICT) if self._strict is None else self._strict

    # -- discovery ---------------------------------------------------------

    def _autoload(self) -> None:
        if self._strict_error is not None:
            raise self._strict_error
        if self._autoloaded:
            return
        if _env_flag(ENV_DISABLE_AUTOLOAD):
            logger.debug("%s is set: entry points are not loaded", ENV_DISABLE_AUTOLOAD)
            self._autoloaded = True
            return

        blocked = _env_names(ENV_BLOCK)
        # First-party plugins load first, so that a third-party plugin that
        # registers one of their keys is the one reported as conflicting.
        entry_points = sorted(
            importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
            key=lambda ep: (
                ep.dist is None or ep.dist.metadata["Name"] not in FIRST_PARTY,
                ep.name,
            ),
        )
        unknown = blocked - {entry_point.name for entry_point in entry_points}
        if unknown:
            logger.warning(
                "%s names %s, which match no installed qatcore entry point; the entry-point "
                "names are: %s",
                ENV_BLOCK,
                ", ".join(sorted(unknown)),
                ", ".join(sorted({entry_point.name for entry_point in entry_points})) or "none",
            )
        for entry_point in entry_points:
            dist = entry_point.dist
            source = _Source(
                dist.metadata["Name"] if dist is not None else None,
                dist.version if dist is not None else None,
            )
            if entry_point.name in blocked:
                logger.debug("plugin %r is blocked by %s", entry_point.name, ENV_BLOCK)
                self._blocked.append(entry_point.name)
                continue
            key = (entry_point.name, entry_point.value, source.distribution)
            if key in self._attempted:
                continue
            self._attempted.add(key)
            taken = self._sources.get(entry_point.name)
            if taken is not None:
                duplicate = ValueError(
                    f"entry point name {entry_point.name!r} of {source.distribution} is taken "
                    f"by {taken.distribution} {taken.version}; uninstall one of them"
                )
                self._fail(entry_point.name, source, "import", duplicate)
                continue
            try:
                plugin = entry_point.load()
                self._pm.register(plugin, name=entry_point.name)
                self._pm.check_pending()
            except PluginUnavailable as unavailable:
                self._skip(entry_point.name, source, "import", unavailable)
                continue
            except Exception as error:
                if self._pm.has_plugin(entry_point.name):
                    self._pm.unregister(name=entry_point.name)
                self._fail(entry_point.name, source, "import", error)
                continue
            self._sources[entry_point.name] = source
        self._autoloaded = True

    def _fail(self, name: str, source: _Source, stage: str, error: Exception) -> None:
        failure = PluginFailure(name, source.distribution, source.version, stage, error)
        if self.strict:
            # Kept and raised again on every later lookup, so that strict
            # mode never carries on with a partial set of plugins.
            self._strict_error = PluginError(
                failure.describe(), plugin=name, distribution=source.distribution
            )
            self._strict_error.__cause__ = error
            raise self._strict_error
        self._failures.append(failure)
        # The registry is rebuilt after in-process plugin changes; each
        # failure is logged once, with its traceback at debug level.
        if failure.describe() not in self._logged:
            self._logged.add(failure.describe())
            logger.warning("%s; the other plugins still load", failure.describe())
            logger.debug("traceback of the failure of plugin %r", name, exc_info=error)

    def _skip(self, name: str, source: _Source, stage: str, unavailable: PluginUnavailable) -> None:
        skip = PluginSkip(name, source.distribution, source.version, stage, unavailable.reason)
        self._skipped.append(skip)
        if skip.describe() not in self._logged:
            self._logged.add(skip.describe())
            logger.debug("%s; it is skipped", skip.describe())

    # -- in-process plugins ------------------------------------------------

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register an in-process plugin (a module or object with hook functions).

        Returns:
            The plugin's name, for :meth:`unregister`.

        Raises:
            ValueError: A plugin of that name, or that object, is registered already.
        """
        self._autoload()
        try:
            registered = self._pm.register(plugin, name=name)
            self._pm.check_pending()
        except ValueError as error:
            raise ValueError(f"cannot register plugin {name or plugin!r}: {error}") from None
        except pluggy.PluginValidationError as error:
            if self._pm.is_registered(plugin):
                self._pm.unregister(plugin)
            raise ValueError(f"cannot register plugin {name or plugin!r}: {error}") from None
        # pluggy returns None only for names blocked with its set_blocked,
        # which this class never calls.
        registered = str(registered)
        self._sources[registered] = _Source()
        self._registry = None
        return registered

    def unregister(self, name: str) -> None:
        """Remove a plugin by name; its registrations are gone from the next lookup on.

        Raises:
            KeyError: No plugin of that name is registered.
        """
        self._autoload()
        if not self._pm.has_plugin(name):
            raise KeyError(f"no plugin named {name!r} is registered (registered: {self.names()})")
        self._pm.unregister(name=name)
        self._sources.pop(name, None)
        self._failures = [failure for failure in self._failures if failure.name != name]
        self._skipped = [skip for skip in self._skipped if skip.name != name]
        self._registry = None

    def names(self) -> list[str]:
        """Return the names of the registered plugins, in load order."""
        self._autoload()
        return [name for name, _ in self._pm.list_name_plugin()]

    # -- the registry ------------------------------------------------------

    @property
    def registry(self) -> Registry:
        """The registry built from every loaded plugin and the user's own registrations."""
        if self._strict_error is not None:
            raise self._strict_error
        if self._registry is None:
            self._registry = self._build()
        return self._registry

    def _build(self) -> Registry:
        self._autoload()
        self._failures = [failure for failure in self._failures if failure.stage == "import"]
        self._skipped = [skip for skip in self._skipped if skip.stage == "import"]
        registry = Registry(plugin="qatcore")
        registry.merge(self._user)
        for name, plugin in list(self._pm.list_name_plugin()):
            staging = Registry(plugin=name)
            try:
                for hook_name in _hookspecs.REGISTRATION_HOOKS:
                    self._call_hook(hook_name, plugin, staging)
                registry.merge(staging)
            except PluginUnavailable as unavailable:
                self._skip(name, self._sources.get(name, _Source()), "register", unavailable)
            except Exception as error:
                source = self._sources.get(name, _Source())
                self._fail(name, source, "register", error)
        return registry

    def _call_hook(self, hook_name: str, plugin: object, staging: Registry) -> None:
        # Each plugin is called on its own so that its errors and its
        # registrations stay its own.
        hook = getattr(self._pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            if impl.plugin is plugin:
                impl.function(**{arg: staging for arg in impl.argnames})

    def register_user(self, kind: str, *args: Any, override: bool = False, **options: Any) -> None:
        """Register a user's own entry (``kind`` is a ``Registry.register_*`` suffix).

        User entries survive plugin changes and are checked against the
        plugins' entries straight away. A user entry registered with
        ``override=True`` also wins over a plugin registered later; without
        it, such a plugin fails to register with an error naming both.

        Raises:
            RegistryError: The entry conflicts with a plugin's, or is malformed.
        """
        staging = Registry(plugin=USER)
        getattr(staging, f"register_{kind}")(*args, override=override, **options)
        self.registry.merge(staging)
        self._user.merge(staging)

    def plugins(self) -> list[PluginInfo]:
        """Return the loaded plugins with their distributions and registrations."""
        registry = self.registry
        unloaded = {failure.name for failure in self._failures}
        unloaded |= {skip.name for skip in self._skipped}
        infos = []
        for name in self.names():
            if name in unloaded:
                continue
            source = self._sources.get(name, _Source())
            infos.append(
                PluginInfo(
                    name,
                    source.distribution,
                    source.version,
                    registry.registrations(name),
                    self._notes(name),
                )
            )
        return infos

    def _notes(self, name: str) -> list[str]:
        notes: list[str] = []
        for hook in self._pm.hook.qatcore_plugin_notes.get_hookimpls():
            if hook.plugin_name != name:
                continue
            try:
                notes.extend(str(note) for note in hook.function())
            except Exception as error:  # a broken note must not hide the plugin list
                logger.debug("notes hook of plugin %r failed", name, exc_info=error)
                notes.append(f"its qatcore_plugin_notes hook failed: {error!r}")
        return notes

    def failures(self) -> list[PluginFailure]:
        """Return the plugins that failed to import or register, with their errors."""
        self.registry  # noqa: B018 - building the registry records register failures
        return list(self._failures)

    def skipped(self) -> list[PluginSkip]:
        """Return the plugins that raised :class:`PluginUnavailable`, with their reasons."""
        self.registry  # noqa: B018 - building the registry records skips in hooks
        return list(self._skipped)

    def blocked(self) -> list[str]:
        """Return the entry-point names skipped because of ``QATCORE_BLOCK_PLUGINS``."""
        self._autoload()
        return list(self._blocked)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_manager: PluginManager | None = None


def plugin_manager() -> PluginManager:
    """Return the process-wide plugin manager, creating it on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_plugin_manager() -> PluginManager:
    """Forget every loaded plugin and registration; the next lookup loads afresh.

    Meant for tests and for scripts that change the plugin switches.
    """
    global _manager
    _manager = PluginManager()
    return _manager
