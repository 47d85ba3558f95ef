"""What every launch script shares: `--help`, Hydra's config checked against our dataclasses, and one
clear message per mistake.

A failing run prints one paragraph that names the problem, from rank 0 alone when the mistake is the
same on every rank (`UsageError`), and writes the traceback to `<trainer.output_dir>/errors/rank{R}.log`
(`STEP3VL_DEBUG=1` prints it instead). Ctrl-C ends with the line saying which checkpoint a re-run of the
same command resumes from (exit code 130), as does a run stopped by SIGTERM (143, train/preemption.py).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from step3vl_train.train.checkpoint import Checkpointer
from step3vl_train.train.preemption import EXIT_CODE, Preempted
from step3vl_train.train.recipes import RECIPES, register_recipes
from step3vl_train.usage import UsageError, unknown_key

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEBUG = "STEP3VL_DEBUG"
RANK_ZERO_REPORT_S = 30.0

# Third-party deprecations we cannot act on, matched by message so that any other warning still shows.
KNOWN_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    (FutureWarning, r"`torch\.distributed\._(all_gather_base|reduce_scatter_base)` is a private function"),
)


def quiet_known_warnings() -> None:
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@functools.cache
def runnable(config_name: str) -> dict[str, list[str]]:
    """The recipes and CPU forms that apply to a script's config (those whose every key, at every depth,
    the config has), by group: {"recipe": [...], "cpu": [...]}."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        keys = leaf_keys(OmegaConf.to_container(compose(config_name)))
    recipes = [name for name in register_recipes() if covered(keys_set_by(RECIPES / f"{name}.yaml"), keys)]
    forms = sorted((CONFIGS / "cpu").glob("[!_]*.yaml"))  # `_name.yaml`: a part the forms include
    return {"recipe": recipes, "cpu": [path.stem for path in forms if covered(keys_set_by(path), keys)]}


def usage(config_name: str, doc: str) -> str:
    """The script's docstring, then the config groups its config uses with their options, and the recipes
    and CPU forms that apply to it."""
    found = runnable(config_name)
    recipes, cpu = found["recipe"], found["cpu"]
    lines = [doc.strip(), "", "Config groups (group=option):"]
    for group, default in config_groups(config_name):
        options = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
        lines.append(f"  {group:<10} {', '.join(options)} (default: {default})")
    if recipes:
        lines.append(f"  +recipe    {', '.join(recipes)} (recipes/: the paper's numbers)")
    if cpu:
        after = "after +recipe: the tiny model, and a schedule that learns on the CPU"
        lines.append(f"  +cpu       {', '.join(cpu)} ({after})")
    lines += [
        "",
        "Any key: section.key=value (configs/ holds every key with its default; unknown keys are errors).",
        "Print the composed config: --cfg job. A failed run's traceback: STEP3VL_DEBUG=1.",
    ]
    return "\n".join(lines)


def leaf_keys(config: dict, prefix: str = "") -> set[str]:
    """The dotted keys of a config's values, at every depth (a mapping that is itself a value, such as an
    empty one, counts as one)."""
    keys = set()
    for key, value in config.items():
        if isinstance(value, dict) and value:
            keys |= leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def covered(wanted: set[str], keys: set[str]) -> bool:
    """Every wanted key is one of `keys` or lies under one (a free-form mapping such as `model` or
    `reward.service.server` holds any key)."""
    return all(any(key == k or key.startswith(f"{k}.") for k in keys) for key in wanted)


def keys_set_by(path: Path) -> set[str]:
    """The dotted keys a config file sets, with those of the files of its group it includes. A key the
    composed config holds as a free-form mapping (`model`, `reward.service.server`) covers all below it."""
    config = OmegaConf.to_container(OmegaConf.load(path))
    defaults = config.pop("defaults", [])
    included = [entry for entry in defaults if isinstance(entry, str) and entry != "_self_"]
    return leaf_keys(config) | {key for name in included for key in keys_set_by(path.parent / f"{name}.yaml")}


def config_groups(config_name: str) -> list[tuple[str, str]]:
    """(group, default option) of the config's defaults list, its parents' first, as its overrides leave
    them (`override data: null` drops the group); Hydra's own left out."""
    groups: dict[str, str] = {}
    for entry in OmegaConf.load(CONFIGS / f"{config_name}.yaml").get("defaults", []):
        if isinstance(entry, str):
            if entry != "_self_":
                groups |= dict(config_groups(entry))
            continue
        ((group, option),) = entry.items()
        name = group.removeprefix("override ").split("@")[0]
        if not group.startswith("override "):
            groups[name] = option
        elif name in groups:
            if option is None:
                del groups[name]
            else:
                groups[name] = option
    return list(groups.items())


def check_arguments(arguments: list[str], renamed: dict[str, str]) -> None:
    """Mistakes Hydra would not name: a key's old name (it would only say the key is unknown), and `+cpu`
    before `+recipe` (the recipe, applied second, would undo the CPU settings)."""
    keys = [argument.lstrip("+~").split("=", 1)[0] for argument in arguments]
    for key in keys:
        for old, new in renamed.items():
            if key.startswith(old):
                raise UsageError(f"{key} is now {new}{key.removeprefix(old)} (pre-training and RL share the names)")
    if "cpu" in keys and "recipe" in keys and keys.index("cpu") < keys.index("recipe"):
        raise UsageError("give +cpu=... after +recipe=...: the recipe would otherwise override its CPU settings")


def check_composition(config_name: str, arguments: list[str]) -> None:
    """Composes the command line as Hydra will, and names its mistakes ourselves where Hydra's message would
    mislead: an unknown key gets `did you mean` (Hydra advises `+key=...`, which only moves the error),
    a recipe or CPU form that does not exist lists those this script can run, and a missing tokenizer
    names the CPU forms."""
    overrides = [argument for argument in arguments if "=" in argument and not argument.startswith(("-", "hydra."))]
    chosen = dict(o.removeprefix("+").split("=", 1) for o in overrides if o.startswith(("+recipe=", "+cpu=")))
    if chosen:
        options = runnable(config_name)
        for group, name in chosen.items():
            if name not in options[group]:
                raise UsageError(f"+{group}={name} is not one this script runs: {', '.join(options[group])}")
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        try:
            cfg = compose(config_name, overrides=overrides)
        except MissingConfigException as error:  # a config group's option that does not exist
            line = str(error).split("\n")[0]  # "In 'pretrain': Could not find 'data/nothing'"
            group, _, name = line.rsplit("'", 2)[-2].partition("/")
            options = sorted(path.stem for path in (CONFIGS / group).glob("[!_]*.yaml"))
            raise UsageError(f"{group}={name}: no such option; {group} has {', '.join(options)}") from error
        except ConfigCompositionException as error:
            cause = error.__cause__
            if not isinstance(cause, ConfigKeyError | ConfigAttributeError):
                raise UsageError(str(error).splitlines()[0]) from error
            key = str(error).split("'")[1]  # "Could not override 'trainer.max_step'."
            rest = [o for o in overrides if o.split("=", 1)[0] != key]
            raise unknown_key(key, str(cause.full_key), composed_or_default(config_name, rest)) from error
    if OmegaConf.is_missing(cfg, "tokenizer"):
        forms = runnable(config_name)["cpu"]
        raise UsageError(
            "tokenizer has no value: give tokenizer=DIR (the released model's, or an export's), or, on the CPU, "
            f"+cpu={'|'.join(forms)} (after any +recipe) for the tiny model and its tokenizer"
        )


def composed_or_default(config_name: str, overrides: list[str]) -> DictConfig:
    """The config with `overrides`, or without any where they do not compose either."""
    try:
        return compose(config_name, overrides=overrides)
    except (ConfigCompositionException, MissingConfigException):
        return compose(config_name)


def expand_shortcuts(arguments: list[str], shortcuts: dict[str, str]) -> list[str]:
    """`model=DIR` as `chat.model=DIR` and the like: a script's shortcut becomes the key it stands for before
    Hydra reads the command line, which would take `model` or `data` for a config group of configs/."""
    expanded = []
    for argument in arguments:
        key, equals, value = argument.partition("=")
        expanded.append(f"{shortcuts[key]}={value}" if equals and key in shortcuts else argument)
    return expanded


@contextmanager
def silenced_stderr(silent: bool):
    """Ranks other than 0 say nothing while Hydra composes: a bad override would be reported once a rank."""
    saved = sys.stderr
    if silent:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (restored by the task before it runs)
    try:
        yield
    finally:
        sys.stderr = saved


def launch(task: Callable[[DictConfig], None], config_name: str, doc: str, renamed: dict | None = None) -> None:
    """Runs `task` on the composed config, as `@hydra.main` would, with the help, checks and reporting above."""
    arguments = sys.argv[1:]
    if {"-h", "--help"} & set(arguments):
        print(usage(config_name, doc))
        return
    rank = int(os.environ.get("RANK", 0))
    try:
        check_arguments(arguments, renamed or {})
        register_recipes()
        check_composition(config_name, arguments)
    except UsageError as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        else:
            leave_report_to_rank_zero(error, rank)
        sys.exit(1)
    stderr = sys.stderr

    @hydra.main(config_path=str(CONFIGS), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        sys.stderr = stderr
        quiet_known_warnings()
        run_reported(task, cfg, rank)

    with silenced_stderr(rank > 0):
        main()


def run_reported(task: Callable[[DictConfig], None], cfg: DictConfig, rank: int) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own detection warns on every rank
    run_dir = OmegaConf.select(cfg, "trainer.output_dir", default=None, throw_on_resolution_failure=False)
    try:
        task(cfg)
    except (KeyboardInterrupt, Preempted) as stopped:
        interrupted = isinstance(stopped, KeyboardInterrupt)
        if rank == 0:
            hint = f" {resume_hint(Path(run_dir))}" if run_dir else ""
            print(f"\n{'interrupted' if interrupted else stopped}.{hint}", file=sys.stderr, flush=True)
        sys.exit(130 if interrupted else EXIT_CODE)
    except Exception as error:
        log = write_traceback(errors_folder(cfg) / f"rank{rank}.log")
        if os.environ.get(DEBUG):
            raise
        if rank > 0 and isinstance(error, UsageError):
            leave_report_to_rank_zero(error, rank, f"\n(traceback in {log}; {DEBUG}=1 prints it here)")
        else:
            who = f"rank {rank}: " if rank else ""
            what = str(error) if isinstance(error, UsageError) else f"{type(error).__name__}: {error}"
            print(f"error: {who}{what}\n(traceback in {log}; {DEBUG}=1 prints it here)", file=sys.stderr, flush=True)
        sys.exit(1)


def leave_report_to_rank_zero(error: UsageError, rank: int, where: str = "") -> None:
    """A mistake every rank makes is rank 0's to report. torchrun ends the other ranks as soon as one exits,
    so a rank that meets it before rank 0 does waits: rank 0's exit ends the wait (torchrun's SIGTERM, with
    the default handler by now). Should rank 0 not exit within `RANK_ZERO_REPORT_S`, this rank says it."""
    time.sleep(RANK_ZERO_REPORT_S)
    print(f"error: rank {rank}: {error}{where}", file=sys.stderr, flush=True)


def resume_hint(output_dir: Path) -> str:
    try:
        latest = Checkpointer(output_dir, keep_last=0).latest()
    except FileNotFoundError:
        latest = None
    if latest is None:
        return f"{output_dir} has no checkpoint yet: re-running the same command starts the run over."
    return f"Re-running the same command resumes from {latest} ({latest.name.replace('_', ' ')})."


def errors_folder(cfg: DictConfig) -> Path:
    """A training run's `errors/`, an evaluation's under its `out`; a script with neither (the reward-model
    service) writes to the temporary directory, not under wherever it was started."""
    for key in ("trainer.output_dir", "out"):
        folder = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if folder:
            return Path(folder) / "errors"
    return Path(tempfile.gettempdir()) / "step3vl-errors"


def write_traceback(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"step3vl-{path.name}"
    path.write_text(traceback.format_exc())
    return path
