"""The one exception type a user can cause; the CLI turns it into one line and exit code 2."""
from __future__ import annotations

import importlib
import math
import numbers
from types import ModuleType


class UserError(Exception):
    """Bad input from the user (file, argument, backend). The message names the fix."""


def require_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, which the `fastddpm[extra]` install brings; without it, a UserError that
    says so (the base install samples from the bundled model and needs none of the extras)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs {module.split('.')[0]}; pip install 'fastddpm[{extra}]'") from None


def is_integer(value: object) -> bool:
    """An int of any kind (numpy's too), not a bool: what a config's count fields must be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
