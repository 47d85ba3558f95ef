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
        raise unknown_key(str(error.full_key), str(error.full_key), schema, prefix) from error
    except MissingMandatoryValue as error:
        raise UsageError(f"{prefix}{error.full_key} has no value: give {prefix}{error.full_key}=...") from error
    except ValidationError as error:
        raise UsageError(f"{prefix}{error.full_key}: {str(error).splitlines()[0]}") from error
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from error


def unknown_key(key: str, missing: str, config: Any, prefix: str = "") -> UsageError:
    """The error for `key`, whose part `missing` (a prefix of it, `key` itself or a section above it) is
    not in `config`: the closest known name in its place, or the known names."""
    parent, _, name = missing.rpartition(".")
    known = list(OmegaConf.select(config, parent) if parent else config)
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        meant = f"{parent + '.' if parent else ''}{close[0]}{key.removeprefix(missing)}"
        return UsageError(f"unknown config key {prefix}{key}: did you mean {prefix}{meant}?")
    return UsageError(f"unknown config key {prefix}{key}: known: {known}")


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
