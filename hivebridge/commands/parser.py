"""Parse bot command lines against small declarative specs.

``parse(body, specs)`` returns ``None`` (not a command), a :class:`ParsedCommand`, or a
:class:`CommandError` whose text is one short line fit to post back into the room. It never
raises for any string input: chat text is hostile by default, and a traceback in a room
helps nobody.

Grammar (after the prefix, ``!`` by default)::

    name [--flag value | --flag=value | --bool-flag]... [positional]... [rest...] [key=value]...

* the command name is ASCII ``[A-Za-z][A-Za-z0-9_-]*``, case-insensitive; anything else
  after the prefix ("!!", "! hi", "!?") is not a command;
* arguments are split like POSIX ``shlex`` (double/single quotes, backslash escapes),
  except that any Unicode whitespace separates words;
  an unbalanced quote is a :class:`CommandError`, never an exception;
* a token written *unquoted* as ``--name`` is a flag, as ``key=value`` (declared key) a
  param; quoting it makes it a plain positional; ``--`` ends options;
* flags may also name declared params (``--temp 0.5`` == ``temp=0.5``);
* commands with a ``rest`` (free text, e.g. the prompt of ``!ask <model> <prompt...>``)
  read only as many tokens as their positionals need (declared ``key=value`` and flags may
  come before or between them); the remainder is kept verbatim (so
  "What's up?" needs no quoting) except that *trailing* ``key=value`` words whose key is a
  declared param are taken off the end as params. A remainder that is one fully quoted
  token is unquoted.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..matrix.content import strip_reply_fallback
from ..permissions import ROLES, Role, role_allows

__all__ = [
    "ActionSpec",
    "CommandError",
    "CommandSpec",
    "FlagSpec",
    "NameCheck",
    "OptionSpec",
    "ParamSpec",
    "ParsedCommand",
    "Value",
    "format_help",
    "normalize_persona_name",
    "parse",
    "tokenize",
]

Value = str | int | float | bool
Kind = Literal["str", "int", "float", "bool"]

MAX_BODY_CHARS = 65536
_SHOW_CHARS = 40
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_PARAM_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)=(.*)", re.DOTALL)
_INT_RE = re.compile(r"[+-]?[0-9]{1,18}")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
_TRUE = frozenset({"1", "true", "yes", "on", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "n"})


class _ArgError(Exception):
    """Internal: turned into a CommandError with the command's usage."""


def _show(text: str) -> str:
    """User text made safe to echo in a one-line error: printable and short."""
    clean = "".join(c if c.isprintable() else "?" for c in text[: _SHOW_CHARS + 1])
    return clean if len(clean) <= _SHOW_CHARS else clean[: _SHOW_CHARS - 1] + "…"


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """A typed value: used as a flag (``--name``) or a param (``name=value``).

    ``minimum``/``maximum`` are inclusive; ``choices`` are matched case-insensitively;
    ``validator`` returns an error message or ``None``.
    """

    name: str
    kind: Kind = "str"
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    validator: Callable[[Value], str | None] | None = None
    help: str = ""

    def convert(self, raw: str) -> Value:
        value: Value
        text = raw.strip()
        if self.kind == "int":
            if not _INT_RE.fullmatch(text):
                raise _ArgError(f"{self.name} must be a whole number, not '{_show(raw)}'")
            value = int(text)
        elif self.kind == "float":
            if not _FLOAT_RE.fullmatch(text) or not math.isfinite(float(text)):
                raise _ArgError(f"{self.name} must be a number, not '{_show(raw)}'")
            value = float(text)
        elif self.kind == "bool":
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise _ArgError(f"{self.name} must be yes or no, not '{_show(raw)}'")
            value = low in _TRUE
        else:
            value = raw
        if isinstance(value, int | float) and not isinstance(value, bool):
            self._check_range(value)
        if self.choices:
            match = [c for c in self.choices if c.lower() == str(value).lower()]
            if not match:
                raise _ArgError(f"{self.name} must be one of: {', '.join(self.choices)}")
            value = match[0]
        if self.validator is not None:
            try:
                problem = self.validator(value)
            except Exception:  # a buggy validator must not crash the room
                problem = f"invalid {self.name}"
            if problem:
                raise _ArgError(problem)
        return value

    def _check_range(self, value: float) -> None:
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise _ArgError(f"{self.name} must be between {_num(lo)} and {_num(hi)}")
        if lo is not None and value < lo:
            raise _ArgError(f"{self.name} must be at least {_num(lo)}")
        if hi is not None and value > hi:
            raise _ArgError(f"{self.name} must be at most {_num(hi)}")


FlagSpec = OptionSpec
ParamSpec = OptionSpec


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """A sub-action of a command (``persona spawn``): its own usage, help and minimum role.

    ``usage`` omits the prefix and includes the command ("persona spawn <name> …").
    """

    name: str
    usage: str
    help: str
    min_role: Role = "user"

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name) or self.name != self.name.lower():
            raise ValueError(f"action names must be lowercase [a-z0-9_-]: {self.name!r}")
        if self.min_role not in ROLES:
            raise ValueError(f"unknown role {self.min_role!r}")


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command. ``usage`` omits the prefix ("ask <model> <prompt...>").

    With ``actions`` the first positional names a sub-action; each action carries its
    own minimum role, so ``!persona list`` is for everyone and ``!persona spawn`` is not.
    """

    name: str
    usage: str
    help: str
    min_role: Role = "user"
    args: tuple[str, ...] = ()  # required positionals
    optional_args: tuple[str, ...] = ()  # optional positionals, after the required ones
    rest: str | None = None  # name of a free-text remainder, if the command takes one
    rest_required: bool = False
    flags: tuple[OptionSpec, ...] = ()
    params: tuple[OptionSpec, ...] = ()
    aliases: tuple[str, ...] = ()
    actions: tuple[ActionSpec, ...] = ()

    def __post_init__(self) -> None:
        for name in (self.name, *self.aliases):
            if not _NAME_RE.fullmatch(name) or name != name.lower():
                raise ValueError(f"command names must be lowercase [a-z0-9_-]: {name!r}")
        if self.min_role not in ROLES:
            raise ValueError(f"unknown role {self.min_role!r}")
        if self.actions and not (self.args or self.optional_args):
            raise ValueError(f"{self.name}: actions need a first positional to name them")

    def action(self, name: str) -> ActionSpec | None:
        key = name.lower()
        return next((a for a in self.actions if a.name == key), None)

    def flag(self, name: str) -> tuple[OptionSpec, bool] | None:
        """The option a ``--name`` refers to, and whether it is a param."""
        key = _key(name)
        for spec in self.flags:
            if _key(spec.name) == key:
                return spec, False
        for spec in self.params:
            if _key(spec.name) == key:
                return spec, True
        return None

    def param(self, name: str) -> OptionSpec | None:
        key = _key(name)
        return next((p for p in self.params if _key(p.name) == key), None)


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    name: str  # canonical name (not the alias typed)
    spec: CommandSpec = field(repr=False)
    args: Mapping[str, str] = field(default_factory=dict)
    rest: str | None = None  # "" when the command takes a rest and none was given
    flags: Mapping[str, Value] = field(default_factory=dict)
    params: Mapping[str, Value] = field(default_factory=dict)
    invoked_as: str = ""
    action: ActionSpec | None = None

    @property
    def min_role(self) -> Role:
        """The role this invocation needs: its action's, else the command's."""
        return self.action.min_role if self.action is not None else self.spec.min_role

    @property
    def label(self) -> str:
        """``persona spawn`` or ``ask``: what was run, without the prefix."""
        return f"{self.name} {self.action.name}" if self.action is not None else self.name


@dataclass(frozen=True, slots=True)
class CommandError:
    """A one-line problem to post back; ``usage`` is "" when no command matched."""

    message: str
    usage: str = ""
    command: str | None = None

    def __str__(self) -> str:
        return f"{self.message} {self.usage}" if self.usage else self.message


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    start: int
    end: int
    plain: bool  # no quotes or escapes: eligible to be a flag or a param


def _next_token(text: str, pos: int) -> _Token | None:
    """Read one POSIX-shlex word (whitespace_split) starting at or after ``pos``."""
    n = len(text)
    while pos < n and text[pos].isspace():
        pos += 1
    if pos >= n:
        return None
    start, out, plain = pos, [], True
    while pos < n and not text[pos].isspace():
        c = text[pos]
        if c == "\\":
            plain = False
            if pos + 1 >= n:
                raise _ArgError("dangling backslash at the end")
            out.append(text[pos + 1])
            pos += 2
        elif c == "'":
            plain = False
            close = text.find("'", pos + 1)
            if close < 0:
                raise _ArgError("unbalanced ' quote")
            out.append(text[pos + 1 : close])
            pos = close + 1
        elif c == '"':
            plain = False
            pos += 1
            while True:
                if pos >= n:
                    raise _ArgError('unbalanced " quote')
                c = text[pos]
                if c == '"':
                    pos += 1
                    break
                if c == "\\" and pos + 1 < n and text[pos + 1] in '"\\':
                    out.append(text[pos + 1])
                    pos += 2
                else:
                    out.append(c)
                    pos += 1
        else:
            out.append(c)
            pos += 1
    return _Token("".join(out), start, pos, plain)


def tokenize(text: str) -> list[str] | CommandError:
    """``shlex.split(text, posix=True)`` that returns an error instead of raising."""
    words: list[str] = []
    pos = 0
    try:
        while (tok := _next_token(text, pos)) is not None:
            words.append(tok.value)
            pos = tok.end
    except _ArgError as exc:
        return CommandError(str(exc))
    return words


Specs = Iterable[CommandSpec] | Mapping[str, CommandSpec]


def _specs_by_name(specs: Specs) -> dict[str, CommandSpec]:
    items = specs.values() if isinstance(specs, Mapping) else specs
    table: dict[str, CommandSpec] = {}
    for spec in items:
        for name in (spec.name, *spec.aliases):
            table.setdefault(name, spec)
    return table


def parse(
    body: str,
    specs: Specs,
    prefix: str = "!",
) -> ParsedCommand | CommandError | None:
    """Parse ``body``; ``None`` when it is not a command at all. Never raises on input."""
    if not isinstance(body, str) or not prefix:
        return None
    text = strip_reply_fallback(body).lstrip()
    if not text.startswith(prefix):
        return None
    match = _NAME_RE.match(text, len(prefix))
    if match is None or (match.end() < len(text) and not text[match.end()].isspace()):
        return None
    typed = match.group(0)
    table = _specs_by_name(specs)
    spec = table.get(typed.lower())
    if spec is None:
        return _unknown(typed, table, prefix)
    usage = f"Usage: {prefix}{spec.usage}"
    if len(body) > MAX_BODY_CHARS:
        return CommandError("That command is too long.", usage, spec.name)
    try:
        return _parse_args(spec, text[match.end() :], typed.lower())
    except _ArgError as exc:
        return CommandError(f"{prefix}{spec.name}: {exc}.", usage, spec.name)


def _unknown(typed: str, table: Mapping[str, CommandSpec], prefix: str) -> CommandError:
    message = f"Unknown command {prefix}{_show(typed)}."
    if len(typed) <= 64:
        close = difflib.get_close_matches(typed.lower(), list(table), n=1, cutoff=0.6)
        if close:
            message += f" Did you mean {prefix}{close[0]}?"
    return CommandError(f"{message} Send {prefix}help for the list.")


def _parse_args(spec: CommandSpec, text: str, typed: str) -> ParsedCommand:
    flags: dict[str, Value] = {}
    params: dict[str, Value] = {}
    positionals: list[str] = []
    wanted = len(spec.args) + len(spec.optional_args)
    pos = 0
    options_done = False

    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        looks_like_flag = not options_done and text.startswith("--", pos)
        in_rest = spec.rest is not None and len(positionals) >= wanted
        if in_rest and not (looks_like_flag and _declared_flag_at(spec, text, pos)):
            # The free text starts here and is kept verbatim, never tokenized; an
            # undeclared "--- see above" or "--verbose please" is text, not an error.
            break
        tok = _next_token(text, pos)
        assert tok is not None
        pos = tok.end
        if looks_like_flag and tok.plain:
            if tok.value == "--":
                options_done = True
                continue
            pos = _read_flag(spec, text, tok, flags, params)
            continue
        if not options_done and tok.plain:
            param = _PARAM_RE.fullmatch(tok.value)
            if param is not None:
                option = spec.param(param.group(1))
                if option is not None:
                    params[option.name] = option.convert(param.group(2))
                    continue
                if spec.params and spec.rest is None:
                    known = ", ".join(p.name for p in spec.params)
                    raise _ArgError(f"unknown parameter '{_show(param.group(1))}' ({known})")
        if len(positionals) >= wanted:
            raise _ArgError(f"too many arguments ('{_show(tok.value)}')")
        positionals.append(tok.value)

    if len(positionals) < len(spec.args):
        raise _ArgError(f"missing <{spec.args[len(positionals)]}>")
    rest: str | None = None
    if spec.rest is not None:
        rest = _split_rest(spec, text[pos:], params)
        if spec.rest_required and not rest:
            raise _ArgError(f"missing <{spec.rest}>")
    names = spec.args + spec.optional_args
    action: ActionSpec | None = None
    if spec.actions:
        known = ", ".join(a.name for a in spec.actions)
        if not positionals:
            raise _ArgError(f"say what to do: {known}")
        action = spec.action(positionals[0])
        if action is None:
            raise _ArgError(f"unknown action '{_show(positionals[0])}' ({known})")
        positionals[0] = action.name
    return ParsedCommand(
        name=spec.name,
        spec=spec,
        args=dict(zip(names, positionals, strict=False)),
        rest=rest,
        flags=flags,
        params=params,
        invoked_as=typed,
        action=action,
    )


def _declared_flag_at(spec: CommandSpec, text: str, pos: int) -> bool:
    """Whether the plain word at ``pos`` is ``--`` or names a declared flag/param."""
    end = pos
    while end < len(text) and not text[end].isspace():
        end += 1
    word = text[pos:end]
    if any(c in word for c in "'\"\\"):
        return False
    return word == "--" or spec.flag(word[2:].partition("=")[0]) is not None


def _read_flag(
    spec: CommandSpec,
    text: str,
    tok: _Token,
    flags: dict[str, Value],
    params: dict[str, Value],
) -> int:
    """Store one ``--flag[=value]`` (reading the value token if needed); return new pos."""
    name, eq, inline = tok.value[2:].partition("=")
    found = spec.flag(name)
    if found is None:
        known = ", ".join(f"--{f.name}" for f in spec.flags) or "none"
        raise _ArgError(f"unknown option --{_show(name)} (options: {known})")
    option, is_param = found
    pos = tok.end
    if eq:
        raw = inline
    elif option.kind == "bool":
        raw = "yes"
    else:
        value_tok = _next_token(text, pos)
        if value_tok is None:
            raise _ArgError(f"--{option.name} needs a value")
        raw, pos = value_tok.value, value_tok.end
    (params if is_param else flags)[option.name] = option.convert(raw)
    return pos


def _split_rest(spec: CommandSpec, rest: str, params: dict[str, Value]) -> str:
    """Take trailing declared ``key=value`` words off the free text (last one wins)."""
    end = len(rest)
    trailing: dict[str, Value] = {}
    while True:
        stop = end
        while stop > 0 and rest[stop - 1].isspace():
            stop -= 1
        start = stop
        while start > 0 and not rest[start - 1].isspace():
            start -= 1
        if start == stop:
            break
        match = _PARAM_RE.fullmatch(rest, start, stop)
        option = spec.param(match.group(1)) if match else None
        if match is None or option is None:
            break
        raw = match.group(2)
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]
        if option.name not in trailing:
            trailing[option.name] = option.convert(raw)
        end = start
    params.update(trailing)  # trailing params win over the same option given earlier
    free = rest[:end].strip()
    if free[:1] in ("'", '"'):
        try:
            only = _next_token(free, 0)
        except _ArgError:
            return free
        if only is not None and only.end == len(free):
            return only.value
    return free


def format_help(
    specs: Specs,
    prefix: str = "!",
    role: Role | None = None,
) -> str:
    """One line per command (or sub-action) the ``role`` may run (all when ``role`` is None)."""
    items = specs.values() if isinstance(specs, Mapping) else specs
    lines: list[str] = []
    for spec in items:
        entries = spec.actions or (spec,)
        lines.extend(
            f"{prefix}{entry.usage} — {entry.help}"
            for entry in entries
            if role is None or role_allows(role, entry.min_role)
        )
    return "\n".join(lines)


# --- persona names ---------------------------------------------------------------------------

_LOCALPART_RE = re.compile(r"[a-z0-9._=\-/]{1,32}")


@dataclass(frozen=True, slots=True)
class NameCheck:
    name: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def normalize_persona_name(raw: str) -> NameCheck:
    """Lowercase and validate a persona name as a Matrix user localpart.

    We lowercase (users type "Alice"; the mxid must be "alice") rather than reject, but only
    ASCII input: lowercasing e.g. the Kelvin sign "K" would yield a look-alike "k".
    Allowed after lowercasing: ``a-z 0-9 . _ = - /``, 1–32 characters.
    """
    if not isinstance(raw, str):
        return NameCheck(None, "A persona name must be text.")
    name = raw.strip()
    if not name:
        return NameCheck(None, "A persona name cannot be empty.")
    if not name.isascii():
        return NameCheck(None, "Persona names may use only a-z, 0-9 and . _ = - /")
    name = name.lower()
    if len(name) > 32:
        return NameCheck(None, "Persona names are at most 32 characters.")
    if not _LOCALPART_RE.fullmatch(name):
        return NameCheck(None, "Persona names may use only a-z, 0-9 and . _ = - /")
    return NameCheck(name)
