"""Paper reproductions behind ``moekit run``.

Every module in this package that defines ``EXPERIMENT = Experiment(...)`` is an experiment; the
registry finds them by scanning the package, so adding a reproduction means adding one file
(how to write one: docs/experiments.md).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Experiment, ExperimentResult, Row, RunContext, Source, Verdict, mean_std
from .options import OptionError, option

_NOT_EXPERIMENTS = {"base", "options", "runner", "train", "verdicts"}


def available() -> dict[str, Experiment]:
    """All experiments by CLI name, in alphabetical order."""
    found: dict[str, Experiment] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _NOT_EXPERIMENTS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        exp = getattr(module, "EXPERIMENT", None)
        if isinstance(exp, Experiment):
            if exp.name in found:
                raise RuntimeError(f"two experiments are named {exp.name!r}")
            found[exp.name] = exp
    return dict(sorted(found.items()))


def get(name: str) -> Experiment:
    """The experiment called ``name``; ValueError listing the available names otherwise."""
    exps = available()
    if name not in exps:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(exps)}")
    return exps[name]


__all__ = ["Experiment", "ExperimentResult", "OptionError", "Row", "RunContext", "Source", "Verdict", "available", "get",
           "mean_std", "option"]
