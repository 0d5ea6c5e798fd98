"""A persona's system prompt: its own words, then its traits in one stable form.

Traits are a JSON object (Big Five scores, "speaks like a pirate", …). They
are rendered after the prompt, one per line, keys sorted and values written
the same way every time, so the system block is byte-stable and stays the
engine's pinned, cached prefix until the traits themselves change::

    You are Ada, a mathematician.

    Your traits:
    - openness: 0.8
    - speaks: like a pirate
"""

from __future__ import annotations

import json
from collections.abc import Mapping

TRAITS_HEADER = "\n\nYour traits:\n"


def render_traits(traits: Mapping[str, object]) -> str:
    """One ``- key: value`` line per trait, keys sorted; "" for none."""
    lines = [f"- {key}: {_value(traits[key])}" for key in sorted(traits, key=str)]
    return "\n".join(lines)


def persona_system_prompt(prompt: str, traits: Mapping[str, object] | None) -> str:
    """The system prompt a persona's model sees: its prompt, then its traits."""
    rendered = render_traits(traits or {})
    return f"{prompt}{TRAITS_HEADER}{rendered}" if rendered else prompt


def _value(value: object) -> str:
    if isinstance(value, str):
        return " ".join(value.split())  # no line breaks inside a trait
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))
