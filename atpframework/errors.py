"""The exception hierarchy: every error a user can act on is an ``AtpfError``.

Each class also derives from the builtin it refines, so ``except ValueError`` keeps working.
Messages say what failed (with the plan location, e.g. ``nodes[1].heads``), the offending value,
and what is allowed.
"""


class AtpfError(Exception):
    """Base of every error raised on purpose by atpframework."""


class PlanError(AtpfError, ValueError):
    """The plan is malformed or asks for something the model cannot do (CLI exit code 2)."""


class PluginError(AtpfError, LookupError):
    """A backend or node plugin is unknown, fails to import, or does not honour its contract."""


class BackendError(AtpfError, RuntimeError):
    """The backend failed while loading or running the model (CLI exit code 1)."""


class SchemaError(AtpfError, ValueError):
    """A result file is not an atpframework result, or was written by a newer schema."""


class ResourceError(AtpfError, RuntimeError):
    """The run cannot go on safely: its output is locked by another run, or would replace a file that is not ours."""


class NonFiniteError(AtpfError, ArithmeticError):
    """A metric or score came out NaN or infinite (the message names where it first appeared)."""


MAX_SHOWN = 200
"""How many characters of an offending value an error message repeats."""


def shorten(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)``, cut to ``limit`` characters (the middle elided) so messages stay one readable line."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still reported
        text = f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]} ({len(text)} characters)"


MAX_PROBLEMS = 20
"""Most problems one error message lists (then ``... and N more problem(s)``)."""
MAX_MESSAGE = 2000
"""About the longest error message (characters): each problem line is cut to ``MAX_LINE``, and lines stop here."""
MAX_LINE = 400
"""Longest problem line (characters); longer ones keep their start and end."""


def problem_list(lines: list[str], heading: str) -> str:
    """``heading:`` and one indented line per problem (duplicates dropped): each cut to ``MAX_LINE``
    characters, at most ``MAX_PROBLEMS`` of them and about ``MAX_MESSAGE`` in all, then a count of the rest."""
    lines = list(dict.fromkeys(lines))
    shown: list[str] = []
    size = 0
    for line in lines:
        line = line if len(line) <= MAX_LINE else f"{line[:MAX_LINE - 60]} ... {line[-50:]}"
        if len(shown) == MAX_PROBLEMS or size + len(line) > MAX_MESSAGE:
            break
        shown.append(line)
        size += len(line) + 3
    if len(lines) > len(shown):
        shown.append(f"... and {len(lines) - len(shown)} more problem(s)")
    return f"{heading}:\n  " + "\n  ".join(shown)
