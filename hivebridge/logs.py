"""Log setup: key=value context (room, persona, event) and secret redaction."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from .config import Config

#: LogRecord attributes that carry context worth printing.
CONTEXT_KEYS = ("room_id", "persona", "event_id", "model", "txn_id")


class ContextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{key}={getattr(record, key)}" for key in CONTEXT_KEYS if hasattr(record, key)
        )
        return f"{line} [{context}]" if context else line


class RedactSecrets(logging.Filter):
    """Replaces known secrets anywhere in a formatted message with ***."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: set[str] = {s for s in secrets if s and len(s) >= 8}

    def add(self, *secrets: str | None) -> None:
        self.secrets.update(s for s in secrets if s and len(s) >= 8)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = message
        for secret in self.secrets:
            redacted = redacted.replace(secret, "***")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


redactor = RedactSecrets()


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(redactor)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """The process's log level (at start, and again on a config reload)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # mautrix logs request URLs, which carry user ids and access tokens at DEBUG.
    logging.getLogger("mau").setLevel(max(logging.INFO, root.level))


class LogLevel:
    """The log level as a part of a config reload: set again only when it changed, so a
    process that set its own level (a test, the demo) keeps it otherwise."""

    def __init__(self, level: str) -> None:
        self.level = level.upper()

    async def apply_config(self, config: Config) -> None:
        level = config.logging.level.upper()
        if level != self.level:
            set_level(level)
            self.level = level
