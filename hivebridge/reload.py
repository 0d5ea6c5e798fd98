"""Config reload without a restart: the whole new file in force everywhere, or none of it.

Every part that reads settings from the config while running registers itself
with :class:`ConfigReloader` (the composition root wires them) by implementing
:class:`TakesConfig`; a part whose settings need more checking than
:func:`~hivebridge.config.load_config` does also implements :class:`ChecksConfig`.
A part added later (tools, profiles) registers the same way: nothing here
names the parts.

A reload (SIGHUP or ``!reload_config``) reads the file again, keeps the
settings only a restart can change (:data:`RESTART_ONLY`) at their running
values, lets every part check the result, and only then hands it to each part.
A broken file, or one a part refuses, changes nothing; a part failing while
it applies puts the old config back on the parts already done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Protocol, runtime_checkable

from .config import Config, ConfigError, load_config

log = logging.getLogger("hivebridge.reload")

#: Settings a running bridge cannot change: listeners and ports, the database,
#: tokens, the homeserver and our namespace, the loaded model and its KV sizing,
#: the API server, the toolbox and the inference router (all built once at start).
#: Dotted prefixes of config keys; a changed one keeps its running value.
RESTART_ONLY: tuple[str, ...] = (
    "homeserver",
    "appservice",
    "database",
    "data_dir",
    "metrics",
    "admin_api",
    "api",
    "encryption",
    "tools",
    "inference.local",
    "inference.fallback_model",
    "inference.remote_deadline_s",
    "inference.discovery_deadline_s",
    "inference.endpoint_routing",
    "inference.session_salt",
)

#: Most keys one outcome line names before it says how many more.
MAX_KEYS_SHOWN = 8


@runtime_checkable
class TakesConfig(Protocol):
    """A part that reads settings from the config and can take new ones while running."""

    async def apply_config(self, config: Config) -> None:
        """Use ``config`` from now on. It is valid and every part accepted it; raising
        here undoes the reload (the parts already done get the old config back)."""


@runtime_checkable
class ChecksConfig(Protocol):
    """A part with rules of its own about its settings (beyond ``Config.validate``)."""

    def check_config(self, config: Config) -> None:
        """Raise :class:`ConfigError` (naming the key) to refuse ``config`` as a whole."""


class _Function:
    """A plain function as a part (the log level, a default on the router)."""

    def __init__(self, name: str, apply: Callable[[Config], Awaitable[None] | None]) -> None:
        self.name = name
        self._apply = apply

    async def apply_config(self, config: Config) -> None:
        result = self._apply(config)
        if result is not None:
            await result

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What one reload did; :attr:`line` says it in one line (for the log and the room)."""

    applied: bool
    source: str | None
    #: Keys now in force with a new value.
    changed: tuple[str, ...] = ()
    #: Keys changed in the file that keep their running value until a restart.
    restart_needed: tuple[str, ...] = ()
    #: Why the new config was refused (one line naming the key).
    error: str | None = None

    @property
    def line(self) -> str:
        if not self.applied:
            return f"Config not reloaded: {self.error}. The running config stays in force."
        text = f"Config reloaded from {self.source}: "
        text += f"changed {_keys(self.changed)}." if self.changed else "nothing changed."
        if self.restart_needed:
            text += f" Only a restart applies {_keys(self.restart_needed)} (kept as running)."
        return text


class ConfigReloader:
    """Holds the config in force and hands a new one to every registered part."""

    def __init__(self, config: Config, *, load: Callable[[str], Config] = load_config) -> None:
        self.current = config
        self._load = load
        self._parts: list[TakesConfig] = []
        self._lock = asyncio.Lock()

    def register(self, part: TakesConfig) -> None:
        """``part`` gets every new config, in registration order."""
        if not isinstance(part, TakesConfig):
            raise TypeError(f"{part!r} has no apply_config(config)")
        self._parts.append(part)

    def register_function(
        self, name: str, apply: Callable[[Config], Awaitable[None] | None]
    ) -> None:
        """A function as a part: ``apply(config)``, sync or async."""
        self._parts.append(_Function(name, apply))

    @property
    def parts(self) -> tuple[TakesConfig, ...]:
        return tuple(self._parts)

    async def reload(self, path: str | None = None) -> ReloadOutcome:
        """Read the config file again (``path``, else the one the bridge started from)."""
        async with self._lock:
            outcome = await self._reload(path or self.current.source)
        (log.info if outcome.applied else log.error)("%s", outcome.line)
        return outcome

    async def _reload(self, source: str | None) -> ReloadOutcome:
        if source is None:
            return ReloadOutcome(False, None, error="the bridge was started without a config file")
        try:
            loaded = await asyncio.to_thread(self._load, source)
            new, restart_needed = keep_restart_only(self.current, loaded)
            for part in self._parts:
                if isinstance(part, ChecksConfig):
                    part.check_config(new)
        except ConfigError as e:
            return ReloadOutcome(False, source, error=str(e))
        except Exception as e:  # a part's own check failing is a refusal too
            log.debug("config check failed", exc_info=True)
            return ReloadOutcome(False, source, error=f"{type(e).__name__}: {_short(e)}")
        old = self.current
        changed = changed_keys(old, new)
        if changed:
            try:
                await self._apply(old, new)
            except ReloadFailed as e:
                return ReloadOutcome(False, source, error=str(e))
        self.current = new
        return ReloadOutcome(True, source, tuple(changed), tuple(restart_needed))

    async def _apply(self, old: Config, new: Config) -> None:
        done: list[TakesConfig] = []
        for part in self._parts:
            try:
                await part.apply_config(new)
            except Exception as e:
                log.exception("%r could not take the new config; putting the old one back", part)
                for undo in reversed([*done, part]):
                    try:
                        await undo.apply_config(old)
                    except Exception:
                        log.exception("putting the old config back on %r failed", undo)
                raise ReloadFailed(f"{part!r} could not take it: {_short(e)}") from e
            done.append(part)


class ReloadFailed(Exception):
    """A part failed to apply a config it had accepted; the old config was put back."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values of a config by dotted key (``limits.burst``, ``endpoints[0].url``)."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in fields(value):
            if f.name == "source":
                continue
            out.update(flatten(getattr(value, f.name), f"{prefix}{f.name}."))
        return out
    key = prefix.rstrip(".")
    if isinstance(value, tuple) and any(is_dataclass(v) for v in value):
        out = {f"{key}.count": len(value)}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{key}[{i}]."))
        return out
    return {key: value}


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ (never the values: some are secrets)."""
    a, b = flatten(old), flatten(new)
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k, _MISSING) != b.get(k, _MISSING)]


def keep_restart_only(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """``loaded`` with every :data:`RESTART_ONLY` setting at its running value, and the
    keys of those settings that the file changed."""
    changed = changed_keys(running, loaded)
    kept = [k for k in changed if _restart_only(k)]
    merged = loaded
    for prefix in RESTART_ONLY:
        merged = _set(merged, prefix.split("."), _get(running, prefix.split(".")))
    return merged, kept


def _restart_only(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESTART_ONLY)


def _get(value: Any, path: list[str]) -> Any:
    for name in path:
        value = getattr(value, name)
    return value


def _set(value: Any, path: list[str], new: Any) -> Any:
    head, *rest = path
    return replace(value, **{head: _set(getattr(value, head), rest, new) if rest else new})


def _keys(keys: Iterable[str]) -> str:
    shown = list(keys)
    more = len(shown) - MAX_KEYS_SHOWN
    text = ", ".join(shown[:MAX_KEYS_SHOWN])
    return f"{text} and {more} more" if more > 0 else text


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:199] + "…"


_MISSING = object()
