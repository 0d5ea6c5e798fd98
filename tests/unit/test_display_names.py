"""Display names: no invisible or direction-changing characters, no lookalike of the bot."""

from __future__ import annotations

import pytest

from hivebridge.personas.display_names import display_name_problem, skeleton

BOT = ("Hive", "hive_bot")


@pytest.mark.parametrize(
    "name",
    [
        "\u202eevil\u202c \u200b Name",  # right-to-left override, zero width space
        "Ada\u200dLovelace",  # zero width joiner
        "Ada\u2066Lovelace\u2069",  # isolates
        "\ufeffAda",  # byte order mark
        "Ada\nLovelace",  # a control character
        "Ada\u2028Lovelace",  # line separator
    ],
)
def test_format_and_control_characters_are_refused(name: str) -> None:
    problem = display_name_problem(name, BOT)
    assert problem is not None and "U+" in problem, problem


@pytest.mark.parametrize(
    "name",
    [
        "Hive",
        "HIVE",
        "hive",
        "H\u0456ve",
        "H i v e",
        "Ｈｉｖｅ",
        "Hívé",
        "Hlve",
        "Hive Bot",
        "hive_bot",
    ],
)
def test_lookalikes_of_the_bot_are_refused(name: str) -> None:
    problem = display_name_problem(name, BOT)
    assert problem is not None and "looks like the bot" in problem, problem


@pytest.mark.parametrize(
    "name", ["Ada Lovelace", "Poet", "Hiver", "Dr. Who?", "Zoë", "李白", "Hive Mind"]
)
def test_ordinary_names_pass(name: str) -> None:
    assert display_name_problem(name, BOT) is None


def test_blank_and_long_names() -> None:
    assert display_name_problem("   ", BOT) is not None
    assert display_name_problem("x" * 101, BOT) is not None


def test_skeleton() -> None:
    assert skeleton("Ｈіｖе_ bot") == skeleton("hivebot")
