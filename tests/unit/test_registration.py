from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

from hivebridge.config import AppserviceConfig, Config, HomeserverConfig
from hivebridge.registration import load_tokens, make_registration, user_namespace_regex


def config(bot: str = "hive_bot", prefix: str = "hive_") -> Config:
    return Config(
        homeserver=HomeserverConfig(address="http://127.0.0.1:8008", domain="example.org"),
        appservice=AppserviceConfig(bot_localpart=bot, user_prefix=prefix),
    )


def test_namespace_covers_personas_and_bot_only() -> None:
    rx = re.compile(user_namespace_regex(config()))
    assert rx.match("@hive_bot:example.org")
    assert rx.match("@hive_alice:example.org")
    assert not rx.match("@alice:example.org")
    assert not rx.match("@hive_alice:example.org.evil.com")
    assert not rx.match("@hive_alice:exampleXorg")  # the dot is escaped
    assert not rx.match("x@hive_alice:example.org")


def test_namespace_adds_bot_when_outside_prefix() -> None:
    regex = user_namespace_regex(config(bot="hivebridge"))
    assert regex.startswith("^@") and regex.endswith("$")
    rx = re.compile(regex)
    assert rx.match("@hivebridge:example.org")
    assert rx.match("@hive_x:example.org")
    assert not rx.match("@hivebridgex:example.org")


def test_registration_fields_and_fresh_tokens() -> None:
    a, b = make_registration(config()), make_registration(config())
    assert a["rate_limited"] is False
    assert a["receive_ephemeral"] is True
    assert a["sender_localpart"] == "hive_bot"
    assert a["namespaces"]["users"][0]["exclusive"] is True
    assert a["as_token"] != b["as_token"] and a["hs_token"] != b["hs_token"]
    assert a["as_token"] != a["hs_token"]
    assert len(a["as_token"]) >= 32


def test_cli_generates_registration_that_the_bridge_reads(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("homeserver:\n  address: http://127.0.0.1:8008\n  domain: example.org\n")
    reg = tmp_path / "registration.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "hivebridge", "-c", str(cfg), "-r", str(reg), "-g"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    data = YAML(typ="safe").load(reg.read_text())
    assert data["url"] == "http://127.0.0.1:29333"
    assert (reg.stat().st_mode & 0o077) == 0  # tokens are not world-readable
    assert load_tokens(config(), reg) == (data["as_token"], data["hs_token"])


def test_registration_asks_for_encryption_extensions_only_when_encryption_is_on() -> None:
    from dataclasses import replace

    from hivebridge.config import EncryptionConfig

    plain = make_registration(config())
    assert "org.matrix.msc3202" not in plain and "io.element.msc4190" not in plain
    on = replace(config(), encryption=EncryptionConfig(enabled=True, pickle_key="k" * 24))
    registration = make_registration(on)
    # MSC3202: device lists and one-time key counts; MSC4190: devices made by us.
    assert registration["org.matrix.msc3202"] is True
    assert registration["io.element.msc4190"] is True
    # To-device events come with ephemeral ones; the unstable key would double them.
    assert registration["receive_ephemeral"] is True
    assert "de.sorunome.msc2409.push_ephemeral" not in registration
