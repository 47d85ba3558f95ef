"""Mistakes in a command or a config: the error type the launch scripts report as one paragraph, and the
check that turns a config section into its dataclass."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError


class UsageError(ValueError):
    """A mistake in the command or the config. Every rank makes it alike, so rank 0 alone reports it."""


def build(cls: type, values: Any, prefix: str = "") -> Any:
    """`cls` (a dataclass) filled from `values`, with any unknown key, wrong type or invalid value turned
    into a UsageError that names the key and, for a misspelling, the key that was meant."""
    schema = OmegaConf.structured(cls)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, values))
    except ConfigKeyError as error:
        key = f"{prefix}{error.full_key}"
        parent, _, name = str(error.full_key).rpartition(".")
        known = list(OmegaConf.select(schema, parent) if parent else schema)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {prefix}{parent + '.' if parent else ''}{close[0]}?" if close else f"known: {known}"
        raise UsageError(f"unknown config key {key}: {hint}") from error
    except MissingMandatoryValue as error:
        raise UsageError(f"{prefix}{error.full_key} has no value: give {prefix}{error.full_key}=...") from error
    except ValidationError as error:
        raise UsageError(f"{prefix}{error.full_key}: {str(error).splitlines()[0]}") from error
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from error


def import_callable(path: str, key: str) -> Any:
    """The callable a config names as `package.module:name` (a user's reward, parser or backend class); a
    path that is malformed, does not import or names something not callable is a UsageError naming `key`."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise UsageError(f"{key} must be 'package.module:name', not {path!r}")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"{key}={path} cannot be imported: {error}") from error
    if not callable(found):
        raise UsageError(f"{key}={path} is not callable")
    return found
