"""How the workflow loader words values and validation problems in its errors."""
from __future__ import annotations

import difflib
from typing import Any

import pydantic


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=3)
    if close:
        return f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    return f" (known: {', '.join(str(c) for c in choices)})" if choices else ""


def type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)


def printable(text: str) -> str:
    """`text` with control characters escaped, so an error about it stays one line."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pydantic_message(error: dict, known: list[str], noun: str = "parameter") -> str:
    kind = error["type"]
    if kind == "missing":
        return f"required {noun} missing"
    if kind == "extra_forbidden":
        key = str(error["loc"][-1]) if error["loc"] else "?"
        return f"unknown {noun} {key!r}{suggest(key, known)}"
    message = error["msg"]
    if kind == "value_error" and message.startswith("Value error, "):  # a validator's own sentence
        message = message[len("Value error, "):]
    if isinstance(error.get("input"), (dict, list)):  # the whole block: the message says what is wrong in it
        return f"{message[0].lower()}{message[1:]}"
    return f"{message[0].lower()}{message[1:]}, got {short_repr(error.get('input'))}"


def pydantic_problem(exc: pydantic.ValidationError, known: list[str], noun: str) -> tuple[tuple, str]:
    error = exc.errors()[0]
    return tuple(error["loc"]), pydantic_message(error, known, noun=noun) + more_errors(exc)


def more_errors(exc: pydantic.ValidationError) -> str:
    count = exc.error_count() - 1
    return f" (and {count} more error{'s' if count > 1 else ''})" if count > 0 else ""
