"""An experiment's data set-up: typed synth and prepare steps run by the library, never the CLI.

The ``data_setup`` section of an experiment YAML::

    data_setup:
      synth:                                   # data.synth.generate(SynthConfig(...), out, workers)
        out: artifacts/synth_preset/raw
        rows_train: 600000
        seed: 7                                # any SynthConfig field; the rest keep their defaults
      prepare:                                 # data.prepare.prepare(PrepareOptions(...))
        raw_dir: artifacts/synth_preset/raw
        out_dir: artifacts/synth_preset/prepared

Both steps are optional; they run once, when ``<run.data.prepared_dir>/manifest.json`` is missing.
Every key is checked when the experiment loads (a typo names the valid keys) by building the
:class:`SynthConfig` and :class:`PrepareOptions` the steps will run with.

The former layout -- a list of ``ctnocvr`` command lines (``[data, synth, --out, DIR, ...]``,
``[data, prepare, ...]``) -- still loads: :func:`steps_from_command_lines` parses each line with
the data commands' own argument parsers into the same typed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctnocvr_rec.config import ConfigError, from_dict

#: keys of the synth step besides the SynthConfig fields
SYNTH_STEP_KEYS = ("out", "workers")
#: SynthConfig fields an experiment may not set (the generator fills them in)
_SYNTH_INTERNAL = ("derived",)


@dataclass
class SynthStep:
    out: str
    config: Any  # SynthConfig
    workers: int = 1


def synth_config(values: dict[str, Any], where: str) -> Any:
    """A range-checked :class:`SynthConfig` of ``values`` (SynthConfig fields only)."""
    from ctnocvr_rec.data.synth import SynthConfig

    bad = [k for k in values if k in _SYNTH_INTERNAL]
    if bad:
        raise ConfigError(f"{where}: {bad} is filled in by the generator, not a setting")
    return from_dict(SynthConfig, values, where)


def synth_step(values: dict[str, Any], where: str) -> SynthStep:
    """The typed synth step of a ``data_setup.synth`` mapping (``out`` required)."""
    values = dict(values)
    out = values.pop("out", "")
    workers = values.pop("workers", 1)
    if not out:
        raise ConfigError(f"{where}: 'out' (the raw files' folder) is required")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{where}.workers: expected an integer >= 1, got {workers!r}")
    return SynthStep(out=str(out), config=synth_config(values, where), workers=workers)


def prepare_options(values: dict[str, Any], where: str) -> Any:
    """A :class:`PrepareOptions` of a ``data_setup.prepare`` mapping (``raw_dir``, ``out_dir`` required)."""
    from ctnocvr_rec.data.prepare import PrepareOptions

    missing = [k for k in ("raw_dir", "out_dir") if not values.get(k)]
    if missing:
        raise ConfigError(f"{where}: {missing} required")
    return from_dict(PrepareOptions, values, where)


def validate(setup: Any, where: str) -> None:
    """Build both steps of a :class:`~ctnocvr_rec.experiments.spec.DataSetup` (errors name the key)."""
    if setup.synth:
        synth_step(setup.synth, f"{where}: data_setup.synth")
    if setup.prepare:
        prepare_options(setup.prepare, f"{where}: data_setup.prepare")


def steps_from_command_lines(lines: list[Any], where: str) -> dict[str, dict[str, Any]]:
    """The typed ``{synth: {...}, prepare: {...}}`` of the former list of ``ctnocvr data ...`` lines."""
    from ctnocvr_rec.data import prepare as prepare_mod
    from ctnocvr_rec.data import synth as synth_mod

    steps: dict[str, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        here = f"{where}: data_setup[{i}]"
        if not isinstance(line, (list, tuple)) or len(line) < 2 or [str(a) for a in line[:2]] not in (
            ["data", "synth"], ["data", "prepare"]
        ):
            raise ConfigError(f"{here}: expected a mapping {{synth: ..., prepare: ...}} or a list of "
                              f"[data, synth, ...] / [data, prepare, ...] command lines, got {line!r}")
        command = str(line[1])
        if command in steps:
            raise ConfigError(f"{here}: a second 'data {command}' line; a set-up has one of each")
        module = synth_mod if command == "synth" else prepare_mod
        parser = _Parser(prog=f"data_setup[{i}] ctnocvr data {command}", add_help=False)
        module.add_arguments(parser)
        try:
            args = parser.parse_args([str(a) for a in line[2:]])
        except ValueError as e:
            raise ConfigError(f"{here}: {e}") from None
        if command == "synth":
            cfg = synth_mod.config_from_args(args)
            fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _SYNTH_INTERNAL}
            steps["synth"] = {"out": args.out, "workers": args.workers, **fields}
        else:
            steps["prepare"] = dataclasses.asdict(prepare_mod.options_from_args(args))
    return steps


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting (a bad legacy line is a config error, not an exit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def run_data_setup(exp: Any, log: Callable[[str], None] | None = None) -> None:
    """Make the prepared data set with the experiment's steps if its manifest is missing."""
    from ctnocvr_rec.data.prepare import prepare
    from ctnocvr_rec.data.prepared import PreparedSet
    from ctnocvr_rec.data.synth import generate
    from ctnocvr_rec.experiments.spec import build_run_config

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    prepared = Path(build_run_config(exp, {}).data.prepared_dir)
    setup = exp.data_setup
    if PreparedSet.exists(prepared) or not (setup.synth or setup.prepare):
        return
    if setup.synth:
        step = synth_step(setup.synth, f"{exp.source}: data_setup.synth")
        log(f"[{exp.name}] data set-up: synth -> {step.out}")
        generate(step.config, step.out, workers=step.workers)
    if setup.prepare:
        opts = prepare_options(setup.prepare, f"{exp.source}: data_setup.prepare")
        log(f"[{exp.name}] data set-up: prepare {opts.raw_dir} -> {opts.out_dir}")
        prepare(opts)
    if not PreparedSet.exists(prepared):
        raise FileNotFoundError(f"{exp.source}: data_setup ran but {prepared}/manifest.json does not exist "
                                "(does data_setup.prepare.out_dir match run.data.prepared_dir?)")
