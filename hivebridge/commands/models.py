"""Models and endpoints: ``!ask``, ``!models``, ``!reload_models``, endpoints and aliases."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Collection
from urllib.parse import urlsplit, urlunsplit

from .. import metrics
from ..catalogue import ModelCatalogue, ModelEntry
from ..config import Config, EndpointConfig
from ..db.endpoints import EndpointStore, StoredEndpoint
from ..inference.affinity import Affinity
from ..inference.endpoints import EndpointConflict, EndpointInfo
from ..inference.router import InferenceRouter
from ..inference.types import ChatMessage, InferenceError, SamplingParams
from ..permissions import role_allows
from ..personas.limits import Limits
from ..security import EndpointPolicy, Refused, env_reference
from .base import CommandContext, CommandTable, UserError
from .parser import CommandSpec, OptionSpec, ParsedCommand

log = logging.getLogger("hivebridge.commands.models")

_ENDPOINT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_URL = re.compile(r"^https?://[^\s/@]+(:\d+)?(/\S*)?$")
#: Longest answer posted by !ask; the model's max_tokens bounds it anyway.
MAX_ANSWER_CHARS = 8000


def endpoint_affinity(config: EndpointConfig) -> Affinity:
    """A config endpoint's affinity hint, as the inference layer takes it."""
    a = config.affinity
    return Affinity(kind=a.kind, header=a.header, slots=a.slots)  # type: ignore[arg-type]


def safe_url(url: str) -> str:
    """The URL without user:password, for listings."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


class ModelCommands:
    def __init__(
        self,
        config: Config,
        catalogue: ModelCatalogue,
        router: InferenceRouter,
        endpoints: EndpointStore,
        limits: Limits,
        count_tokens: Callable[[str], int],
        policy: EndpointPolicy,
        *,
        config_endpoints: Collection[str] = (),
    ) -> None:
        self.config = config
        self.catalogue = catalogue
        self.router = router
        self.endpoints = endpoints
        self.limits = limits
        self.count_tokens = count_tokens
        self.policy = policy
        self.config_endpoints = set(config_endpoints)
        self._table: CommandTable | None = None

    def config_key(self, endpoint: EndpointConfig) -> str | None:
        """A config endpoint's key; the config may name any variable, but never one
        holding a secret of the bridge (then it gets no key, and a warning)."""
        key = endpoint.resolved_key()
        if key and self.policy.is_own_secret(key):
            log.warning(
                "endpoint %s: its key is a secret of the bridge; it is sent without one",
                endpoint.name,
            )
            return None
        return key

    async def _add_configured(
        self, endpoint: EndpointConfig, *, replace: bool = False, discover: bool = True
    ) -> EndpointInfo:
        """Hand a config endpoint to the router, the same way at start and on reload:
        its checked key, its affinity and its pool as the config gives them."""
        return await self.router.add_endpoint(
            endpoint.name,
            endpoint.url,
            self.config_key(endpoint),
            affinity=endpoint_affinity(endpoint),
            pool=endpoint.pool,
            replace=replace,
            discover=discover,
        )

    async def start_endpoints(self) -> None:
        """The config's and the stored endpoints, their models discovered later (in the
        background), so a stalled endpoint never holds up the start. A stored endpoint
        the security rules refuse now (its variable, its host) is left out, with a warning."""
        pools = {e.pool for e in self.config.endpoints if e.pool}
        for e in self.config.endpoints:
            await self._add_configured(e, discover=False)
        stored: list[StoredEndpoint] = []
        for row in await self.endpoints.all():
            if row.name in self.config_endpoints or row.name in pools:
                log.warning("stored endpoint %s: the config defines that name", row.name)
            else:
                stored.append(row)
        # Host names resolve at once for all (each within its own timeout).
        await asyncio.gather(*(self._start_stored(row) for row in stored))

    async def _start_stored(self, stored: StoredEndpoint) -> None:
        try:
            key = self.policy.resolve_key(stored.api_key)
            await self.policy.check_url(stored.url, allow_private=stored.private)
            await self.router.add_endpoint(stored.name, stored.url, key, discover=False)
        except (Refused, EndpointConflict) as e:
            log.warning("stored endpoint %s is not used: %s", stored.name, e)

    async def apply_config(self, config: Config) -> None:
        """A reloaded config's endpoints at once (added, changed, removed), its sampling
        limits and security rules from the next command. Endpoints added with
        !add_endpoint stay (the rules are checked again for them at the next start)."""
        old = {e.name: e for e in self.config.endpoints}
        new = {e.name: e for e in config.endpoints}
        self.config = config
        self.policy.config = config.security  # from the next !add_endpoint
        self.config_endpoints = set(new)
        if self._table is not None:
            self.register(self._table)  # !ask's max_tokens bound comes from the config
        gone = [name for name in old if name not in new]
        for name in gone:
            await self.router.remove_endpoint(name)
        changed = [
            e
            for name, e in new.items()
            if name not in old
            or (e.url, e.resolved_key(), e.pool, e.affinity)
            != (old[name].url, old[name].resolved_key(), old[name].pool, old[name].affinity)
        ]
        outcomes = await asyncio.gather(
            *(self._add_configured(e, replace=True) for e in changed),
            return_exceptions=True,
        )
        for e, outcome in zip(changed, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.warning("endpoint %s from the reloaded config not added: %s", e.name, outcome)
        if gone or changed:
            await self.catalogue.sync()

    def register(self, table: CommandTable) -> None:
        self._table = table
        limit = self.config.inference.max_tokens_limit
        table.add(
            CommandSpec(
                "ask",
                "ask <model> <prompt…> [max_tokens=N] [temp=F] [top_p=F]",
                "one question to a model (id, alias or name); the bot answers",
                args=("model",),
                rest="prompt",
                rest_required=True,
                params=(
                    OptionSpec("max_tokens", "int", 1, limit, help="completion length"),
                    OptionSpec("temp", "float", 0, 2, help="temperature"),
                    OptionSpec("top_p", "float", 0, 1, help="nucleus sampling"),
                ),
            ),
            self.ask,
        )
        table.add(
            CommandSpec("models", "models", "the model catalogue: ids, sources, aliases"),
            self.models,
        )
        table.add(
            CommandSpec(
                "reload_models",
                "reload_models",
                "rediscover local model files and endpoint models",
                "owner",
            ),
            self.reload_models,
        )
        table.add(
            CommandSpec(
                "add_endpoint",
                "add_endpoint <name> <url> [api_key|env:VAR] [--private]",
                "add an OpenAI-compatible endpoint (kept across restarts); its models are "
                "<name>/<model>; --private (owners) allows a private host",
                "trusted",
                args=("name", "url"),
                optional_args=("api_key",),
                flags=(OptionSpec("private", "bool", help="allow a private host (owners)"),),
            ),
            self.add_endpoint,
        )
        table.add(
            CommandSpec(
                "remove_endpoint",
                "remove_endpoint <name>",
                "remove an endpoint",
                "trusted",
                args=("name",),
            ),
            self.remove_endpoint,
        )
        table.add(
            CommandSpec("endpoints", "endpoints", "endpoints: health, latency, models"),
            self.list_endpoints,
        )
        table.add(
            CommandSpec(
                "alias",
                "alias <alias> <model_id>",
                "give a model a short name",
                "trusted",
                args=("alias", "model"),
            ),
            self.alias,
        )
        table.add(CommandSpec("aliases", "aliases", "list model aliases"), self.aliases)
        table.add(
            CommandSpec(
                "rm_alias", "rm_alias <alias>", "remove a model alias", "trusted", args=("alias",)
            ),
            self.rm_alias,
        )

    # --- !ask ---------------------------------------------------------------------------

    async def ask(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        ref = cmd.args["model"]
        name = self.catalogue.resolve(ref)
        if name is None:  # a model discovered since the catalogue last numbered them?
            await self.catalogue.sync()
            name = self.catalogue.resolve(ref)
        if name is None:
            raise UserError(
                f"No model {ref[:60]!r}; {ctx.prefix}models lists ids, names and aliases."
            )
        verdict = await self.limits.check(ctx.sender, ctx.room_id)
        if not verdict.allowed:
            metrics.ROUTING_RATE_LIMITED.labels(
                metrics.bounded(verdict.scope, metrics.RATE_LIMIT_SCOPES)
            ).inc()
            if verdict.notify:
                await ctx.reply(verdict.message)
            return  # silent until the announced time
        inf = self.config.inference
        params = SamplingParams(
            max_tokens=int(cmd.params.get("max_tokens", inf.max_tokens)),
            temperature=float(cmd.params.get("temp", inf.temperature)),
            top_p=float(cmd.params.get("top_p", inf.top_p)),
        )
        prompt = cmd.rest or ""
        messages = [ChatMessage("user", prompt)]
        gen = self.router.generate(messages, params, session=f"{ctx.room_id}|ask", model=name)
        pieces: list[str] = []
        try:
            async for piece in gen:
                pieces.append(piece)
        except InferenceError as e:
            raise UserError(f"[{name}] could not answer: {e}") from None
        finally:
            await gen.aclose()
        text = "".join(pieces).strip() or "(the model returned nothing)"
        if len(text) > MAX_ANSWER_CHARS:
            text = text[: MAX_ANSWER_CHARS - 1] + "…"
        answer = f"[{name}] {text}"
        note = failover_note(gen.failed_over_from, gen.served_by, gen.used_fallback)
        if note:
            answer += f"\n{note}"
        await ctx.reply(answer)
        stats = gen.stats
        metrics.observe_generation(stats, self.catalogue.model_of(stats, name))
        try:
            await self.limits.record(
                user=ctx.sender,
                room_id=ctx.room_id,
                persona=None,
                model=self.catalogue.model_of(stats, name),
                kind="ask",
                prompt_tokens=stats.prompt_tokens or self.count_tokens(prompt),
                completion_tokens=stats.completion_tokens,
            )
        except Exception:
            log.warning("could not record usage of !ask", exc_info=True)

    # --- catalogue ----------------------------------------------------------------------

    async def models(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await self.catalogue.sync()
        entries = self.catalogue.entries()
        if not entries:
            await ctx.reply("No models known yet.")
            return
        await ctx.reply("Models:\n" + "\n".join(model_line(e) for e in entries))

    async def reload_models(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        started = time.monotonic()
        errors = await self.catalogue.discover()
        entries = self.catalogue.entries()
        local = sum(1 for e in entries if e.local_file)
        remote = sum(1 for e in entries if e.endpoints)
        text = (
            f"Reloaded in {time.monotonic() - started:.1f}s: {local} local, {remote} remote "
            f"model(s); {len(entries)} in the catalogue."
        )
        unusable = [f"{n}: {p}" for n, p in self.catalogue.local.problems().items()]
        if unusable:
            text += "\nNot usable: " + "; ".join(unusable)
        failed = [f"{n}: {err}" for n, err in errors.items() if err]
        if failed:
            text += "\nUnreachable: " + "; ".join(failed)
        await ctx.reply(text)

    # --- endpoints ----------------------------------------------------------------------

    async def add_endpoint(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        name, url = cmd.args["name"].lower(), cmd.args["url"].rstrip("/")
        raw_key = cmd.args.get("api_key") or None
        private = bool(cmd.flags.get("private"))
        if not _ENDPOINT_NAME.match(name):
            raise UserError("Endpoint names use 1-32 of a-z 0-9 _ . - (starting a-z 0-9).")
        if len(url) > 500 or not _URL.match(url):
            raise UserError(
                "The URL must be http(s)://host[:port][/path], e.g. http://gpu1:8000/v1"
            )
        if name in self.config_endpoints:
            raise UserError(f"Endpoint {name} is defined in the config file; change it there.")
        if self.router.endpoint_info(name) is not None or await self.endpoints.get(name):
            raise UserError(
                f"Endpoint {name} exists; {ctx.prefix}remove_endpoint {name} first to replace it.",
                "conflict",
            )
        if private and not role_allows(ctx.role, "owner"):
            raise UserError("--private needs the owner role.")
        try:
            self.router.pool.check_conflict(name, None)
            key = self.policy.resolve_key(raw_key)
            await self.policy.check_url(url, allow_private=private)
            info = await self.router.add_endpoint(name, url, key)
        except EndpointConflict as e:
            raise UserError(f"Endpoint {name} refused: {e}.", "conflict") from None
        except Refused as e:
            raise UserError(str(e)) from None
        await self.endpoints.put(StoredEndpoint(name, url, raw_key, ctx.sender, private=private))
        await self.catalogue.sync()
        if info.models and info.healthy:
            state = f"models: {', '.join(info.models)}"
        else:
            state = f"not reachable now ({info.last_error or 'no models'}); it will be retried"
        text = f"Endpoint {name} added ({safe_url(url)}, {_key_source(raw_key)}): {state}."
        if raw_key and env_reference(raw_key) is None:
            text += (
                " Your command shows the key to this room: redact it, or give env:VARIABLE "
                "(a variable of the bridge's environment) instead."
            )
        await ctx.reply(text)

    async def remove_endpoint(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        name = cmd.args["name"].lower()
        removed = await self.router.remove_endpoint(name)
        stored = await self.endpoints.remove(name)
        if not removed and not stored:
            raise UserError(f"No endpoint named {name[:40]!r}; {ctx.prefix}endpoints lists them.")
        note = (
            " (it is in the config file, so it returns at restart)"
            if (name in self.config_endpoints)
            else ""
        )
        await ctx.reply(f"Endpoint {name} removed{note}.")

    async def list_endpoints(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        infos = self.router.endpoints()
        if not infos:
            await ctx.reply(
                f"No endpoints; {ctx.prefix}add_endpoint <name> <url> [api_key] adds one."
            )
            return
        lines = [self._endpoint_line(i, full=ctx.trusted) for i in infos]
        await ctx.reply("Endpoints:\n" + "\n".join(lines))

    def _endpoint_line(self, info: EndpointInfo, *, full: bool) -> str:
        """URL, key tail and error detail for trusted users; name, health, models for all.

        The status word is the one the admin API and hivebridge_endpoint_up show."""
        if info.healthy:
            health = "healthy"
            if info.latency_ms is not None:
                health += f", {info.latency_ms:.0f} ms"
        else:
            health = info.status
        models = ", ".join(info.models) or "none"
        if not full:
            return f"{info.name} — {health} — models: {models}"
        if not info.healthy:
            if info.last_error:
                health += f" ({info.last_error})"
            if info.cooldown_remaining_s > 0:
                health += f", next probe in {info.cooldown_remaining_s:.0f}s"
        origin = "config" if info.name in self.config_endpoints else "added"
        key = "no key" if info.masked_key == "(none)" else "key set"  # never any part of it
        url = safe_url(info.url)
        return f"{info.name} ({origin}) — {url} — {key} — {health} — models: {models}"

    # --- aliases ------------------------------------------------------------------------

    async def alias(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await self.catalogue.sync()
        alias = cmd.args["alias"]
        try:
            model_id, name = await self.catalogue.set_alias(alias, cmd.args["model"], ctx.sender)
        except ValueError as e:
            raise UserError(f"{e} {ctx.prefix}models lists the ids.") from None
        await ctx.reply(f"Alias {alias} → {model_id}. {name}")

    async def aliases(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        rows = self.catalogue.aliases()
        if not rows:
            await ctx.reply(f"No aliases; {ctx.prefix}alias <alias> <model_id> makes one.")
            return
        await ctx.reply("Aliases:\n" + "\n".join(f"{a} → {i}. {n}" for a, i, n in rows))

    async def rm_alias(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        alias = cmd.args["alias"]
        if not await self.catalogue.remove_alias(alias):
            raise UserError(f"No alias {alias[:40]!r}; {ctx.prefix}aliases lists them.")
        await ctx.reply(f"Alias {alias} removed.")


def _key_source(raw_key: str | None) -> str:
    """Where an endpoint's key comes from, without any part of the key."""
    if not raw_key:
        return "no key"
    variable = env_reference(raw_key)
    return f"key from {variable}" if variable else "key given"


def model_line(e: ModelEntry) -> str:
    """One line of ``!models``: id, name, where it comes from, its state, its aliases."""
    sources = []
    if e.local is not None:
        f = e.local
        sources.append(
            f"local file {f.path.name} ({f.size_bytes / 2**20:.0f} MiB, {f.quantization}, "
            f"{f.context_length:,}-token context)"
        )
    if e.endpoints:
        sources.append("endpoint " + ", ".join(e.endpoints))
    where = "; ".join(sources) or "no source now"
    if e.local is not None and e.state:
        state = e.state
        if e.state == "loaded":
            state += f", {e.offloaded_layers} of {e.local.n_layer + 1} layers on a GPU"
    else:
        state = "loaded" if e.loaded else "not loaded"
    alias = f" — aliases: {', '.join(e.aliases)}" if e.aliases else ""
    return f"{e.id}. {e.name} — {where} — {state}{alias}"


def failover_note(failed: list[str], served_by: str | None, used_fallback: bool) -> str:
    """Say in the answer that it did not come from where it was asked, and why."""
    if not failed:
        return ""
    who = ", ".join(failed)
    by = f"local fallback {served_by}" if used_fallback else f"endpoint {served_by}"
    return f"(endpoint {who} unavailable; answered by {by})"
