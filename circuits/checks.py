"""The checks of what a user passes in (numbers, texts, JSON files), written once for the command and the library.

Why one module: ``sinkscope measure --eps nan`` and ``meas.sink_rate(eps=float("nan"))`` are the
same mistake and must be refused by the same rule with the same words; so must a batch size of
0, a seed of -1 and a learning rate of ``inf``. The command passes the option's name
(``"--eps"``), the library the argument's (``"eps"``); each caller may pass its own error class
(a :class:`~circuits.errors.SinkscopeError` subclass) so ``except EffectError`` keeps working.

Every check refuses what is not a real number of the right kind before looking at its value: a
string (``"0.3"``), ``None``, a bool (``True`` is 1 to Python, never a batch size), NaN and the
infinities (unless a range allows them), a float where an integer is meant. The message names
the argument, the value as given and what is accepted. This module imports nothing heavy, so
the command can use it before torch is loaded. Texts must be text (:func:`check_text`: no lone
surrogate), and a user's JSON file fails as one error however it is broken (:func:`load_json`).
"""

from __future__ import annotations

import json
import math
import numbers
import re

from circuits.errors import SinkscopeError


class ArgumentError(SinkscopeError, ValueError):
    """An argument of the wrong type or outside its range (names the argument, the value and the range)."""


def shown(value) -> str:
    """How a bad value is quoted in a message: numbers as written, anything else as its repr."""
    if value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        return str(value)
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, str) else repr(value)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_eps(value, name: str = "eps", *, error: type[SinkscopeError] = ArgumentError) -> float:
    """A threshold of Sink_k^eps: a number strictly between 0 and 1 (NaN is not)."""
    if not (_real(value) and math.isfinite(float(value)) and 0 < float(value) < 1):
        raise error(f"{name} must be a number strictly between 0 and 1, got {shown(value)}")
    return float(value)


def check_int(
    value,
    name: str,
    *,
    minimum: int | None = 1,
    maximum: int | None = None,
    error: type[SinkscopeError] = ArgumentError,
    rule: str | None = None,
) -> int:
    """A whole number in ``minimum..maximum`` (either end None: open). ``rule`` words the range
    (default: "a positive integer" for minimum 1, "a non-negative integer" for 0)."""
    if rule is None:
        if maximum is not None:
            rule = f"an integer from {minimum} to {maximum}"
        else:
            rule = {1: "a positive integer", 0: "a non-negative integer", None: "an integer"}.get(minimum, f"an integer >= {minimum}")
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integral or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise error(f"{name} must be {rule}, got {shown(value)}")
    return int(value)


def check_float(
    value,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    error: type[SinkscopeError] = ArgumentError,
    allow_none: bool = False,
) -> float | None:
    """A finite number in a range: ``low``/``high`` None is no bound, ``*_open`` excludes the bound.

    ``allow_none``: None passes (an optional setting left at its default)."""
    if value is None and allow_none:
        return None
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    rule = "a finite number" + (" " + " and ".join(parts) if parts else "")
    ok = _real(value) and math.isfinite(float(value))
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low
    if ok and high is not None:
        ok = float(value) < high if high_open else float(value) <= high
    if not ok:
        raise error(f"{name} must be {rule}, got {shown(value)}")
    return float(value)


def load_json(text: str, where: str, *, error: type[SinkscopeError] = ArgumentError):
    """``json.loads`` of a user's file, its two failures as one error each: not JSON, and JSON
    nested deeper than Python can parse (a ``RecursionError``, which is no ``ValueError``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise error(f"{where} nests JSON arrays or objects too deeply to be read") from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, where: str, *, error: type[SinkscopeError] = ArgumentError) -> str:
    """A text a tokenizer can read: no lone surrogate (``"\\ud800"`` in JSON, or a byte that is
    not UTF-8 in a command-line argument), which is no character and has no UTF-8 bytes."""
    m = _SURROGATE.search(text)
    if m:
        raise error(f"{where} holds a lone surrogate U+{ord(m.group()):04X} at character {m.start()}, which is not a "
                    "character (a broken \\u escape in JSON, or bytes that are not UTF-8); fix the text")
    return text


__all__ = ["ArgumentError", "check_eps", "check_float", "check_int", "check_text", "load_json", "shown"]
