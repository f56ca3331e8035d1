"""The one exception type a user can cause; the CLI turns it into one line and exit code 2."""
from __future__ import annotations

import importlib
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
