"""Regular expressions of configs (``target_modules``, ``exclude_modules``, ``layers_pattern``) whose
matching time has a bound.

Python's ``re`` backtracks and has no timeout: ``(.*)*x`` takes minutes on one module path. Rather than
run such a pattern, it is rejected up front, from its parse tree, with the reason and what to write
instead. What is rejected is what makes backtracking blow up:

- a repeat of something that itself varies in length (``(a+)*``, ``(.*)*x``, ``(\\w+\\.)+``): exponential;
- a repeat of an alternation (``(a|ab)*``): exponential where branches can match alike;
- backreferences (``(a+)\\1``): matching them is not polynomial in general;
- more than ``MAX_VARIABLE_REPEATS`` repeats of variable length in sequence (``.*.*.*.*x``): each one
  multiplies the work by the path's length (alternatives are tried one after another, so
  ``.*a|.*b|.*c|.*d`` counts one);
- more than ``MAX_CHOICES`` combinations of alternatives and optional parts, which multiply it too.

What remains matches a path of ``n`` characters in roughly at most ``MAX_CHOICES * n**MAX_VARIABLE_REPEATS``
steps (milliseconds for module paths). The rules are conservative: some harmless patterns (``(\\.\\w+)*``)
are rejected too, with the reason. The usual patterns (``.*\\.(q_proj|v_proj)``,
``model\\.layers\\.\\d+\\.self_attn\\.\\w+_proj``) pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

try:
    from re import _parser as _sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["MAX_CHOICES", "MAX_VARIABLE_REPEATS", "check_bounded_regex"]

MAX_VARIABLE_REPEATS = 3
MAX_CHOICES = 256

_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
_BACKREFERENCES = {
    "GROUPREF",
    "GROUPREF_EXISTS",
    "GROUPREF_IGNORE",
    "GROUPREF_LOC_IGNORE",
    "GROUPREF_UNI_IGNORE",
}
_ADVICE = (
    "Python's regular expressions backtrack without a time limit, so orthoft accepts only patterns "
    "whose matching time is bounded; write it without nested or repeated variable parts (e.g. "
    r"'.*\.(q_proj|v_proj)') or pass a list of module names"
)


class _Rejected(Exception):
    pass


@dataclass
class _Cost:
    variable_repeats: int = 0
    choices: int = 1


def _children(name: str, av: Any) -> list[Any]:
    """The parsed subpatterns inside one node of the parse tree."""
    if name in _REPEATS:
        return [av[2]]
    if name == "BRANCH":
        return list(av[1])
    if name == "SUBPATTERN":
        return [av[-1]]
    if name in ("ASSERT", "ASSERT_NOT"):
        return [av[1]]
    if name == "ATOMIC_GROUP":
        return [av]
    return []


def _has_variable_part(items: Any) -> bool:
    """Whether a parsed subpattern holds a variable-length repeat or an alternation."""
    for op, av in items:
        name = str(op)
        if name == "BRANCH" or (name in _REPEATS and av[0] != av[1]):
            return True
        if any(_has_variable_part(child) for child in _children(name, av)):
            return True
    return False


def _cost(items: Any) -> _Cost:
    """The work of matching a parsed sequence, as a power of the path's length and a constant factor:
    parts in sequence multiply (their powers add), alternatives are tried one after another (the worst
    power, the constants added)."""
    total = _Cost(variable_repeats=0, choices=1)
    for op, av in items:
        name = str(op)
        if name in _BACKREFERENCES:
            raise _Rejected("it uses a backreference")
        if name in _REPEATS:
            low, high, body = av
            if high > 1 and _has_variable_part(body):
                raise _Rejected("it repeats a part that varies in length or has alternatives")
            inner = _cost(body)
            part = _Cost(inner.variable_repeats, inner.choices)
            if high - low > 1:
                part.variable_repeats += 1
            elif high - low == 1:
                part.choices *= 2
        elif name == "BRANCH":
            branches = [_cost(branch) for branch in av[1]]
            part = _Cost(max(b.variable_repeats for b in branches), sum(b.choices for b in branches))
        else:
            part = _Cost(0, 1)
            for child in _children(name, av):
                inner = _cost(child)
                part.variable_repeats += inner.variable_repeats
                part.choices *= inner.choices
        total.variable_repeats += part.variable_repeats
        total.choices *= part.choices
    return total


def check_bounded_regex(owner: str, field: str, pattern: str, variable_repeats_used: int = 0) -> None:
    """A ``ValueError`` naming ``owner``'s ``field`` unless ``pattern`` compiles and matches in bounded time.

    ``variable_repeats_used``: repeats of variable length that the caller adds around the pattern.
    """
    named = f"{owner}: `{field}` {pattern!r}"
    try:
        parsed = _sre_parse.parse(pattern)
        re.compile(pattern)  # what only compiling finds (a look-behind of variable width)
    except (re.error, RecursionError, OverflowError) as error:
        raise ValueError(f"{named} is not a valid regular expression: {error}.") from None
    try:
        cost = _cost(parsed.data)
        cost.variable_repeats += variable_repeats_used
        if cost.variable_repeats > MAX_VARIABLE_REPEATS:
            raise _Rejected(
                f"it has {cost.variable_repeats - variable_repeats_used} repeats of variable length "
                f"(at most {MAX_VARIABLE_REPEATS - variable_repeats_used} here)"
            )
        if cost.choices > MAX_CHOICES:
            raise _Rejected(
                f"its alternatives and optional parts combine in {cost.choices} ways (at most {MAX_CHOICES})"
            )
    except _Rejected as reason:
        raise ValueError(f"{named} is rejected: {reason}. {_ADVICE}.") from None
    except RecursionError:
        raise ValueError(f"{named} is rejected: it nests too deeply. {_ADVICE}.") from None
