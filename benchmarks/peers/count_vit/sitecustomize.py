"""Counts the vision tower's calls in every process of a run: `benchmarks/peers_cpu.py vit` puts this folder
on PYTHONPATH (Ray's actors and the reward processes inherit it) and names a folder in PEERS_VIT_COUNTS.
Once `step3vl_train.model.vision` is imported, `StepVisionEncoder.forward` (the ViT itself, whichever model
method calls it: `encode_images`, `vision_features`, a checkpoint's recompute) is wrapped: each call appends
{"role", "views", "prints"} to PEERS_VIT_COUNTS/<pid>.jsonl. The role is the process's
title, which Ray sets to the actor and the method it runs (`ray::TrainWorker.score`), so the calls come out
by phase. `prints` has a fingerprint of each view (its side and pixel sums), so that repeated encodings of
one image are told from encodings of different ones; an all-zero view (the stand-in) prints as "zero"."""

import importlib.abc
import json
import os
import sys

TARGET = "step3vl_train.model.vision"


def _role() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            title = handle.read().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        title = ""
    return title if title.startswith("ray::") else os.path.basename(title) or "python"


def _wrap(module) -> None:
    cls = module.StepVisionEncoder
    original = cls.forward

    def forward(self, pixel_values, *args, **kwargs):
        path = os.path.join(os.environ["PEERS_VIT_COUNTS"], f"{os.getpid()}.jsonl")
        flat = pixel_values.detach().flatten(1).double()
        prints = [
            "zero"
            if not bool(view.any())
            else f"{pixel_values.shape[-1]}:{float(view.sum()):.6e}:{float(view.abs().sum()):.6e}"
            for view in flat
        ]
        with open(path, "a") as handle:
            handle.write(json.dumps({"role": _role(), "views": len(prints), "prints": prints}) + "\n")
        return original(self, pixel_values, *args, **kwargs)

    cls.forward = forward


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _wrap(module)

        loader.exec_module = exec_and_wrap
        return spec


if os.environ.get("PEERS_VIT_COUNTS"):
    import importlib.util

    sys.meta_path.insert(0, _Finder())
