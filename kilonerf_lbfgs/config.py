"""The command-line layer: options derived from config dataclasses, configargparse parsing,
and the scripts' error handling.

Error scheme. The library raises ``ValueError`` (a bad value) or ``FileNotFoundError`` (a
missing file) with a message that says what is wrong and names the file or the value; it
knows nothing of flags. The scripts own the flags: a bad flag value found while parsing, or a
library error raised inside :func:`for_option` (``with for_option("--image", args.image):
load_image(args.image)``), becomes a :class:`UserError` whose message names the flag, and
:func:`run_main` prints a ``UserError`` as one line ``error: ...`` and exits with code 1.
Anything else is a bug and keeps its traceback.

Options. Each config dataclass declares its fields once; :func:`add_options` turns every field
into a flag ``--name`` (type and ``nargs`` from the annotation, default from the field, help,
``choices`` and bounds from the field's ``metadata``: see :func:`option`). Values come from the
command line or from ``--config FILE`` (``key = value`` lines); :func:`parse_args` turns unknown
keys, unparseable values and out-of-range values into one :class:`UserError` line.

Config files. ``--config PATH`` is read as given. A bare name such as ``image.txt`` that is not
a file from the working folder is looked up in the ``config_dirs`` the script passed to
:func:`build_parser` (the scripts pass the repository's ``configs/`` beside them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import typing
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import configargparse


class UserError(ValueError):
    """A problem with the user's input, phrased for the command line (it names the flag):
    :func:`run_main` prints it as one line and exits 1. Raised by the CLI layer only."""


# ------------------------------------------------------------------------ option metadata

def option(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002 - argparse's name
           default_factory: Any = dataclasses.MISSING, choices: Optional[Sequence] = None,
           positive: bool = False, min: Optional[float] = None,  # noqa: A002
           max: Optional[float] = None, nargs: Any = None, metavar: Any = None,  # noqa: A002
           cli: bool = True) -> Any:
    """A dataclass field carrying its command-line description in ``metadata``.

    ``positive`` (> 0), ``min`` and ``max`` (inclusive) bound the value (None always passes);
    ``cli=False`` keeps the field off the command line. The same keys may be written by hand
    as ``dataclasses.field(default=..., metadata={"help": ..., "choices": ...})``.
    """
    meta = {"help": help, "choices": choices, "positive": positive, "min": min, "max": max,
            "nargs": nargs, "metavar": metavar, "cli": cli}
    meta = {k: v for k, v in meta.items() if v is not None and v is not False or k == "cli"}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _flag_type(hint) -> tuple:
    """``(element type, is_list)`` of an annotation: ``Optional[X]`` -> X, ``List[X]`` ->
    ``(X, True)``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple, Sequence, typing.List, typing.Tuple) or \
            (origin is not None and issubclass(origin, (list, tuple))):
        return (args[0] if args else str), True
    return hint, False


def dataclass_options(cls) -> List[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_options(parser, cls, defaults: Optional[Dict[str, Any]] = None,
                overrides: Optional[Dict[str, Dict[str, Any]]] = None,
                skip: Iterable[str] = ()) -> None:
    """Add one flag ``--name`` per option field of the dataclass ``cls``.

    A field whose flag the parser already has (e.g. ``--max_seconds`` from
    :func:`build_parser`) only sets that flag's default to the field's. ``defaults`` replaces
    field defaults; ``overrides[name]`` replaces ``add_argument`` keywords of one flag.
    The bounds in the metadata are checked by :func:`parse_args`.
    """
    defaults, overrides, skip = dict(defaults or {}), dict(overrides or {}), set(skip)
    hints = typing.get_type_hints(cls)
    existing = {a.dest for a in parser._actions}
    checks = getattr(parser, "option_checks", [])
    for f in dataclass_options(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, _field_default(f))
        meta = f.metadata
        if f.name in existing:
            parser.set_defaults(**{f.name: default})
            continue
        elem, is_list = _flag_type(hints[f.name])
        kw: Dict[str, Any] = {"default": default, "help": meta.get("help", "")}
        if elem is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = elem
            if is_list or "nargs" in meta:
                kw["nargs"] = meta.get("nargs", "+")
            for key in ("choices", "metavar"):
                if key in meta:
                    kw[key] = list(meta[key]) if key == "choices" else meta[key]
        kw.update(overrides.get(f.name, {}))
        parser.add_argument(f"--{f.name}", **kw)
        if any(k in meta for k in ("positive", "min", "max")):
            checks.append((f.name, meta.get("positive", False), meta.get("min"), meta.get("max")))
    parser.option_checks = checks


def _check_bounds(args, checks) -> None:
    for name, positive, lo, hi in checks:
        value = getattr(args, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None or not isinstance(v, (int, float)):
                continue
            if positive and not v > 0:
                raise UserError(f"--{name} must be positive, got {_show(value)}")
            if lo is not None and not v >= lo:
                raise UserError(f"--{name} must be at least {lo}, got {_show(value)}")
            if hi is not None and not v <= hi:
                raise UserError(f"--{name} must be at most {hi}, got {_show(value)}")


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def options_from_args(cls, args, **given) -> Any:
    """An instance of the dataclass ``cls`` from the parsed ``args`` (fields the parser does
    not have keep their defaults), with ``given`` values winning."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
          if f.name not in given and hasattr(args, f.name)}
    return cls(**kw, **given)


# -------------------------------------------------------------------------- the options

@dataclasses.dataclass
class RunOptions:
    """Options every script shares."""
    out_dir: str = option("outputs/run", "folder for every output of the run")
    optimizer: str = option("lbfgs", "the cells' optimiser", choices=("lbfgs", "adam"))
    lr: Optional[float] = option(None, "learning rate (Adam; default 1e-3) or first trial "
                                       "step (L-BFGS; 1)", positive=True)
    lr_schedule: str = option("constant", "Adam: constant, or cosine decay to 0 over "
                                          "--max_seconds", choices=("constant", "cosine"))
    history_size: int = option(100, "L-BFGS pairs per cell", positive=True)
    history_dtype: str = option("auto", "storage of the L-BFGS curvature pairs: bfloat16 "
                                "halves the memory each step reads (fused kernels widen the "
                                "pairs and accumulate in float32), float32 is the exact "
                                "reference, auto is bfloat16 from 32 MB of fp32 history on",
                                choices=("auto", "bfloat16", "float16", "float32"))
    line_search: str = option("strong_wolfe", "L-BFGS line search",
                              choices=("strong_wolfe", "armijo", "none"))
    device: str = option("auto", "auto: CUDA when visible, else the CPU",
                         choices=("auto", "cpu", "cuda"))
    seed: int = option(0, "random seed")
    max_seconds: float = option(60.0, "training budget in optimiser seconds", positive=True)
    max_evals: int = option(0, "also stop after this many function evaluations (0: no limit); "
                               "a budget that does not depend on the machine", min=0)
    target_psnr: Optional[float] = option(None, "stop as soon as this PSNR (dB) is reached")
    ckpt_every: float = option(30.0, "seconds of training between checkpoints", positive=True)
    resume: bool = option(False, "continue from OUT_DIR/checkpoint.pt if it exists")
    no_keep_best: bool = option(False, "end on the last parameters, not on those of the best "
                                       "quality seen during the run")
    no_progress: bool = option(False, "no progress bar")


class ArgumentParser(configargparse.ArgumentParser):
    """configargparse's parser whose errors (a bad value, an invalid choice) are a
    :class:`UserError` line instead of usage text and exit code 2."""

    def error(self, message):
        raise UserError(message)


def build_parser(description: str, default_config: Optional[str] = None,
                 psnr_target: bool = True,
                 config_dirs: Sequence[str] = (),
                 skip: Sequence[str] = ()) -> configargparse.ArgumentParser:
    """The options every script shares (:class:`RunOptions`, less those in ``skip``);
    scripts add their own with :func:`add_options` or ``parser.add_argument``. A bare
    ``--config NAME`` is also looked up in ``config_dirs``."""
    p = ArgumentParser(
        description=description,
        config_file_parser_class=configargparse.DefaultConfigFileParser,
        formatter_class=configargparse.ArgumentDefaultsHelpFormatter)
    p.config_dirs = [os.path.abspath(d) for d in config_dirs]
    where = " or in " + ", ".join(p.config_dirs) if p.config_dirs else ""
    p.add_argument("--config", is_config_file=True,
                   help=f"config file: a path from the working folder{where}")
    add_options(p, RunOptions, skip=tuple(skip) + (() if psnr_target else ("target_psnr",)))
    if default_config:
        p.set_defaults(config=default_config)
    return p


def find_config(value: str, config_dirs: Sequence[str] = ()) -> str:
    """``value`` if it is a file, else the first ``config_dirs/value`` that is one."""
    if os.path.isfile(value):
        return value
    for d in config_dirs:
        path = os.path.join(d, value)
        if os.path.isfile(path):
            return path
    where = f" here or in {', '.join(config_dirs)}" if config_dirs else ""
    raise UserError(f"--config {value}: no such file{where}")


def _resolve_config_arg(argv: List[str], config_dirs: Sequence[str]) -> List[str]:
    """Rewrite ``--config NAME`` to a path; one clear error when it cannot be found."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = find_config(out[i + 1], config_dirs)
        elif a.startswith("--config="):
            out[i] = "--config=" + find_config(a.split("=", 1)[1], config_dirs)
    return out


def parse_args(parser: configargparse.ArgumentParser,
               argv: Optional[Sequence[str]] = None):
    """Parse; unknown options or config keys, bad values and values out of their fields'
    bounds are one clear :class:`UserError` naming the flag."""
    argv = _resolve_config_arg(list(sys.argv[1:] if argv is None else argv),
                               getattr(parser, "config_dirs", ()))
    try:
        args, unknown = parser.parse_known_args(argv)
    except OSError as e:
        raise UserError(f"--config: cannot read the config file ({e})") from e
    if unknown:
        keys = sorted({u.split("=", 1)[0] for u in unknown if u.startswith("-")}) or unknown
        src = f" (config file {args.config})" if getattr(args, "config", None) else ""
        raise UserError(f"unknown option or config key {', '.join(keys)}{src}; "
                        f"see --help for the valid ones")
    _check_bounds(args, getattr(parser, "option_checks", ()))
    return args


def require_positive(args, *names: str) -> None:
    """One :class:`UserError` naming the first of ``names`` whose value is not positive."""
    _check_bounds(args, [(name, True, None, None) for name in names])
    for name in names:
        if getattr(args, name) is None:
            raise UserError(f"--{name} must be positive, got None")


@contextlib.contextmanager
def for_option(flag: str, value: Any = None):
    """Within the block, a library ``ValueError`` / ``OSError`` (missing file, bad content)
    becomes a :class:`UserError` that names ``flag`` (and ``value``, when the message does not
    already hold it)."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as e:
        msg = str(e) if not isinstance(e, OSError) or e.strerror is None or e.filename is None \
            else f"{e.strerror}: {e.filename}"
        shown = "" if value is None or str(value) in msg else f" {_show(value)}"
        raise UserError(f"{flag}{shown}: {msg}") from e


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main: a :class:`UserError` becomes one line on stderr and exit code 1.
    The C allocator is tuned first (:func:`~kilonerf_lbfgs.backends.tune_cpu_allocator`)."""
    from . import distributed           # under torchrun: leave the process group cleanly
    from .backends import tune_cpu_allocator
    tune_cpu_allocator()
    try:
        main()
        if distributed.current() is not None:
            distributed.shutdown()
            distributed.exit_process(0)
    except UserError as e:
        shards = distributed.current()
        distributed.shutdown(barrier=False)
        if shards is None or shards.is_main:         # one line, from rank 0 alone
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            print(f"error: {'; '.join(lines)}", file=sys.stderr, flush=True)
        if shards is not None:
            if not shards.is_main:
                # torchrun stops every rank once one exits with an error: give rank 0 the
                # time to write its line first
                time.sleep(2.0)
            distributed.exit_process(1)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept (continue with --resume)",
              file=sys.stderr)
        sys.exit(130)
