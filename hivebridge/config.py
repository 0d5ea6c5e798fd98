"""Configuration: explicit config classes read from YAML, secrets from the environment.

Every section is a small dataclass with a docstring, in the manner of Synapse's
config classes. :func:`load_config` reads YAML with ruamel (so comments in the
operator's file survive a round trip when we write it back) and reports the
first bad key as a :class:`ConfigError` naming the dotted key, which the CLI
prints as one line and exits 2.
"""

from __future__ import annotations

import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

T = TypeVar("T")

#: Environment variables that override a config key, so secrets need not sit in files.
ENV_OVERRIDES: dict[str, str] = {
    "HIVEBRIDGE_AS_TOKEN": "appservice.as_token",
    "HIVEBRIDGE_HS_TOKEN": "appservice.hs_token",
    "HIVEBRIDGE_DATABASE_URL": "database.url",
    "HIVEBRIDGE_HOMESERVER_ADDRESS": "homeserver.address",
    "HIVEBRIDGE_ADMIN_TOKEN": "admin_api.token",
    "HIVEBRIDGE_SESSION_SALT": "inference.session_salt",
    "HIVEBRIDGE_PICKLE_KEY": "encryption.pickle_key",
}

_LOCALPART_RE = re.compile(r"^[a-z0-9._=/+-]+$")


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class HomeserverConfig:
    """Where the homeserver is and which server name its users carry."""

    #: Client-server API base URL the bridge calls (e.g. http://127.0.0.1:8008).
    address: str
    #: The server name in user IDs (the part after the colon).
    domain: str

    def validate(self) -> None:
        if not re.match(r"^https?://", self.address):
            raise ConfigError("homeserver.address", "must start with http:// or https://")
        if not self.domain or "/" in self.domain or " " in self.domain:
            raise ConfigError("homeserver.domain", "must be a server name like example.org")


@dataclass(frozen=True)
class AppserviceConfig:
    """How the homeserver reaches us and which users we own."""

    #: URL the homeserver uses to push transactions to us (goes into the registration).
    address: str = "http://127.0.0.1:29333"
    #: Interface to bind; 127.0.0.1 unless the homeserver runs elsewhere.
    hostname: str = "127.0.0.1"
    port: int = 29333
    #: Appservice ID in the registration; unique per homeserver.
    id: str = "hivebridge"
    #: Localpart of the bot user that takes commands.
    bot_localpart: str = "hive_bot"
    bot_displayname: str = "Hive"
    #: Every persona's localpart starts with this, so the namespace is exclusive.
    user_prefix: str = "hive_"
    #: Tokens; normally read from the registration file, or HIVEBRIDGE_AS_TOKEN/HS_TOKEN.
    as_token: str | None = None
    hs_token: str | None = None
    #: Largest transaction body taken. Synapse sends up to 100 events of up to 64 KiB,
    #: escaped, in one transaction and retries a refused one forever, holding back every
    #: later event: keep it at the default unless the homeserver's limits differ.
    max_transaction_size: str = "32MiB"

    @property
    def max_transaction_bytes(self) -> int:
        return parse_size(self.max_transaction_size)

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError("appservice.port", "must be between 1 and 65535")
        try:
            size = parse_size(self.max_transaction_size)
        except ValueError:
            raise ConfigError(
                "appservice.max_transaction_size", "must be a size such as 32MiB"
            ) from None
        if size < 8 * 2**20:
            raise ConfigError(
                "appservice.max_transaction_size",
                "must be at least 8MiB (100 events of 64 KiB: a smaller limit would "
                "block the homeserver's queue)",
            )
        if not _LOCALPART_RE.match(self.bot_localpart):
            raise ConfigError("appservice.bot_localpart", "not a valid Matrix localpart")
        if not _LOCALPART_RE.match(self.user_prefix):
            raise ConfigError("appservice.user_prefix", "not a valid localpart prefix")
        if not re.match(r"^https?://", self.address):
            raise ConfigError("appservice.address", "must start with http:// or https://")


@dataclass(frozen=True)
class DatabaseConfig:
    """State storage. SQLite is the embedded default; PostgreSQL for production."""

    #: ``sqlite:hivebridge.db`` (relative to data_dir), ``sqlite:/abs/path.db`` or
    #: ``postgres://user:pass@host/db``.
    url: str = "sqlite:hivebridge.db"

    def validate(self) -> None:
        if not self.url.startswith(("sqlite:", "postgres://", "postgresql://")):
            raise ConfigError(
                "database.url", "must start with sqlite:, postgres:// or postgresql://"
            )


@dataclass(frozen=True)
class PermissionsConfig:
    """Who may do what. Patterns are full user IDs, ``*:server`` or ``*``."""

    #: Owners may do everything, including managing trust.
    owners: tuple[str, ...] = ()
    #: Trusted users may manage personas, endpoints and aliases.
    trusted: tuple[str, ...] = ()
    #: Who may invite the bot or a persona into a room; others are refused.
    invite_allowlist: tuple[str, ...] = ()

    def validate(self) -> None:
        for name in ("owners", "trusted", "invite_allowlist"):
            for pattern in getattr(self, name):
                if not (pattern == "*" or re.match(r"^(@[^:\s]+|\*):[^\s]+$", pattern)):
                    raise ConfigError(
                        f"permissions.{name}", f"{pattern!r} is not @user:server, *:server or *"
                    )


@dataclass(frozen=True)
class PersonaConfig:
    """A persona that exists at start."""

    #: Appended to the user prefix: ``assistant`` becomes @hive_assistant:domain.
    name: str = "assistant"
    displayname: str = "Assistant"
    system_prompt: str = "You are a helpful assistant in a Matrix chat. Answer briefly."
    #: Model name, id or alias; empty means inference.default_model.
    model: str | None = None

    def validate(self) -> None:
        if not _LOCALPART_RE.match(self.name) or len(self.name) > 32:
            raise ConfigError(
                "default_persona.name", "use 1-32 of a-z 0-9 . _ = - / (Matrix localpart rules)"
            )


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str) -> int:
    """Bytes of ``512MiB``, ``6 GiB``, ``2GB`` or a plain number of bytes; ValueError else."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(text)
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit else 0
    return int(number * (base**power if unit != "B" else 1))


@dataclass(frozen=True)
class LocalModelConfig:
    """A local model by name, with engine settings of its own (unset keys: the defaults)."""

    name: str
    #: The GGUF file.
    path: str
    n_ctx: int | None = None
    n_seq_max: int | None = None
    kv_unified: bool | None = None
    threads: int | None = None
    #: Layers offloaded to a GPU (-1 all); a CPU-only llama.cpp build offloads none.
    n_gpu_layers: int | None = None

    def validate(self, where: str) -> None:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", self.name):
            raise ConfigError(
                f"{where}.name", "use 1-64 of A-Z a-z 0-9 _ . : - (not starting with one)"
            )
        if not Path(self.path).is_file():
            raise ConfigError(f"{where}.path", f"no such file: {self.path}")
        if self.n_ctx is not None and self.n_ctx < 256:
            raise ConfigError(f"{where}.n_ctx", "must be at least 256")


@dataclass(frozen=True)
class LocalInferenceConfig:
    """The in-process llama.cpp engines: which models, their settings, their memory."""

    #: The default local model (the fallback); empty means the bundled SmolLM2-135M-Instruct.
    model_path: str | None = None
    #: A directory scanned for ``*.gguf`` files (at start and by !reload_models); each
    #: file is a model named after it, loaded on first use.
    models_dir: str | None = None
    #: Models by name with settings of their own (paths anywhere).
    models: tuple[LocalModelConfig, ...] = ()
    #: Memory for loaded models, weights plus KV pools ("6GiB", "512MiB"); loading past
    #: it unloads the least recently used idle model first. Empty: no limit.
    memory_budget: str | None = None
    #: Seconds a model's running replies get to finish when it is unloaded (!unload,
    #: or to make room); then they are cancelled.
    unload_grace_s: float = 10.0
    #: Seconds a load that needs room waits for a busy model (one with a reply running)
    #: to go idle before it is refused: swaps queue behind replies instead of failing.
    busy_wait_s: float = 30.0
    #: Total KV cache in tokens. Partitioned (the default): each of the n_seq_max
    #: sequences gets n_ctx / n_seq_max of it, the most one room's prompt + reply
    #: can use. Unified: one pool shared by all sequences.
    n_ctx: int = 16384
    #: Sequences (running rooms, idle rooms, pinned persona prefixes) resident at
    #: once; rooms beyond it wait in RAM snapshots and come back in milliseconds.
    n_seq_max: int = 8
    #: One KV pool for all sequences (free forks, but every token attends over the
    #: whole pool: batched decode of long rooms gets slower, docs/engine.md).
    kv_unified: bool = False
    #: llama.cpp's fused attention: 5-8 % faster decode, but greedy output may then differ
    #: from a cache-less evaluation at a near-tie; false (the default) keeps the exact,
    #: batch-invariant engine (docs/engine.md).
    flash_attn: bool = False
    #: Decode threads; 0 means one per usable core, never more.
    threads: int = 0
    #: Layers offloaded to a GPU (-1 all) for models without their own setting.
    n_gpu_layers: int = 0

    @property
    def memory_budget_bytes(self) -> int | None:
        return parse_size(self.memory_budget) if self.memory_budget else None

    def validate(self) -> None:
        if self.model_path is not None and not Path(self.model_path).is_file():
            raise ConfigError("inference.local.model_path", f"no such file: {self.model_path}")
        if self.models_dir is not None and not Path(self.models_dir).expanduser().is_dir():
            raise ConfigError("inference.local.models_dir", f"no such directory: {self.models_dir}")
        seen: set[str] = set()
        for i, model in enumerate(self.models):
            model.validate(f"inference.local.models[{i}]")
            if model.name in seen:
                raise ConfigError(
                    f"inference.local.models[{i}].name", f"{model.name!r} is used twice"
                )
            seen.add(model.name)
        if self.memory_budget:
            try:
                if parse_size(self.memory_budget) <= 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    "inference.local.memory_budget", "must be a size such as 6GiB or 512MiB"
                ) from None
        if self.unload_grace_s < 0:
            raise ConfigError("inference.local.unload_grace_s", "must not be negative")
        if self.busy_wait_s < 0:
            raise ConfigError("inference.local.busy_wait_s", "must not be negative")
        if self.n_ctx < 256:
            raise ConfigError("inference.local.n_ctx", "must be at least 256")
        if not 1 <= self.n_seq_max <= 256:
            raise ConfigError("inference.local.n_seq_max", "must be between 1 and 256")
        if not self.kv_unified and self.n_ctx // self.n_seq_max < 256:
            raise ConfigError(
                "inference.local.n_ctx",
                f"must give each of the {self.n_seq_max} sequences at least 256 tokens "
                f"(n_ctx >= {256 * self.n_seq_max}), or set kv_unified: true",
            )
        if self.threads < 0:
            raise ConfigError("inference.local.threads", "must be 0 (auto) or more")


_PROFILE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


@dataclass(frozen=True)
class ProfileConfig:
    """A worker profile: how a persona on it samples, how much history it sees, and
    (optionally) an engine of its own for the model (a longer context, more threads)."""

    name: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None
    #: Tokens of conversation history in a prompt (inference.context_tokens if unset).
    context_tokens: int | None = None
    #: Engine settings: a profile that sets any of these runs its own engine of the model.
    n_ctx: int | None = None
    threads: int | None = None
    n_gpu_layers: int | None = None

    def validate(self, where: str) -> None:
        if not _PROFILE_NAME_RE.match(self.name):
            raise ConfigError(f"{where}.name", "use 1-32 of a-z 0-9 _ . - (starting a-z 0-9)")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"{where}.temperature", "must be between 0 and 2")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}.top_p", "must be in (0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"{where}.max_tokens", "must be at least 1")
        if self.context_tokens is not None and self.context_tokens < 64:
            raise ConfigError(f"{where}.context_tokens", "must be at least 64")
        if self.n_ctx is not None and self.n_ctx < 256:
            raise ConfigError(f"{where}.n_ctx", "must be at least 256")


@dataclass(frozen=True)
class InferenceConfig:
    """Model choice and default sampling."""

    #: Model used by personas that name none; empty means the local default model.
    default_model: str | None = None
    max_tokens: int = 256
    #: Upper bound a user may ask for with max_tokens=N.
    max_tokens_limit: int = 1024
    temperature: float = 0.7
    top_p: float = 0.95
    #: Tokens of conversation history put into a prompt.
    context_tokens: int = 1536
    #: Local model that answers when no endpoint can; empty means the default local model.
    fallback_model: str | None = None
    local: LocalInferenceConfig = field(default_factory=LocalInferenceConfig)
    #: Worker profiles personas can be put on (!persona set X profile NAME).
    profiles: tuple[ProfileConfig, ...] = ()
    #: How requests spread over endpoints serving a model: sticky (a room stays on its
    #: endpoint, rendezvous hashing picks it; the default) or round_robin (comparison only).
    endpoint_routing: str = "sticky"
    #: Secret key of the session ids sent to endpoints; empty: a random one kept in
    #: data_dir/session-salt (ids stay stable across restarts either way).
    session_salt: str | None = field(default=None, repr=False)
    #: Seconds one remote request may take in all, however slowly its chunks arrive.
    remote_deadline_s: float = 300.0
    #: Seconds an endpoint gets to list its models (discovery runs in the background).
    discovery_deadline_s: float = 15.0

    def profile(self, name: str | None) -> ProfileConfig | None:
        return next((p for p in self.profiles if p.name == name), None) if name else None

    def validate(self) -> None:
        if not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise ConfigError("inference.max_tokens", "must be between 1 and max_tokens_limit")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError("inference.temperature", "must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("inference.top_p", "must be in (0, 1]")
        if self.context_tokens < 64:
            raise ConfigError("inference.context_tokens", "must be at least 64")
        if not 1 <= self.remote_deadline_s <= 3600:
            raise ConfigError("inference.remote_deadline_s", "must be between 1 and 3600")
        if not 1 <= self.discovery_deadline_s <= 600:
            raise ConfigError("inference.discovery_deadline_s", "must be between 1 and 600")
        self.local.validate()
        if self.endpoint_routing not in ("sticky", "round_robin"):
            raise ConfigError("inference.endpoint_routing", "must be sticky or round_robin")
        if self.session_salt is not None and len(self.session_salt) < 16:
            raise ConfigError("inference.session_salt", "use at least 16 characters")
        seen: set[str] = set()
        for i, profile in enumerate(self.profiles):
            profile.validate(f"inference.profiles[{i}]")
            if profile.name in seen:
                raise ConfigError(
                    f"inference.profiles[{i}].name", f"{profile.name!r} is used twice"
                )
            seen.add(profile.name)


_ENDPOINT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class AffinityConfig:
    """Where an endpoint's router reads the conversation's session id (an opaque hash of
    room + persona): vLLM production-stack reads the header its ``--session-key`` names,
    llm-d ``x-session-token``, LiteLLM-style routers the ``user`` field, llama-server
    pins a slot with ``id_slot``. ``none`` sends nothing."""

    #: header, user, id_slot or none.
    kind: str = "header"
    #: The header for kind header.
    header: str = "x-session-id"
    #: llama-server's slot count (-np) for kind id_slot; 0 reads it from /props.
    slots: int = 0

    def validate(self, where: str) -> None:
        if self.kind not in ("header", "user", "id_slot", "none"):
            raise ConfigError(f"{where}.kind", "must be header, user, id_slot or none")
        if not re.match(r"^[A-Za-z0-9-]{1,64}$", self.header):
            raise ConfigError(f"{where}.header", "not an HTTP header name")
        if self.slots < 0:
            raise ConfigError(f"{where}.slots", "must be 0 (read /props) or more")


@dataclass(frozen=True)
class EndpointConfig:
    """A remote OpenAI-compatible endpoint known at start (not stored in the database)."""

    #: Short name used in !endpoints and failover notes: a-z 0-9 _ . - (1-32).
    name: str
    #: Base URL of the OpenAI API, e.g. http://gpu1:8000/v1.
    url: str
    #: API key; better kept out of the file with api_key_env.
    api_key: str | None = field(default=None, repr=False)
    #: Name of an environment variable holding the API key (wins over api_key).
    api_key_env: str | None = None
    #: Replicas of one server share a pool name: their models are ``<pool>/<model>``,
    #: routed over them (a room stays on one replica and moves only when that replica
    #: fails). Unset, the endpoint's models are ``<name>/<model>``.
    pool: str | None = None
    #: The session-id hint this endpoint's router reads (default: header x-session-id).
    affinity: AffinityConfig = field(default_factory=AffinityConfig)

    def validate(self, where: str = "endpoints") -> None:
        if not _ENDPOINT_NAME_RE.match(self.name):
            raise ConfigError(f"{where}.name", "use 1-32 of a-z 0-9 _ . - (starting a-z 0-9)")
        if self.pool is not None and not _ENDPOINT_NAME_RE.match(self.pool):
            raise ConfigError(f"{where}.pool", "use 1-32 of a-z 0-9 _ . - (starting a-z 0-9)")
        self.affinity.validate(f"{where}.affinity")
        if not re.match(r"^https?://[^\s/]+", self.url):
            raise ConfigError(f"{where}.url", "must start with http:// or https://")
        if self.api_key_env is not None and not _ENV_NAME_RE.match(self.api_key_env):
            raise ConfigError(f"{where}.api_key_env", "not an environment variable name")

    def resolved_key(self, env: typing.Mapping[str, str] | None = None) -> str | None:
        """The key to send: from ``api_key_env`` when that variable is set, else ``api_key``."""
        env = os.environ if env is None else env
        if self.api_key_env and env.get(self.api_key_env):
            return env[self.api_key_env]
        return self.api_key


@dataclass(frozen=True)
class LimitOverride:
    """Limits of one user, room or persona, over the defaults of ``limits``.

    Exactly one of ``user`` (a user id), ``room`` (a room id) or ``persona`` (a
    persona name) says whom it is for; unset values keep the defaults.
    ``requests_per_minute``/``burst`` is the request rate of each user: that user
    (``user``), each user in that room (``room``), or each user asking that persona
    (``persona``); the first that matches wins in that order. ``tokens_per_day``
    is the daily budget of that user, that room or that persona.
    """

    user: str | None = None
    room: str | None = None
    persona: str | None = None
    #: 0 turns the request limit off for whom this matches.
    requests_per_minute: float | None = None
    burst: int | None = None
    #: 0 means unlimited for whom this matches.
    tokens_per_day: int | None = None

    @property
    def scope(self) -> str:
        return "user" if self.user else "room" if self.room else "persona"

    @property
    def key(self) -> str:
        return self.user or self.room or self.persona or ""

    def validate(self, where: str) -> None:
        set_ = [k for k in ("user", "room", "persona") if getattr(self, k)]
        if len(set_) != 1:
            raise ConfigError(where, "needs exactly one of user, room or persona")
        if self.user and not re.match(r"^@[^:\s]+:[^\s]+$", self.user):
            raise ConfigError(f"{where}.user", f"{self.user!r} is not a user id (@user:server)")
        if self.room and not re.match(r"^![^:\s]+:[^\s]+$", self.room):
            raise ConfigError(f"{where}.room", f"{self.room!r} is not a room id (!room:server)")
        if self.persona and not _LOCALPART_RE.match(self.persona):
            raise ConfigError(f"{where}.persona", f"{self.persona!r} is not a persona name")
        if self.requests_per_minute is not None and self.requests_per_minute < 0:
            raise ConfigError(f"{where}.requests_per_minute", "must be 0 (off) or more")
        if self.burst is not None and self.burst < 1:
            raise ConfigError(f"{where}.burst", "must be at least 1")
        if self.tokens_per_day is not None and self.tokens_per_day < 0:
            raise ConfigError(f"{where}.tokens_per_day", "must be 0 (unlimited) or more")


@dataclass(frozen=True)
class LimitsConfig:
    """Per-user request rates and daily token budgets, so one user cannot starve the rest."""

    #: Requests (persona replies and !ask) per user per minute; 0 turns the limit off.
    requests_per_minute: float = 10.0
    #: Requests a user may make in a quick burst; empty means requests_per_minute.
    burst: int | None = None
    #: Tokens (prompt + completion) per UTC day; empty or 0 means unlimited.
    user_tokens_per_day: int | None = None
    room_tokens_per_day: int | None = None
    persona_tokens_per_day: int | None = None
    #: Owners are never limited.
    exempt_owners: bool = True
    #: Other limits for some users, rooms or personas (see :class:`LimitOverride`).
    overrides: tuple[LimitOverride, ...] = ()

    def validate(self) -> None:
        if self.requests_per_minute < 0:
            raise ConfigError("limits.requests_per_minute", "must be 0 (off) or more")
        seen: set[tuple[str, str]] = set()
        for i, override in enumerate(self.overrides):
            override.validate(f"limits.overrides[{i}]")
            if (override.scope, override.key) in seen:
                raise ConfigError(
                    f"limits.overrides[{i}]", f"a second override for {override.key}"
                )
            seen.add((override.scope, override.key))
        if self.burst is not None and self.burst < 1:
            raise ConfigError("limits.burst", "must be at least 1")
        for name in ("user_tokens_per_day", "room_tokens_per_day", "persona_tokens_per_day"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"limits.{name}", "must be 0 (unlimited) or more")


@dataclass(frozen=True)
class RoutingConfig:
    """When personas speak: loop guard and hop limits."""

    #: Prefix of bot commands.
    command_prefix: str = "!"
    #: The same personas in the same repeating pattern this many times in a row
    #: (A→B five times: ten messages) are paused until someone else speaks (or the
    #: cooldown passes); the bot says so once.
    ping_pong_threshold: int = 5
    ping_pong_cooldown_s: float = 300.0
    #: Persona replies per room per minute, all personas together.
    max_persona_turns_per_minute: int = 20
    #: MSC4295 bounce limit put on persona messages; each persona-to-persona hop
    #: spends one. Above 2 × ping_pong_threshold, so a two-persona loop meets the
    #: pattern guard (and its notice) first; this catches chains without a pattern.
    bounce_limit: int = 16

    def validate(self) -> None:
        if len(self.command_prefix) != 1 or self.command_prefix.isalnum():
            raise ConfigError("routing.command_prefix", "must be one punctuation character")
        if self.ping_pong_threshold < 2:
            raise ConfigError("routing.ping_pong_threshold", "must be at least 2")
        if self.ping_pong_cooldown_s < 0:
            raise ConfigError("routing.ping_pong_cooldown_s", "must not be negative")
        if self.max_persona_turns_per_minute < 1:
            raise ConfigError("routing.max_persona_turns_per_minute", "must be at least 1")
        if self.bounce_limit < 1:
            raise ConfigError("routing.bounce_limit", "must be at least 1")


@dataclass(frozen=True)
class RepliesConfig:
    """How replies appear in the room."""

    #: Show the reply as it is generated: one message, edited in place.
    streaming: bool = True
    #: At most one edit per this many seconds ...
    edit_interval_s: float = 1.5
    #: ... and at most this many edits per message (then one final edit).
    max_edits: int = 20
    #: Show <think>…</think> reasoning (as a quote) instead of hiding it.
    show_thinking: bool = False
    #: After a restart (or a homeserver that redelivers late), messages and pending
    #: replies at most this old are answered; older ones stay stored, unanswered.
    resume_max_age_s: float = 900.0
    #: On SIGTERM or SIGINT, replies being written get this many seconds to finish;
    #: the rest are cut and resumed at the next start (a second signal cuts at once).
    shutdown_grace_s: float = 10.0

    def validate(self) -> None:
        if self.resume_max_age_s < 0:
            raise ConfigError("replies.resume_max_age_s", "must not be negative")
        if self.shutdown_grace_s < 0:
            raise ConfigError("replies.shutdown_grace_s", "must not be negative")
        if self.edit_interval_s < 0.1:
            raise ConfigError("replies.edit_interval_s", "must be at least 0.1")
        if self.max_edits < 0:
            raise ConfigError("replies.max_edits", "must not be negative")


@dataclass(frozen=True)
class SummariesConfig:
    """Chapter summaries: history that outgrew the prompt, folded into a summary.

    The persona's own model writes it in the background after a reply, so a
    long conversation keeps its early facts in a few tokens of the system
    block. The summary changes that block only when a new chapter is written,
    which keeps the local engine's KV prefix warm in between.
    """

    enabled: bool = True
    #: Summarize once this many turns have fallen out of the prompt window;
    #: fewer means more frequent summaries (each one a full prefill).
    min_dropped_turns: int = 8
    #: Longest summary, in tokens (the completion limit of a summary request).
    max_tokens: int = 192
    #: Transcript tokens one summary request may hold (previous summary and
    #: instruction included); 0 means inference.context_tokens. Turns beyond
    #: it wait for the next chapter.
    input_tokens: int = 0

    def validate(self) -> None:
        if self.min_dropped_turns < 1:
            raise ConfigError("summaries.min_dropped_turns", "must be at least 1")
        if self.max_tokens < 16:
            raise ConfigError("summaries.max_tokens", "must be at least 16")
        if self.input_tokens != 0 and self.input_tokens < 64:
            raise ConfigError("summaries.input_tokens", "must be 0 (auto) or at least 64")


@dataclass(frozen=True)
class ScenesConfig:
    """Scenes: personas taking turns on purpose (``!scene start``), within a budget."""

    #: Turns of a scene started without ``turns=N``.
    default_turns: int = 6
    #: The most turns one scene may ask for.
    max_turns: int = 20
    #: The most personas in one scene.
    max_personas: int = 6

    def validate(self) -> None:
        if not 1 <= self.max_turns <= 200:
            raise ConfigError("scenes.max_turns", "must be between 1 and 200")
        if not 1 <= self.default_turns <= self.max_turns:
            raise ConfigError("scenes.default_turns", "must be between 1 and scenes.max_turns")
        if not 2 <= self.max_personas <= 12:
            raise ConfigError("scenes.max_personas", "must be between 2 and 12")


@dataclass(frozen=True)
class WeatherToolConfig:
    """The weather service get_weather asks: ``GET {base_url}/{place}?format={format}``,
    one line of text back (wttr.in's format= API)."""

    base_url: str = "https://wttr.in"
    #: wttr.in's format codes: %l place, %C condition, %t temperature, %w wind, %h humidity.
    format: str = "%l: %C, %t, wind %w, humidity %h"
    timeout_s: float = 8.0

    def validate(self) -> None:
        if not re.match(r"^https?://[^\s/]+", self.base_url):
            raise ConfigError("tools.weather.base_url", "must start with http:// or https://")
        if not self.format.strip():
            raise ConfigError("tools.weather.format", "must not be empty")
        if not 0 < self.timeout_s <= 120:
            raise ConfigError("tools.weather.timeout_s", "must be in (0, 120]")


@dataclass(frozen=True)
class ToolsConfig:
    """Tools personas may call (docs/tools.md): which by default, and the limits."""

    #: Tools of a persona without a list of its own (!persona set NAME tools …).
    #: Built in: current_time, get_weather, roll_dice, room_history_search.
    default: tuple[str, ...] = ()
    #: Tool rounds per reply; after that the persona must answer with what it has.
    max_hops: int = 3
    #: Seconds one call may take (a tool may set its own).
    timeout_s: float = 10.0
    #: Seconds a tool with side effects waits for a trusted user's approval.
    approval_timeout_s: float = 120.0
    #: A longer result is cut before the model sees it.
    max_result_chars: int = 1500
    weather: WeatherToolConfig = field(default_factory=WeatherToolConfig)

    def validate(self) -> None:
        if not 0 <= self.max_hops <= 10:
            raise ConfigError("tools.max_hops", "must be between 0 and 10")
        if not 0 < self.timeout_s <= 300:
            raise ConfigError("tools.timeout_s", "must be in (0, 300]")
        if not 1 <= self.approval_timeout_s <= 3600:
            raise ConfigError("tools.approval_timeout_s", "must be between 1 and 3600")
        if not 100 <= self.max_result_chars <= 20000:
            raise ConfigError("tools.max_result_chars", "must be between 100 and 20000")
        self.weather.validate()


@dataclass(frozen=True)
class EncryptionConfig:
    """End-to-end encryption: personas read and answer in encrypted rooms.

    Each persona (and the bot) gets a Matrix device of its own, created through
    the appservice (MSC4190) and cross-signed by the persona itself; its Olm and
    Megolm keys live in the bridge's database, pickled with ``pickle_key``. The
    homeserver must send to-device events and device lists to the appservice
    (docs/operations.md, "Encrypted rooms"). Off: encrypted rooms get a notice
    that the persona cannot read them.
    """

    enabled: bool = False
    #: Encrypts the keys at rest (or HIVEBRIDGE_PICKLE_KEY). Required when enabled;
    #: changing it later makes the stored keys unreadable (new devices, lost sessions).
    pickle_key: str | None = field(default=None, repr=False)
    #: Cross-sign each device with its persona's own keys, so clients that share room
    #: keys only with cross-signed devices include the personas.
    self_sign: bool = True
    #: Seconds a message whose room key has not arrived waits for it; then the persona
    #: says in the room that it could not read it.
    key_wait_s: float = 30.0
    #: The display name of the personas' devices (what a user sees in a device list).
    device_name: str = "hivebridge"

    def validate(self) -> None:
        if self.enabled and not self.pickle_key:
            raise ConfigError(
                "encryption.pickle_key",
                "required when encryption is enabled (or HIVEBRIDGE_PICKLE_KEY)",
            )
        if self.pickle_key is not None and self.enabled and len(self.pickle_key) < 16:
            raise ConfigError("encryption.pickle_key", "use at least 16 characters")
        if not 0 < self.key_wait_s <= 3600:
            raise ConfigError("encryption.key_wait_s", "must be in (0, 3600]")
        if not self.device_name.strip():
            raise ConfigError("encryption.device_name", "must not be empty")


@dataclass(frozen=True)
class SecurityConfig:
    """What users of the bridge may point it at (docs/operations.md, "Security model")."""

    #: ``!add_endpoint … env:VAR`` may name variables starting with this prefix (empty:
    #: none by prefix). The bridge's own secrets are never sent, whatever is allowed here.
    endpoint_key_env_prefix: str = "HIVEBRIDGE_ENDPOINT_KEY_"
    #: More variables ``env:VAR`` may name, exactly.
    endpoint_key_env: tuple[str, ...] = ()
    #: Hosts endpoint URLs may use although they are loopback, private or link-local:
    #: host names, addresses or networks (``10.0.0.0/8``). Others need ``--private``
    #: from an owner.
    private_endpoint_hosts: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.endpoint_key_env_prefix and not _ENV_NAME_RE.match(self.endpoint_key_env_prefix):
            raise ConfigError(
                "security.endpoint_key_env_prefix", "not the start of a variable name"
            )
        for name in self.endpoint_key_env:
            if not _ENV_NAME_RE.match(name):
                raise ConfigError(
                    "security.endpoint_key_env", f"{name!r} is not an environment variable name"
                )
            if name in ENV_OVERRIDES:
                raise ConfigError("security.endpoint_key_env", f"{name} is a secret of the bridge")
        for host in self.private_endpoint_hosts:
            if not host or any(c.isspace() or c in "/@" for c in host.split("/", 1)[0]):
                raise ConfigError(
                    "security.private_endpoint_hosts", f"{host!r} is not a host or network"
                )


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus /metrics and the liveness probe."""

    enabled: bool = True
    hostname: str = "127.0.0.1"
    port: int = 29334

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError("metrics.port", "must be between 1 and 65535")


@dataclass(frozen=True)
class AdminApiConfig:
    """Health and admin HTTP API; its /api/v1 routes are off while no token is set."""

    #: Bearer token for /api/v1 (or HIVEBRIDGE_ADMIN_TOKEN).
    token: str | None = None
    hostname: str = "127.0.0.1"
    port: int = 29335

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError("admin_api.port", "must be between 1 and 65535")


@dataclass(frozen=True)
class ApiTokenConfig:
    """One client of the OpenAI-compatible API: a name (usage is counted per name), its
    bearer token, and its limits (0: none)."""

    name: str
    token: str | None = field(default=None, repr=False)
    #: Name of an environment variable holding the token (wins over token).
    token_env: str | None = None
    requests_per_minute: float = 0.0
    #: Requests of this token running at once.
    max_concurrent: int = 8
    #: Prompt + completion tokens per UTC day.
    tokens_per_day: int = 0

    def resolved(self, env: typing.Mapping[str, str] | None = None) -> str | None:
        env = os.environ if env is None else env
        if self.token_env and env.get(self.token_env):
            return env[self.token_env]
        return self.token

    def validate(self, where: str) -> None:
        if not _ENDPOINT_NAME_RE.match(self.name):
            raise ConfigError(f"{where}.name", "use 1-32 of a-z 0-9 _ . - (starting a-z 0-9)")
        if self.token_env is not None and not _ENV_NAME_RE.match(self.token_env):
            raise ConfigError(f"{where}.token_env", "not an environment variable name")
        if self.token_env is None and (self.token is None or len(self.token) < 16):
            raise ConfigError(f"{where}.token", "set one of at least 16 characters, or token_env")
        if self.requests_per_minute < 0 or self.max_concurrent < 0 or self.tokens_per_day < 0:
            raise ConfigError(where, "limits must be 0 (none) or more")


@dataclass(frozen=True)
class ApiConfig:
    """The OpenAI-compatible API on the local engine (docs/scale-out.md): /v1/models,
    /v1/chat/completions, /v1/completions. Off unless enabled with at least one token."""

    enabled: bool = False
    hostname: str = "127.0.0.1"
    port: int = 29336
    tokens: tuple[ApiTokenConfig, ...] = ()
    #: Scheduler priority of API requests; room replies run at 0, higher goes first.
    priority: int = -1
    #: Header naming a client's conversation (its KV sequence stays warm).
    session_header: str = "x-session-id"
    #: Largest max_tokens a request may ask for.
    max_tokens_limit: int = 2048
    #: Serve personas as models named persona:<name>.
    personas: bool = True

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError("api.port", "must be between 1 and 65535")
        if self.enabled and not self.tokens:
            raise ConfigError("api.tokens", "the API needs at least one token when enabled")
        seen: set[str] = set()
        for i, token in enumerate(self.tokens):
            token.validate(f"api.tokens[{i}]")
            if token.name in seen:
                raise ConfigError(f"api.tokens[{i}].name", f"{token.name!r} is used twice")
            seen.add(token.name)
        if not -100 <= self.priority <= 100:
            raise ConfigError("api.priority", "must be between -100 and 100")
        if not re.match(r"^[A-Za-z0-9-]{1,64}$", self.session_header):
            raise ConfigError("api.session_header", "not an HTTP header name")
        if self.max_tokens_limit < 1:
            raise ConfigError("api.max_tokens_limit", "must be at least 1")


@dataclass(frozen=True)
class LoggingConfig:
    """Log output of the bridge process."""

    #: DEBUG, INFO, WARNING or ERROR.
    level: str = "INFO"

    def validate(self) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("logging.level", "must be DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True)
class Config:
    """The whole bridge configuration."""

    homeserver: HomeserverConfig
    appservice: AppserviceConfig = field(default_factory=AppserviceConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    #: Where the SQLite database, snapshots and other state live.
    data_dir: str = "./data"
    permissions: PermissionsConfig = field(default_factory=PermissionsConfig)
    default_persona: PersonaConfig = field(default_factory=PersonaConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    #: Remote endpoints known at start; more are added with !add_endpoint.
    endpoints: tuple[EndpointConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    replies: RepliesConfig = field(default_factory=RepliesConfig)
    summaries: SummariesConfig = field(default_factory=SummariesConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    admin_api: AdminApiConfig = field(default_factory=AdminApiConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: Path the config was read from (not a YAML key).
    source: str | None = None

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value) and hasattr(value, "validate"):
                value.validate()
        seen: set[str] = set()
        for i, endpoint in enumerate(self.endpoints):
            endpoint.validate(f"endpoints[{i}]")
            if endpoint.name in seen:
                raise ConfigError(f"endpoints[{i}].name", f"{endpoint.name!r} is used twice")
            seen.add(endpoint.name)
        pools = {e.pool for e in self.endpoints if e.pool}
        for i, endpoint in enumerate(self.endpoints):
            if endpoint.pool is None and endpoint.name in pools:
                # Its models would be served under the pool's names too.
                raise ConfigError(
                    f"endpoints[{i}].name", f"{endpoint.name!r} is also the name of a pool"
                )

    # Derived values -----------------------------------------------------------

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    def make_data_dir(self) -> Path:
        """Create data_dir 0700: it holds the database, KV snapshots and logs of every room."""
        path = self.data_path
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    @property
    def bot_mxid(self) -> str:
        return f"@{self.appservice.bot_localpart}:{self.homeserver.domain}"

    def persona_mxid(self, name: str) -> str:
        return f"@{self.appservice.user_prefix}{name}:{self.homeserver.domain}"

    def database_url(self) -> str:
        """The database URL with a relative SQLite path resolved under data_dir."""
        url = self.database.url
        if url.startswith("sqlite:") and not url.startswith(("sqlite:/", "sqlite::memory:")):
            return f"sqlite:{(self.data_path / url.removeprefix('sqlite:')).resolve()}"
        return url


# Loading ----------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], env: typing.Mapping[str, str] | None = None
) -> Config:
    """Read, override from the environment, type-check and validate a config file."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError("(top level)", "the file must hold a mapping of sections")
    apply_env_overrides(data, os.environ if env is None else env)
    config = _build(Config, data, "")
    config = _with_source(config, str(path))
    config.validate()
    return config


def read_yaml(path: str | os.PathLike[str]) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return YAML(typ="rt").load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found") from None
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        raise ConfigError(str(path), f"not valid YAML ({where})") from None


def apply_env_overrides(data: dict[str, Any], env: typing.Mapping[str, str]) -> None:
    for var, dotted in ENV_OVERRIDES.items():
        if env.get(var):
            section, key = dotted.split(".")
            node = data.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(section, "must be a mapping")
            node[key] = env[var]


def _with_source(config: Config, source: str) -> Config:
    from dataclasses import replace

    return replace(config, source=source)


def _build(cls: type[T], data: Any, prefix: str) -> T:
    """Turn a YAML mapping into ``cls``, naming the dotted key of the first problem."""
    where = prefix.rstrip(".") or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, "must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in known or key == "source":
            raise ConfigError(f"{prefix}{key}", "unknown key")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name == "source":
            continue
        key = f"{prefix}{f.name}"
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], key)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(key, "missing (required)")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, "must not be empty")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if is_dataclass(hint):
        return _build(hint, value, f"{key}.")  # type: ignore[arg-type]
    if origin is tuple:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ConfigError(key, "must be a list")
        return tuple(_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, "must be true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(key, "must be a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(key, "must be a whole number")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(key, "must be a number")
        if isinstance(value, int | float):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, "must be a number") from None
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, "must be a string")
    raise ConfigError(key, f"unsupported type {hint!r}")  # pragma: no cover - programming error
