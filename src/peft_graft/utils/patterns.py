"""Module-name patterns from config files, checked so that matching them cannot backtrack catastrophically.

PEFT matches ``target_modules`` / ``exclude_modules`` strings, ``rank_pattern``-style keys and ``modules_to_save``
with Python's backtracking ``re``, and a config file is untrusted input: ``(a+)+$`` against a module name hangs for
minutes. A non-backtracking engine would have to replace PEFT's own matching in several places, so instead every
pattern is checked against a grammar whose matching time is polynomial and small for module names: no
backreferences, lookarounds or conditionals; no repetition inside a repetition and no alternation inside a
repetition (``(a+)+``, ``(a|ab)*``, ``(.*a){20}``); at most ``MAX_REPEATS`` repetitions in all (each one a factor of
the name's length in the worst case, and PEFT adds one of its own); at most ``MAX_LENGTH`` characters. Real patterns
(``.*\\.layers\\.\\d+\\.(q_proj|v_proj)``, ``model.layers.0.mlp.down_proj``) pass.
"""

from __future__ import annotations

import re

# re's own parser (private since Python 3.11, public before as sre_parse): it reads a pattern exactly as re will
from re import _constants as _sre
from re import _parser as _parse

from ..errors import GraftConfigError

MAX_LENGTH = 512
MAX_REPEATS = 3
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT))
_REFUSED = {
    _sre.GROUPREF: "a backreference",
    _sre.GROUPREF_EXISTS: "a conditional group",
    _sre.ASSERT: "a lookahead or lookbehind",
    _sre.ASSERT_NOT: "a negative lookahead or lookbehind",
}


def check_pattern(pattern: object, field: str) -> None:
    """Raise GraftConfigError unless `pattern` is a string whose matching cannot blow up (see the module docstring)."""
    if not isinstance(pattern, str):
        raise GraftConfigError(f"{field} must be a string, got {type(pattern).__name__}", field=field)
    if len(pattern) > MAX_LENGTH:
        raise GraftConfigError(f"{field} is {len(pattern)} characters long; at most {MAX_LENGTH}", field=field)
    try:
        parsed = _parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        message = f"{field} is not a valid regular expression: {pattern!r} ({error})"
        raise GraftConfigError(message, field=field) from None
    repeats = _walk(parsed, field, pattern, inside_repeat=False)
    if repeats > MAX_REPEATS:
        raise GraftConfigError(
            f"{field} {pattern!r} has {repeats} repetitions (*, +, {{m,n}}); at most {MAX_REPEATS} are allowed, "
            "because each one multiplies the worst-case matching time. Name the modules, or simplify the pattern.",
            field=field,
        )


def _walk(items, field: str, pattern: str, inside_repeat: bool) -> int:
    """The number of repetitions in `items`; raises on a construct outside the grammar."""
    repeats = 0
    for op, value in items:
        if op in _REFUSED:
            raise GraftConfigError(f"{field} {pattern!r} uses {_REFUSED[op]}, which is not allowed here", field=field)
        if op in _REPEATS:
            _, high, body = value
            if high > 1:  # a fixed count such as (.*a){20} multiplies what its body does, as much as a + would
                if inside_repeat:
                    raise GraftConfigError(
                        f"{field} {pattern!r} repeats a repetition (like (a+)+), which can take exponential time "
                        "to match; write it without the nesting",
                        field=field,
                    )
                repeats += 1
            repeats += _walk(body, field, pattern, inside_repeat=inside_repeat or high > 1)
        elif op == _sre.BRANCH:
            if inside_repeat:
                raise GraftConfigError(
                    f"{field} {pattern!r} repeats an alternation (like (a|ab)*), which can take exponential time "
                    "to match; list the alternatives without repeating them",
                    field=field,
                )
            repeats += sum(_walk(branch, field, pattern, inside_repeat) for branch in value[1])
        elif op == _sre.SUBPATTERN:
            repeats += _walk(value[-1], field, pattern, inside_repeat)
        elif op == getattr(_sre, "ATOMIC_GROUP", None):
            repeats += _walk(value, field, pattern, inside_repeat)
    return repeats
