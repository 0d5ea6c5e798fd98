"""Local models and worker profiles: ``!load``, ``!unload``, ``!profiles``.

``!models`` and ``!reload_models`` (commands/models.py) list and rescan every
model; these act on the local ones: load into memory (within the memory
budget), unload (running replies get ``unload_grace_s`` to finish, then are
cancelled), and show the worker profiles personas can be put on.
"""

from __future__ import annotations

import time

from ..catalogue import ModelCatalogue
from ..config import Config, ProfileConfig
from ..inference.local.models import LocalModels
from ..inference.types import InferenceError
from .base import CommandContext, CommandTable, UserError
from .parser import CommandSpec, ParsedCommand


class LocalModelCommands:
    def __init__(self, config: Config, catalogue: ModelCatalogue, models: LocalModels) -> None:
        self.config = config
        self.catalogue = catalogue
        self.models = models

    def register(self, table: CommandTable) -> None:
        table.add(
            CommandSpec(
                "load", "load <model>", "load a local model into memory", "owner", args=("model",)
            ),
            self.load,
        )
        table.add(
            CommandSpec(
                "unload",
                "unload <model>",
                "free a local model's memory (running replies finish or are cancelled)",
                "owner",
                args=("model",),
            ),
            self.unload,
        )
        table.add(
            CommandSpec("profiles", "profiles", "the worker profiles personas can use"),
            self.profiles,
        )

    def _local(self, ctx: CommandContext, ref: str) -> str:
        name = self.catalogue.resolve(ref) or ref
        if self.models.file(name) is None:
            problem = self.models.problems().get(name)
            if problem:
                raise UserError(f"Cannot load {name[:60]}: {problem}.")
            raise UserError(
                f"No local model {ref[:60]!r}; {ctx.prefix}models lists them "
                f"({ctx.prefix}reload_models rescans the models directory)."
            )
        return name

    async def load(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        name = self._local(ctx, cmd.args["model"])
        if self.models.state(name) == "loaded":
            await ctx.reply(f"{name} is already loaded.")
            return
        started = time.monotonic()
        try:
            await self.models.load(name)
        except InferenceError as e:
            raise UserError(f"Could not load {name}: {e}") from None
        await ctx.reply(f"Loaded {name} in {time.monotonic() - started:.1f}s.")

    async def unload(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        name = self._local(ctx, cmd.args["model"])
        if not await self.models.unload(name):
            await ctx.reply(f"{name} was not loaded.")
            return
        note = ""
        if name == self.models.default_model:
            note = " It is the default model: the next reply that needs it loads it again."
        await ctx.reply(f"Unloaded {name}.{note}")

    async def profiles(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        profiles = self.config.inference.profiles
        if not profiles:
            await ctx.reply("No worker profiles; inference.profiles in the config defines them.")
            return
        lines = [profile_line(p) for p in profiles]
        await ctx.reply(
            f"Worker profiles ({ctx.prefix}persona set <name> profile <profile>):\n"
            + "\n".join(lines)
        )


def profile_line(p: ProfileConfig) -> str:
    keys = (
        "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens",
        "context_tokens", "n_ctx", "threads", "n_gpu_layers",
    )  # fmt: skip
    parts = [
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k in keys
        if (v := getattr(p, k)) is not None
    ]
    return f"{p.name}: {', '.join(parts) or 'the defaults'}"
