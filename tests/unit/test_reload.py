"""Config reload: all of a new file in force on every part, or none of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivebridge.config import Config, ConfigError, load_config
from hivebridge.reload import (
    ConfigReloader,
    TakesConfig,
    changed_keys,
    keep_restart_only,
)

BASE = """\
homeserver:
  address: http://127.0.0.1:8008
  domain: example.org
appservice:
  port: 29333
limits:
  requests_per_minute: 10
endpoints:
  - name: gpu1
    url: http://gpu1:8000/v1
    api_key: sk-secret-key-1234
"""


class Part:
    """Records what it was given; can refuse or fail on demand."""

    def __init__(self, refuse: bool = False, fail_on: int | None = None) -> None:
        self.seen: list[Config] = []
        self.refuse = refuse
        self.fail_on = fail_on

    def check_config(self, config: Config) -> None:
        if self.refuse and config.limits.requests_per_minute == 1:
            raise ConfigError("limits.requests_per_minute", "this part wants more than 1")

    async def apply_config(self, config: Config) -> None:
        if self.fail_on is not None and config.limits.requests_per_minute == self.fail_on:
            raise RuntimeError("cannot")
        self.seen.append(config)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def source(tmp_path: Path) -> str:
    return write(tmp_path / "config.yaml", BASE)


def test_parts_are_checked_structurally(source: str) -> None:
    assert isinstance(Part(), TakesConfig)
    reloader = ConfigReloader(load_config(source, env={}))
    with pytest.raises(TypeError):
        reloader.register(object())  # type: ignore[arg-type]


async def test_changed_setting_reaches_every_part(source: str) -> None:
    reloader = ConfigReloader(load_config(source, env={}), load=lambda p: load_config(p, env={}))
    a, b = Part(), Part()
    reloader.register(a)
    reloader.register(b)
    write(Path(source), BASE.replace("requests_per_minute: 10", "requests_per_minute: 2"))
    outcome = await reloader.reload()
    assert outcome.applied
    assert outcome.changed == ("limits.requests_per_minute",)
    assert [c.limits.requests_per_minute for c in a.seen + b.seen] == [2.0, 2.0]
    assert reloader.current.limits.requests_per_minute == 2.0
    assert outcome.line == f"Config reloaded from {source}: changed limits.requests_per_minute."


async def test_nothing_changed_applies_nothing(source: str) -> None:
    reloader = ConfigReloader(load_config(source, env={}), load=lambda p: load_config(p, env={}))
    part = Part()
    reloader.register(part)
    outcome = await reloader.reload()
    assert outcome.applied and not outcome.changed and not part.seen
    assert outcome.line.endswith("nothing changed.")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (BASE.replace("requests_per_minute: 10", "requests_per_minute: -1"), "limits."),
        (BASE.replace("requests_per_minute: 10", "requests_per_minute: lots"), "limits."),
        (BASE + "limitz: {}\n", "limitz"),
        (BASE + "routing: {command_prefix: ab}\n", "routing.command_prefix"),
        (BASE + "  - [unclosed\n", "not valid YAML"),
    ],
    ids=["negative", "not-a-number", "unknown-key", "bad-prefix", "bad-yaml"],
)
async def test_a_broken_file_is_refused_whole(source: str, text: str, key: str) -> None:
    running = load_config(source, env={})
    reloader = ConfigReloader(running, load=lambda p: load_config(p, env={}))
    part = Part()
    reloader.register(part)
    write(Path(source), text.replace("port: 29333", "port: 29444"))
    outcome = await reloader.reload()
    assert not outcome.applied
    assert key in outcome.line
    assert outcome.line.startswith("Config not reloaded: ")
    assert outcome.line.endswith("The running config stays in force.")
    assert "\n" not in outcome.line
    assert part.seen == [] and reloader.current is running


async def test_a_part_may_refuse(source: str) -> None:
    running = load_config(source, env={})
    reloader = ConfigReloader(running, load=lambda p: load_config(p, env={}))
    first, refusing = Part(), Part(refuse=True)
    reloader.register(first)
    reloader.register(refusing)
    write(Path(source), BASE.replace("requests_per_minute: 10", "requests_per_minute: 1"))
    outcome = await reloader.reload()
    assert not outcome.applied
    assert "limits.requests_per_minute: this part wants more than 1" in outcome.line
    assert first.seen == [] and reloader.current is running


async def test_a_part_failing_to_apply_puts_the_old_config_back(source: str) -> None:
    running = load_config(source, env={})
    reloader = ConfigReloader(running, load=lambda p: load_config(p, env={}))
    first, failing = Part(), Part(fail_on=3)
    reloader.register(first)
    reloader.register(failing)
    write(Path(source), BASE.replace("requests_per_minute: 10", "requests_per_minute: 3"))
    outcome = await reloader.reload()
    assert not outcome.applied and "could not take it" in outcome.line
    # the first part got the new config, then the old one back
    assert [c.limits.requests_per_minute for c in first.seen] == [3.0, 10.0]
    assert reloader.current is running


async def test_restart_only_settings_keep_their_running_values(source: str) -> None:
    running = load_config(source, env={})
    reloader = ConfigReloader(running, load=lambda p: load_config(p, env={}))
    part = Part()
    reloader.register(part)
    text = BASE.replace("port: 29333", "port: 29444").replace(
        "domain: example.org", "domain: x.org"
    )
    write(
        Path(source), text + "database: {url: 'postgres://u:pw@db/x'}\nrouting: {bounce_limit: 3}\n"
    )
    outcome = await reloader.reload()
    assert outcome.applied
    assert outcome.changed == ("routing.bounce_limit",)
    assert set(outcome.restart_needed) == {"appservice.port", "homeserver.domain", "database.url"}
    new = reloader.current
    assert new.appservice.port == 29333 and new.homeserver.domain == "example.org"
    assert new.database.url == running.database.url and new.routing.bounce_limit == 3
    assert "Only a restart applies" in outcome.line and "appservice.port" in outcome.line
    assert "pw@db" not in outcome.line


async def test_started_without_a_file_cannot_reload(source: str) -> None:
    from dataclasses import replace

    reloader = ConfigReloader(replace(load_config(source, env={}), source=None))
    outcome = await reloader.reload()
    assert not outcome.applied and "without a config file" in outcome.line


def test_changed_keys_name_keys_never_values(source: str) -> None:
    old = load_config(source, env={})
    new = load_config(
        write(Path(source), BASE.replace("sk-secret-key-1234", "sk-other-key-9876")), env={}
    )
    assert changed_keys(old, new) == ["endpoints[0].api_key"]
    merged, kept = keep_restart_only(old, new)
    assert kept == [] and merged.endpoints[0].api_key == "sk-other-key-9876"


async def test_register_function_sync_and_async(source: str) -> None:
    reloader = ConfigReloader(load_config(source, env={}), load=lambda p: load_config(p, env={}))
    seen: list[str] = []

    async def later(c: Config) -> None:
        seen.append("async")

    def now(c: Config) -> None:
        seen.append("sync")

    reloader.register_function("sync", now)
    reloader.register_function("async", later)
    write(Path(source), BASE + "logging: {level: DEBUG}\n")
    assert (await reloader.reload()).applied
    assert seen == ["sync", "async"]


async def test_parts_built_once_at_start_need_a_restart(source: str) -> None:
    """The API server, the toolbox and the inference router read their settings once:
    a reload must not claim to have applied a change to them."""
    running = load_config(source, env={})
    reloader = ConfigReloader(running, load=lambda p: load_config(p, env={}))
    write(
        Path(source),
        BASE + "inference: {endpoint_routing: round_robin, session_salt: sixteen-chars-salt}\n",
    )
    outcome = await reloader.reload()
    assert outcome.changed == ()
    assert set(outcome.restart_needed) == {
        "inference.endpoint_routing",
        "inference.session_salt",
    }
    assert reloader.current.inference.session_salt == running.inference.session_salt
