"""The plugin host: loads every plugin through the ``petune`` entry-point group.

First-party plugins (``petune_plugins``, shipped in the ``petune`` distribution) and
third-party packages go through the same path. Rules:

* order is deterministic: first-party entry points by name, then third-party ones
  sorted by distribution name and entry-point name;
* a plugin that fails to import or register is recorded (package, entry point,
  error) and everything else keeps working; ``PETUNE_STRICT_PLUGINS=1`` makes it fatal;
* ``PETUNE_DISABLE_PLUGIN_AUTOLOAD=1`` loads first-party plugins only;
* a name registered twice is recorded as a failure of the later plugin, and using
  that name is an error naming both packages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from pydantic import BaseModel

from petune import hookspecs
from petune.api import ModelSource, Reward, Strategy, Task, missing_methods
from petune.errors import PluginError, UserError

GROUP = "petune"
FIRST_PARTY = "petune"
KINDS = {"strategy": Strategy, "task": Task, "model_source": ModelSource, "reward": Reward}
_HOOK_OF_KIND = {"strategy": "register_strategies", "task": "register_tasks", "model_source": "register_model_sources",
                 "reward": "register_rewards"}


@dataclass(frozen=True)
class PluginOrigin:
    """Where a plugin came from: distribution and entry point."""

    package: str
    version: str
    entry_point: str

    @property
    def first_party(self) -> bool:
        return self.package == FIRST_PARTY

    def __str__(self) -> str:
        return f"{self.package} {self.version} (entry point {self.entry_point!r})"


@dataclass
class Registration:
    kind: str
    name: str
    cls: type
    origin: PluginOrigin
    clashes_with: list[PluginOrigin] = field(default_factory=list)


@dataclass
class LoadFailure:
    origin: PluginOrigin
    error: str

    def __str__(self) -> str:
        return f"plugin {self.origin.entry_point!r} from package {self.origin.package} {self.origin.version}: {self.error}"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _entry_points(autoload: bool) -> list[tuple[PluginOrigin, metadata.EntryPoint]]:
    seen: dict[tuple[str, str], tuple[PluginOrigin, metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        package = dist.name if dist else "?"
        origin = PluginOrigin(package, dist.version if dist else "?", ep.name)
        if not autoload and not origin.first_party:
            continue
        seen.setdefault((package.lower(), ep.name), (origin, ep))  # one copy per (package, name)
    return sorted(seen.values(), key=lambda item: (not item[0].first_party, item[0].package.lower(), item[0].entry_point))


class PluginHost:
    """Loads plugins and holds what they registered."""

    def __init__(self, *, autoload: bool | None = None, strict: bool | None = None, extra: list[tuple[PluginOrigin, Any]] = ()):
        self.autoload = not _env_flag("PETUNE_DISABLE_PLUGIN_AUTOLOAD") if autoload is None else autoload
        self.strict = _env_flag("PETUNE_STRICT_PLUGINS") if strict is None else strict
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[LoadFailure] = []
        self.registry: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self._plugins: list[tuple[PluginOrigin, Any]] = []  # in load order

        loaded = []
        for origin, ep in _entry_points(self.autoload):
            try:
                loaded.append((origin, ep.load()))
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
                self._fail(origin, f"{type(exc).__name__}: {exc}")
        loaded += list(extra)  # plugins given in-process (tests, embedding)
        # pluggy calls the last-registered plugin first: registering in reverse makes lifecycle
        # hooks run in the documented load order, with tryfirst/trylast/wrappers on top.
        for origin, plugin in reversed(loaded):
            try:
                self.pm.register(plugin, name=f"{origin.package}:{origin.entry_point}")
            except Exception as exc:  # noqa: BLE001 - recorded against the plugin, as above
                self._fail(origin, f"{type(exc).__name__}: {exc}")
        self._plugins = [(o, p) for o, p in loaded if self.pm.is_registered(p)]  # in load order
        for kind in KINDS:
            self._collect(kind)

    # -- loading -------------------------------------------------------------------------
    def _fail(self, origin: PluginOrigin, error: str) -> None:
        failure = LoadFailure(origin, error)
        if self.strict:
            raise PluginError(str(failure), hint="unset PETUNE_STRICT_PLUGINS to skip broken plugins")
        self.failures.append(failure)

    def _impls(self, hook_name: str) -> Iterator[tuple[PluginOrigin, Any]]:
        """Hook implementations in load order (for the registration hooks, which are
        called plugin by plugin so that a name clash can name both packages)."""
        impls = {impl.plugin: impl for impl in getattr(self.pm.hook, hook_name).get_hookimpls()}
        for origin, plugin in self._plugins:
            if plugin in impls:
                yield origin, impls[plugin]

    def _collect(self, kind: str) -> None:
        base = KINDS[kind]
        for origin, impl in self._impls(_HOOK_OF_KIND[kind]):
            def register(cls, _origin=origin):
                self._register(kind, base, cls, _origin)

            try:
                impl.function(*[{"register": register}[a] for a in impl.argnames])
            except Exception as exc:  # noqa: BLE001 - recorded against the plugin, as above
                self._fail(origin, f"{_HOOK_OF_KIND[kind]} raised {type(exc).__name__}: {exc}")

    def _register(self, kind: str, base: type, cls: Any, origin: PluginOrigin) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"register() expects a subclass of petune.api.{base.__name__}, got {cls!r}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} has no 'name'")
        if not (isinstance(cls.Options, type) and issubclass(cls.Options, BaseModel)):
            raise TypeError(f"{cls.__name__}.Options must be a pydantic model")
        missing = missing_methods(cls)
        if missing:
            raise TypeError(f"{cls.__name__} does not implement {', '.join(missing)}, which every "
                            f"{base.__name__} must (see petune/api.py)")
        taken = self.registry[kind].get(name)
        if taken is not None:
            taken.clashes_with.append(origin)
            self.failures.append(LoadFailure(origin, f"{kind} name {name!r} is already registered by {taken.origin}"))
            return
        self.registry[kind][name] = Registration(kind, name, cls, origin)

    # -- lookups -------------------------------------------------------------------------
    def get(self, kind: str, name: str, where: str | None = None) -> Registration:
        reg = self.registry[kind].get(name)
        if reg is None:
            import difflib

            known = sorted(self.registry[kind])
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"unknown {kind.replace('_', ' ')} {name!r}", where=where,
                            hint=f"{hint}known: {', '.join(known) or 'none'} (see `petune plugins`)")
        if reg.clashes_with:
            others = ", ".join(str(o) for o in reg.clashes_with)
            raise PluginError(f"{kind} {name!r} is registered by two plugins: {reg.origin} and {others}",
                              where=where, hint="uninstall one of the packages")
        return reg

    def strategy(self, name: str) -> Strategy:
        return self.get("strategy", name, "strategy.name").cls()

    def task(self, name: str) -> Task:
        return self.get("task", name, "task.name").cls()

    def reward(self, name: str, where: str | None = None) -> Reward:
        return self.get("reward", name, where).cls()

    def model_sources(self) -> dict[str, ModelSource]:
        return {name: reg.cls() for name, reg in self.registry["model_source"].items()}

    def listing(self) -> list[dict]:
        rows = []
        for kind, regs in self.registry.items():
            for reg in regs.values():
                rows.append({"name": reg.name, "kind": kind, "package": reg.origin.package,
                             "version": reg.origin.version, "description": reg.cls.description})
        return rows

    # -- lifecycle hooks and blame -------------------------------------------------------
    def call(self, hook_name: str, **kwargs) -> list:
        """Call a lifecycle hook through pluggy (load order; ``tryfirst``, ``trylast`` and
        wrappers honoured) and return the non-None results; an exception names the plugin."""
        caller = getattr(self.pm.hook, hook_name)
        try:
            return caller(**kwargs)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:
            origin = self._origin_in_traceback(caller, exc)
            if origin is None or origin.first_party:
                raise
            raise self._plugin_failed(origin, f"hook {hook_name}", exc) from exc

    def _origin_in_traceback(self, caller, exc: BaseException) -> PluginOrigin | None:
        """The plugin whose hook implementation the exception came out of."""
        plugin_of_code = {}
        for impl in caller.get_hookimpls():
            plugin_of_code.setdefault(impl.function.__code__, impl.plugin)
        origin_of = {id(plugin): origin for origin, plugin in self._plugins}
        tb = exc.__traceback__
        while tb is not None:  # outermost first: the implementation pluggy called
            plugin = plugin_of_code.get(tb.tb_frame.f_code)
            if plugin is not None:
                return origin_of.get(id(plugin))
            tb = tb.tb_next
        return None

    @staticmethod
    def _plugin_failed(origin: PluginOrigin, what: str, exc: Exception) -> PluginError:
        return PluginError(f"plugin {origin.entry_point!r} from package {origin.package} {origin.version} "
                           f"failed ({what}): {type(exc).__name__}: {exc}",
                           hint=f"report it to the maintainers of {origin.package}")

    @contextmanager
    def blame(self, kind: str, name: str, what: str):
        """Run plugin code; a crash in a third-party plugin is reported with its package."""
        with self._blame(self.registry[kind][name].origin, f"{kind} {name!r} in {what}"):
            yield

    def _blame(self, origin: PluginOrigin, what: str):
        return blamed(origin, what)


@contextmanager
def blamed(origin: PluginOrigin, what: str):
    """Run plugin code from ``origin``; a crash in a third-party plugin is reported with its package
    (for code that holds a plugin's :class:`Registration` rather than the host)."""
    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if origin.first_party:
            raise  # petune's own bug: keep the traceback
        raise PluginHost._plugin_failed(origin, what, exc) from exc


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost()
    return _HOST
