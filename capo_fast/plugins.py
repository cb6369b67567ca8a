"""User code named in a config as `module:function` (a verifier, a step splitter, a critic)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from capo_fast.errors import ConfigError

SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_callable_spec(spec: str) -> bool:
    return bool(SPEC.match(spec))


def load_callable(spec: str, key: str) -> Callable:
    """The function `module:function` names; errors name the config key."""
    if not is_callable_spec(spec):
        raise ConfigError(f"{key}: {spec!r} is not module:function")
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {module_name} has no function {name!r}")
    return fn
