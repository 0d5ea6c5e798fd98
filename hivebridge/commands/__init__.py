"""Bot commands: declarative specs and a parser that never raises on chat input."""

from hivebridge.commands.parser import (
    ROLES,
    CommandError,
    CommandSpec,
    FlagSpec,
    NameCheck,
    OptionSpec,
    ParamSpec,
    ParsedCommand,
    Role,
    format_help,
    normalize_persona_name,
    parse,
    role_allows,
    tokenize,
)

__all__ = [
    "ROLES",
    "CommandError",
    "CommandSpec",
    "FlagSpec",
    "NameCheck",
    "OptionSpec",
    "ParamSpec",
    "ParsedCommand",
    "Role",
    "format_help",
    "normalize_persona_name",
    "parse",
    "role_allows",
    "tokenize",
]
