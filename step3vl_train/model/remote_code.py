"""The code an export carries beside `config.json`, so that transformers' Auto classes open it with
`trust_remote_code` in a process that never imported step3vl_train, as they open StepFun's release.

transformers' dynamic-module loader copies the module `auto_map` names and, recursively, the modules it
imports relatively (`from .vision import ...`) from beside it. Our modules import each other absolutely, so
each is written with those imports made relative, under the released checkpoint's module name where it has
one (spec section 1.1): the model's modules come from the package's `model`, the processor's
(processing/hf_processor.py) from its `processing`, each importing only its own. The package stays the one
source: an export is written from it, or, when the model was itself loaded as remote code, from the copies
it was loaded from (whose imports are relative already).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

# A module's name in an export where the released checkpoint has a module in the same role; others keep theirs.
EXPORT_NAMES = {
    "step3vl_train.model.config": "configuration_step_vl",
    "step3vl_train.model.step3vl": "modeling_step_vl",
    "step3vl_train.processing.hf_processor": "processing_step3",
}
_RELATIVE_IMPORT = re.compile(r"^[ \t]*from \.(\w+) import", re.MULTILINE)
_ANY_PACKAGE_IMPORT = re.compile(r"^[ \t]*(?:from|import)[ \t]+step3vl_train\b.*$", re.MULTILINE)


def write_remote_code(cls: type, directory: Path) -> str:
    """Writes the module defining `cls` and every module of its package it imports, recursively, into
    `directory` with relative imports. Returns the `auto_map` reference to `cls`, "module.Class"."""
    source_file = Path(inspect.getsourcefile(cls))
    package = cls.__module__.rpartition(".")[0]
    pending, written = [source_file.stem], set()
    while pending:
        name = pending.pop()
        if name in written:
            continue
        written.add(name)
        source = (source_file.parent / f"{name}.py").read_text()
        pending += [match[2] for match in _package_import(package).finditer(source)] + _RELATIVE_IMPORT.findall(source)
        (directory / f"{export_name(package, name)}.py").write_text(relative_imports(source, name, package))
    return f"{export_name(package, source_file.stem)}.{cls.__name__}"


def export_name(package: str, module: str) -> str:
    return EXPORT_NAMES.get(f"{package}.{module}", module)


def relative_imports(source: str, module: str, package: str) -> str:
    """`source` with each `from <package>.X import ...` as `from .<X's export name> import ...`. Any other
    import of step3vl_train is an error naming `module`: the export could not run without it."""
    rewritten = _package_import(package).sub(
        lambda match: f"{match[1]}from .{export_name(package, match[2])} import", source
    )
    absolute = [match[0].strip() for match in _ANY_PACKAGE_IMPORT.finditer(rewritten)]
    if absolute:
        raise ValueError(
            f"{module}.py: {'; '.join(absolute)}: an export's code may import its own package's modules only "
            f"as `from {package}.<module> import ...`"
        )
    return rewritten


def _package_import(package: str) -> re.Pattern:
    return re.compile(rf"^([ \t]*)from {re.escape(package)}\.(\w+) import", re.MULTILINE)
