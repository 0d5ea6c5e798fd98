"""The appservice registration file the homeserver admin installs."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from .config import Config, ConfigError, read_yaml


def user_namespace_regex(config: Config) -> str:
    """One exclusive regex over every persona and the bot.

    Synapse matches namespaces from the start of the user ID, so the regex is
    anchored on both ends; the bot gets an alternative only when its localpart
    does not already start with the persona prefix.
    """
    domain = re.escape(config.homeserver.domain)
    prefix = re.escape(config.appservice.user_prefix)
    bot = config.appservice.bot_localpart
    if bot.startswith(config.appservice.user_prefix):
        return f"^@{prefix}.*:{domain}$"
    return f"^@(?:{re.escape(bot)}|{prefix}.*):{domain}$"


def make_registration(config: Config) -> dict[str, Any]:
    registration: dict[str, Any] = {
        "id": config.appservice.id,
        "url": config.appservice.address,
        "as_token": secrets.token_urlsafe(48),
        "hs_token": secrets.token_urlsafe(48),
        "sender_localpart": config.appservice.bot_localpart,
        "namespaces": {
            "users": [{"regex": user_namespace_regex(config), "exclusive": True}],
            "aliases": [],
            "rooms": [],
        },
        # Personas talk a lot; Synapse's per-user limits would 429 them.
        "rate_limited": False,
        # Typing and receipts (stable key only: the unstable msc2409 key doubles events).
        "receive_ephemeral": True,
    }
    if config.encryption.enabled:
        registration.update(ENCRYPTION_REGISTRATION)
    return registration


#: What end-to-end encryption needs from the homeserver, per appservice: device
#: lists and one-time key counts in transactions (MSC3202) and devices created by
#: the appservice for its users (MSC4190). To-device events (MSC2409/MSC4203) ride
#: on ``receive_ephemeral`` once the homeserver enables them (docs/operations.md).
ENCRYPTION_REGISTRATION: dict[str, Any] = {
    "org.matrix.msc3202": True,
    "io.element.msc4190": True,
}


def write_registration(config: Config, path: str | os.PathLike[str]) -> dict[str, Any]:
    registration = make_registration(config)
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    yaml = YAML()
    yaml.default_flow_style = False
    tmp.unlink(missing_ok=True)  # O_EXCL below: never reuse a file some other mode made
    # Created 0600, not chmod-ed after: it holds both tokens from its first byte.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.dump(registration, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(target)
    return registration


def load_tokens(config: Config, registration_path: str | os.PathLike[str]) -> tuple[str, str]:
    """as_token and hs_token: config/env first, then the registration file."""
    as_token, hs_token = config.appservice.as_token, config.appservice.hs_token
    if as_token and hs_token:
        return as_token, hs_token
    if not Path(registration_path).is_file():
        raise ConfigError(
            "appservice.as_token",
            f"not set and no registration at {registration_path} (generate one with -g)",
        )
    data = read_yaml(registration_path)
    if not isinstance(data, dict):
        raise ConfigError(str(registration_path), "not a registration file")
    as_token = as_token or data.get("as_token")
    hs_token = hs_token or data.get("hs_token")
    if not isinstance(as_token, str) or not as_token:
        raise ConfigError(f"{registration_path}: as_token", "missing")
    if not isinstance(hs_token, str) or not hs_token:
        raise ConfigError(f"{registration_path}: hs_token", "missing")
    return as_token, hs_token
