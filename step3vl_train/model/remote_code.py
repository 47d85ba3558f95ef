"""The code an export carries beside `config.json`, so that transformers' Auto classes open it with
`trust_remote_code` in a process that never imported step3vl_train, as they open StepFun's release.

transformers' dynamic-module loader copies the module `auto_map` names and, recursively, the modules it
imports relatively (`from .vision import ...`) from beside it. Our modules import each other absolutely, so
each is written with those imports made relative, under the released checkpoint's module name where it has
one (spec section 1.1). The package stays the one source: an export is written from it, or, when the model
was itself loaded as remote code, from the copies it was loaded from (whose imports are relative already).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

# A module's name in an export where the released checkpoint has a module in the same role; others keep theirs.
EXPORT_NAMES = {"config": "configuration_step_vl", "step3vl": "modeling_step_vl"}
_PACKAGE_IMPORT = re.compile(r"^([ \t]*)from step3vl_train\.model\.(\w+) import", re.MULTILINE)
_RELATIVE_IMPORT = re.compile(r"^[ \t]*from \.(\w+) import", re.MULTILINE)
_ANY_PACKAGE_IMPORT = re.compile(r"^[ \t]*(?:from|import)[ \t]+step3vl_train\b.*$", re.MULTILINE)


def write_remote_code(cls: type, directory: Path) -> str:
    """Writes the module defining `cls` and every module of its package it imports, recursively, into
    `directory` with relative imports. Returns the `auto_map` reference to `cls`, "module.Class"."""
    source_file = Path(inspect.getsourcefile(cls))
    pending, written = [source_file.stem], set()
    while pending:
        name = pending.pop()
        if name in written:
            continue
        written.add(name)
        source = (source_file.parent / f"{name}.py").read_text()
        pending += [match[2] for match in _PACKAGE_IMPORT.finditer(source)] + _RELATIVE_IMPORT.findall(source)
        (directory / f"{export_name(name)}.py").write_text(relative_imports(source, name))
    return f"{export_name(source_file.stem)}.{cls.__name__}"


def export_name(module: str) -> str:
    return EXPORT_NAMES.get(module, module)


def relative_imports(source: str, module: str) -> str:
    """`source` with each `from step3vl_train.model.X import ...` as `from .<X's export name> import ...`.
    Any other import of step3vl_train is an error naming `module`: the export could not run without it."""
    rewritten = _PACKAGE_IMPORT.sub(lambda match: f"{match[1]}from .{export_name(match[2])} import", source)
    absolute = [match[0].strip() for match in _ANY_PACKAGE_IMPORT.finditer(rewritten)]
    if absolute:
        raise ValueError(
            f"{module}.py: {'; '.join(absolute)}: an export's code may import its own package's modules only "
            "as `from step3vl_train.model.<module> import ...`"
        )
    return rewritten
