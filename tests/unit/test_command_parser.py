"""Command parsing: grammar, typed options, friendly errors, and never raising."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivebridge.commands.parser import (
    CommandError,
    CommandSpec,
    OptionSpec,
    ParsedCommand,
    format_help,
    normalize_persona_name,
    parse,
    tokenize,
)
from hivebridge.permissions import role_allows

ASK = CommandSpec(
    name="ask",
    usage="ask <model> <prompt...> [max_tokens=N] [temp=0..2] [top_p=0..1]",
    help="Ask a model once.",
    args=("model",),
    rest="prompt",
    rest_required=True,
    flags=(OptionSpec("stream", "bool"), OptionSpec("system", "str")),
    params=(
        OptionSpec("max_tokens", "int", 1, 4096),
        OptionSpec("temp", "float", 0, 2),
        OptionSpec("top_p", "float", 0, 1),
    ),
)
HELP = CommandSpec("help", "help [command]", "List commands.", optional_args=("command",))
PERSONA = CommandSpec(
    "persona",
    "persona <action> <name> [model=M]",
    "Manage personas.",
    min_role="trusted",
    args=("action", "name"),
    params=(OptionSpec("model", choices=("tiny", "large")),),
    flags=(OptionSpec("count", "int", 1, 10),),
)
STOP = CommandSpec("stop", "stop", "Silence personas here.", min_role="owner", aliases=("halt",))
SPECS = (ASK, HELP, PERSONA, STOP)


def ok(body: str, specs: tuple[CommandSpec, ...] = SPECS, prefix: str = "!") -> ParsedCommand:
    result = parse(body, specs, prefix)
    assert isinstance(result, ParsedCommand), result
    return result


def err(body: str, specs: tuple[CommandSpec, ...] = SPECS) -> CommandError:
    result = parse(body, specs)
    assert isinstance(result, CommandError), result
    assert "\n" not in str(result)
    return result


# --- not a command ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", ["hello", "", "   ", "!", "! ask tiny hi", "!!!", "!?", "!123", "wow!ask", "!ask?"]
)
def test_not_a_command_returns_none(body: str) -> None:
    assert parse(body, SPECS) is None


def test_custom_prefix() -> None:
    assert parse("!help", SPECS, prefix="hb:") is None
    assert ok("hb:help", prefix="hb:").name == "help"
    assert parse("hb: help", SPECS, prefix="hb:") is None


def test_leading_whitespace_and_reply_fallback_are_ignored() -> None:
    assert ok("   !help").name == "help"
    assert ok("> <@alice:example.org> earlier\n> more\n\n!help ask").args == {"command": "ask"}


# --- names -----------------------------------------------------------------------------------


def test_command_name_is_case_insensitive_and_aliases_map_to_canonical() -> None:
    parsed = ok("!HeLp")
    assert parsed.name == "help" and parsed.invoked_as == "help"
    halted = ok("!HALT")
    assert halted.name == "stop" and halted.invoked_as == "halt"


def test_unknown_command_hints_closest_match() -> None:
    error = err("!hepl me")
    assert "Unknown command !hepl" in error.message
    assert "Did you mean !help?" in error.message
    assert error.usage == ""


def test_unknown_command_without_close_match_still_points_to_help() -> None:
    error = err("!zzzzzz")
    assert "Did you mean" not in error.message
    assert "!help" in error.message


def test_unknown_huge_command_name_is_truncated() -> None:
    error = err("!" + "x" * 10_000)
    assert len(str(error)) < 200


# --- !ask: positional + free text + trailing params ------------------------------------------


def test_ask_with_trailing_params() -> None:
    parsed = ok("!ask tiny What is 2+2? max_tokens=50 temp=0.5 top_p=0.9")
    assert parsed.args == {"model": "tiny"}
    assert parsed.rest == "What is 2+2?"
    assert parsed.params == {"max_tokens": 50, "temp": 0.5, "top_p": 0.9}
    assert isinstance(parsed.params["max_tokens"], int)


def test_ask_prompt_keeps_apostrophes_and_inner_whitespace() -> None:
    parsed = ok("!ask tiny What's up?\n  Line two\twith tab")
    assert parsed.rest == "What's up?\n  Line two\twith tab"


def test_ask_params_in_the_middle_stay_in_the_prompt() -> None:
    parsed = ok("!ask tiny set temp=0.5 in my oven max_tokens=10")
    assert parsed.rest == "set temp=0.5 in my oven"
    assert parsed.params == {"max_tokens": 10}


def test_ask_undeclared_trailing_key_value_stays_in_prompt() -> None:
    parsed = ok("!ask tiny solve x=1 y=2 temp=1")
    assert parsed.rest == "solve x=1 y=2"
    assert parsed.params == {"temp": 1.0}


def test_ask_last_trailing_duplicate_wins_and_beats_leading_flag() -> None:
    parsed = ok("!ask --temp=1.5 tiny hi temp=0.2 temp=0.3")
    assert parsed.params == {"temp": 0.3}
    assert parsed.rest == "hi"


def test_ask_quoted_prompt_is_unquoted_only_when_whole() -> None:
    assert ok('!ask tiny "hello world"').rest == "hello world"
    assert ok("!ask tiny 'a b' and more").rest == "'a b' and more"


def test_ask_flags_before_and_between_positionals() -> None:
    parsed = ok("!ask --stream --system 'be brief' tiny explain")
    assert parsed.flags == {"stream": True, "system": "be brief"}
    assert parsed.args == {"model": "tiny"}
    assert parsed.rest == "explain"
    assert ok("!ask tiny --stream=no explain").flags == {"stream": False}


def test_ask_params_usable_as_flags_and_leading_params() -> None:
    assert ok("!ask --temp 0.7 tiny hi").params == {"temp": 0.7}
    parsed = ok("!ask max-tokens=5 tiny hi")
    assert parsed.params == {"max_tokens": 5}
    assert parsed.args == {"model": "tiny"}


def test_ask_undeclared_double_dash_in_prompt_is_text() -> None:
    assert ok("!ask tiny --- see above").rest == "--- see above"
    assert ok("!ask tiny --verbose please").rest == "--verbose please"
    assert ok("!ask tiny -- --stream is text").rest == "--stream is text"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("!ask", "missing <model>"),
        ("!ask tiny", "missing <prompt>"),
        ("!ask tiny temp=0.5", "missing <prompt>"),
        ("!ask tiny hi temp=3", "temp must be between 0 and 2"),
        ("!ask tiny hi temp=-0.1", "temp must be between 0 and 2"),
        ("!ask tiny hi top_p=1.5", "top_p must be between 0 and 1"),
        ("!ask tiny hi max_tokens=0", "max_tokens must be between 1 and 4096"),
        ("!ask tiny hi max_tokens=1.5", "max_tokens must be a whole number"),
        ("!ask tiny hi temp=hot", "temp must be a number"),
        ("!ask tiny hi temp=nan", "temp must be a number"),
        ("!ask tiny hi temp=inf", "temp must be a number"),
        ("!ask tiny hi temp=1e999", "temp must be a number"),
        ("!ask --stream=maybe tiny hi", "stream must be yes or no"),
        ("!ask --system", "--system needs a value"),
        ("!ask --bogus tiny hi", "unknown option --bogus"),
        ("!ask 'tiny hi", "unbalanced ' quote"),
        ('!ask "tiny hi', 'unbalanced " quote'),
        ("!ask tiny\\", "dangling backslash"),
    ],
)
def test_ask_errors_are_one_line_with_usage(body: str, fragment: str) -> None:
    error = err(body)
    assert fragment in error.message
    assert error.usage == f"Usage: !{ASK.usage}"
    assert error.command == "ask"


# --- commands without free text --------------------------------------------------------------


def test_optional_positional() -> None:
    assert ok("!help").args == {}
    assert ok("!help ask").args == {"command": "ask"}
    assert "too many arguments" in err("!help ask more").message


def test_params_and_flags_anywhere_for_fixed_arity_commands() -> None:
    parsed = ok("!persona model=LARGE create --count 3 bob")
    assert parsed.args == {"action": "create", "name": "bob"}
    assert parsed.params == {"model": "large"}  # choices come back canonical
    assert parsed.flags == {"count": 3}


def test_quoted_key_value_is_positional() -> None:
    parsed = ok("!persona create 'model=tiny'")
    assert parsed.args == {"action": "create", "name": "model=tiny"}
    assert parsed.params == {}


def test_unknown_param_lists_known_ones() -> None:
    error = err("!persona create bob colour=blue")
    assert "unknown parameter 'colour' (model)" in error.message


def test_bad_choice() -> None:
    assert "model must be one of: tiny, large" in err("!persona create bob model=huge").message


def test_double_dash_ends_options() -> None:
    parsed = ok("!persona -- --count bob")
    assert parsed.args == {"action": "--count", "name": "bob"}


def test_command_without_args_rejects_extras() -> None:
    assert ok("!stop").args == {}
    assert "too many arguments" in err("!stop now").message


def test_validator_message_and_buggy_validator() -> None:
    def even(value: object) -> str | None:
        return None if isinstance(value, int) and value % 2 == 0 else "n must be even"

    def broken(value: object) -> str | None:
        raise RuntimeError("bug")

    specs = (
        CommandSpec("even", "even --n N", "x", flags=(OptionSpec("n", "int", validator=even),)),
        CommandSpec("bad", "bad --n N", "x", flags=(OptionSpec("n", validator=broken),)),
    )
    assert ok("!even --n 4", specs).flags == {"n": 4}
    assert "n must be even" in err("!even --n 3", specs).message
    assert "invalid n" in err("!bad --n x", specs).message


def test_spec_rejects_bad_names_and_roles() -> None:
    with pytest.raises(ValueError):
        CommandSpec("Ask", "Ask", "x")
    with pytest.raises(ValueError):
        CommandSpec("ask", "ask", "x", min_role="admin")  # type: ignore[arg-type]


def test_specs_may_be_a_mapping() -> None:
    assert isinstance(parse("!help", {"help": HELP}), ParsedCommand)


def test_too_long_body_is_an_error() -> None:
    assert "too long" in err("!ask tiny " + "a" * 70_000).message


def test_error_echo_is_printable_and_short() -> None:
    error = err("!ask tiny hi temp=\x1b[31m" + "9" * 500)
    assert "\x1b" not in str(error)
    assert len(error.message) < 120


# --- roles and help --------------------------------------------------------------------------


def test_role_order() -> None:
    assert role_allows("owner", "user") and role_allows("trusted", "trusted")
    assert not role_allows("user", "trusted") and not role_allows("trusted", "owner")


def test_format_help_filters_by_role() -> None:
    everyone = format_help(SPECS)
    assert everyone.count("\n") == 3
    user_help = format_help(SPECS, role="user")
    assert "!ask <model>" in user_help and "!persona" not in user_help and "!stop" not in user_help
    assert "!persona" in format_help(SPECS, role="trusted")
    assert "!stop — Silence personas here." in format_help(SPECS, role="owner")


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenize_matches_shlex_examples() -> None:
    for text in ['a "b c" d', "a 'b\\c' d", 'x"y z"w', 'a "" b', 'q "a\\"b\\\\c\\d"', "e\\ f"]:
        assert tokenize(text) == shlex.split(text, posix=True)


def test_tokenize_returns_error_instead_of_raising() -> None:
    assert isinstance(tokenize('"open'), CommandError)
    assert isinstance(tokenize("end\\"), CommandError)


_ascii_shellish = st.text(alphabet=st.sampled_from(list("ab =-'\"\\ \t\n")), max_size=40)


@given(_ascii_shellish)
def test_tokenize_agrees_with_shlex(text: str) -> None:
    try:
        expected: list[str] | None = shlex.split(text, posix=True)
    except ValueError:
        expected = None
    result = tokenize(text)
    if expected is None:
        assert isinstance(result, CommandError)
    else:
        assert result == expected


# --- never raises ----------------------------------------------------------------------------

_pieces = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "!",
            "!ask",
            "!ASK",
            "!help",
            "!persona",
            "!stop",
            "--",
            "--stream",
            "--system",
            "--temp",
            "--count",
            "temp=",
            "max_tokens=",
            "model=",
            "'",
            '"',
            "\\",
            " ",
            "\n",
            "\u00a0",
            "\u3000",
            "=",
            "> ",
            "0.5",
            "1e5",
            "-1",
            "tiny",
        ]
    ),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_pieces, max_size=12).map("".join))
def test_parse_never_raises_on_command_like_input(body: str) -> None:
    result = parse(body, SPECS)
    assert result is None or isinstance(result, ParsedCommand | CommandError)
    if isinstance(result, CommandError):
        assert "\n" not in str(result) and "Traceback" not in str(result)
        assert len(result.message) < 300


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_parse_never_raises_on_arbitrary_unicode(body: str) -> None:
    for candidate in (body, "!" + body, "!ask " + body, "!persona " + body):
        result = parse(candidate, SPECS)
        assert result is None or isinstance(result, ParsedCommand | CommandError)


def test_parse_handles_64kb_inputs_quickly() -> None:
    big_words = "!ask tiny " + "word " * 13_000
    assert isinstance(parse(big_words, SPECS), ParsedCommand)
    many_params = "!ask tiny hi" + " temp=1" * 9_000
    parsed = ok(many_params)
    assert parsed.rest == "hi" and parsed.params == {"temp": 1.0}
    quotes = "!persona " + "'" * 60_000
    assert isinstance(parse(quotes, SPECS), CommandError)


# --- persona names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "name"),
    [("alice", "alice"), ("Alice", "alice"), ("  Bob_2 ", "bob_2"), ("a.b=c-d/e", "a.b=c-d/e")],
)
def test_valid_persona_names_are_lowercased(raw: str, name: str) -> None:
    check = normalize_persona_name(raw)
    assert check.ok and check.name == name


@pytest.mark.parametrize(
    "raw", ["", "   ", "a" * 33, "al ice", "alice!", "al:ice", "@alice", "ålice", "\u212aelvin"]
)
def test_invalid_persona_names_are_rejected(raw: str) -> None:
    check = normalize_persona_name(raw)
    assert not check.ok and check.name is None and check.error


@given(st.text(max_size=40))
def test_persona_name_result_is_always_a_valid_localpart(raw: str) -> None:
    check = normalize_persona_name(raw)
    if check.ok:
        assert check.name is not None and 1 <= len(check.name) <= 32
        assert set(check.name) <= set("abcdefghijklmnopqrstuvwxyz0123456789._=-/")
