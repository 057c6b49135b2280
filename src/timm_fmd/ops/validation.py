"""Argument checks shared by the op, the injector and the registry.

Each raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for one out of range,
naming the argument, the value and what is accepted.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

__all__ = ['check_prob', 'check_non_negative', 'check_positive_int', 'check_choice']


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_prob(value: Any, name: str = 'prob') -> float:
    """A distortion probability: a real number in [0, 1)."""
    if not _is_real(value):
        raise TypeError(f'{name} must be a float in [0, 1), got {value!r}')
    if not 0.0 <= value < 1.0:  # NaN fails it too
        raise ValueError(f'{name} must be in [0, 1), got {value!r}')
    return float(value)


def check_non_negative(value: Any, name: str) -> float:
    """A finite real number >= 0 (step lengths, weights of penalty terms)."""
    if not _is_real(value):
        raise TypeError(f'{name} must be a finite float >= 0, got {value!r}')
    # NaN fails it too; a finite bound, as math.inf is not: dynamo folds ``value < inf`` to True for a symbolic
    # float (it assumes such floats finite) and would then accept inf at run time
    if not 0.0 <= value <= sys.float_info.max:
        raise ValueError(f'{name} must be a finite float >= 0, got {value!r}')
    return float(value)


def check_positive_int(value: Any, name: str) -> int:
    """An int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be an int >= 1, got {value!r}')
    if value < 1:
        raise ValueError(f'{name} must be an int >= 1, got {value!r}')
    return value


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """One of a fixed set of strings."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {value!r}')
    return value
