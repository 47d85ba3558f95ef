"""`benchmarks/peers_cpu.py profile`: py-spy (from .venv-peers) samples every process of our pre-training
run and of our RL run, idle threads included, so that a thread waiting on a collective or on Ray counts.
A sample is a main thread's stack; its share under a root function (the step, a Ray method) is wall time.
Processes forked from a sampled one (DataLoader workers, the reward pool) carry their parent's frames
from before the fork; their samples are left out.

Reported, per root: the direct children's shares (where the root's time goes, one level down, call
wrappers skipped), and the inclusive share of the functions the issue asks about: the vision tower,
ZeRO-3's module hooks and parameter gathers, the optimizer, Ray's transport.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

FRAME = re.compile(r"^(?P<name>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")
# Inclusive shares reported under every root whose samples reach them: a frame counts where its function
# ends with the name given (None: any) and its file contains the path given (None: any).
WATCH = {
    "vision tower (encode_images)": [("encode_images", None)],
    "ZeRO-3 module hooks, all (parameter_offload.py, partitioned_param_coordinator.py)": [
        (None, "zero/parameter_offload.py"),
        (None, "zero/partitioned_param_coordinator.py"),
    ],
    "ZeRO-3 parameter all-gathers (fetch_sub_module)": [("fetch_sub_module", None)],
    "ZeRO-3 parameter release (release_sub_module)": [("release_sub_module", None)],
    "ZeRO-3 gradient reduce-scatter": [
        ("reduce_partition_and_remove_grads", None),
        ("__reduce_and_partition_ipg_grads", None),
    ],
    "optimizer step (DeepSpeedEngine.step)": [("DeepSpeedEngine.step", None)],
    "ZeRO-3 persistent-parameter gathers after the step (_post_step)": [
        ("DeepSpeedZeroOptimizer_Stage3._post_step", None)
    ],
    "gradient norm and clipping": [("get_grad_norm_direct", None), ("unscale_and_clip_grads", None)],
    "DeepSpeed's linear (zero3_linear_wrap)": [("zero3_linear_wrap", None)],
    "Ray: get / wait, object store": [
        ("get", "ray/_private/worker.py"),
        ("wait", "ray/_private/worker.py"),
        ("put", "ray/_private/worker.py"),
    ],
}
# Frames that only pass a call on (torch's module call, decorators, Ray's tracing): a child is the next
# frame that is not one of these. Matched on the last part of the name.
WRAPPERS = {
    "_wrapped_call_impl", "_call_impl", "inner", "_resume_span", "wrapper", "auto_init_wrapper", "wrapped_fn",
    "helper", "decorate_context", "apply", "_fn",
}  # fmt: skip
FORKED = "BaseProcess._bootstrap"


def record(peers_python: str, command: list[str], out: Path, log: Path, env: dict, rate: int = 200) -> None:
    """Runs `command` under py-spy (every descendant process, idle threads, by thread)."""
    spy = str(Path(peers_python).parent / "py-spy")
    wrapped = [spy, "record", "--subprocesses", "--idle", "--threads", "--nonblocking", "--format", "raw",
               "--rate", str(rate), "-o", str(out), "--", *command]  # fmt: skip
    with log.open("w") as handle:
        done = subprocess.run(wrapped, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.exit(f"py-spy over {' '.join(command[:3])} failed; the end of {log}:\n" + log.read_text()[-4000:])


def stacks(raw: Path) -> list[tuple[int, str, list[str], int]]:
    """(pid, thread name, frames root first as "Class.function", samples) per raw line; main threads only."""
    out = []
    for line in raw.read_text().splitlines():
        head, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        parts = head.split(";")
        pid, thread, frames = 0, "", []
        for part in parts:
            if part.startswith("process "):
                pid = int(part.split()[1].rstrip(":").split(":")[0])
            elif part.startswith("thread ("):
                thread = part.split(":", 1)[1].strip() if ":" in part else ""
            else:
                match = FRAME.match(part)
                frames.append(f"{match['name']}@{match['file']}" if match else part)
        if thread in ("", "MainThread") and not any(name(f) == FORKED for f in frames):
            out.append((pid, thread, frames, int(count)))
    return out


def name(frame: str) -> str:
    return frame.split("@", 1)[0]


def short(frame_name: str) -> str:
    return frame_name.rsplit(".", 1)[-1]


def matches(frame_name: str, function: str) -> bool:
    """`function` is the frame's name or its last parts (`encode_images`, `Engine.step`)."""
    return frame_name == function or frame_name.endswith("." + function)


def hit(frame: str, function: str | None, where: str | None) -> bool:
    frame_name, _, file = frame.partition("@")
    return (function is None or matches(frame_name, function)) and (where is None or where in file)


def under(samples, root: str):
    """(pid, frames below the root's innermost call, wrappers dropped, count) for samples inside `root`."""
    for pid, _, frames, count in samples:
        for index in range(len(frames) - 1, -1, -1):
            if name(frames[index]) == root:
                yield pid, [f for f in frames[index + 1 :] if short(name(f)) not in WRAPPERS], count
                break


def breakdown(samples, root: str, top: int = 12) -> tuple[int, list[tuple[str, float]], dict[str, float], set[int]]:
    """Samples inside `root` (all processes), its direct children's shares, the watch list's inclusive shares."""
    total, children, watched, pids = 0, Counter(), Counter(), set()
    for pid, below, count in under(samples, root):
        total += count
        pids.add(pid)
        children[name(below[0]) if below else "(its own code)"] += count
        for label, predicates in WATCH.items():
            if any(hit(f, fn, where) for f in below for fn, where in predicates):
                watched[label] += count
    shares = [(child, n / max(total, 1)) for child, n in children.most_common(top)]
    return total, shares, {label: n / max(total, 1) for label, n in watched.items()}, pids


def report(title: str, samples, roots: list[str], rate: int, units: int, unit: str) -> dict:
    """Prints one table per root: seconds per `unit` (samples / rate / units / processes) and the shares."""
    result = {}
    for root in roots:
        total, shares, watched, pids = breakdown(samples, root)
        if not total:
            continue
        seconds = total / rate / max(units, 1) / max(len(pids), 1)
        print(f"\n#### {title}: inside `{root}` ({len(pids)} process(es), {seconds:.3f} s a {unit} each)\n")
        print("| called from it | share |\n|---|---|")
        for child, share in shares:
            print(f"| {child} | {share:.1%} |")
        for label, share in sorted(watched.items(), key=lambda item: -item[1]):
            print(f"| *inclusive:* {label} | {share:.1%} |")
        result[root] = {"seconds_per_" + unit: seconds, "children": dict(shares), "watched": watched}
    return result


def grouped_children(samples, root: str) -> dict[str, float]:
    """Samples in each direct child of `root`, summed over the run's processes (for Ray's overhead)."""
    counts: dict[str, float] = defaultdict(float)
    for _, below, count in under(samples, root):
        counts[name(below[0]) if below else "(own)"] += count
    return counts
