"""One configargparse parser builder shared by every script, and the scripts' error handling.

Options come from the command line or from a ``--config FILE`` of ``key = value`` lines.
A bare config name such as ``--config image.txt`` that is not a path from the working folder
is also looked up in the repository's ``configs/`` folder.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional, Sequence

import configargparse

from .io import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


def build_parser(description: str, default_config: Optional[str] = None,
                 psnr_target: bool = True) -> configargparse.ArgumentParser:
    """The options every script shares; scripts add their own with ``parser.add_argument``."""
    p = configargparse.ArgumentParser(
        description=description,
        config_file_parser_class=configargparse.DefaultConfigFileParser,
        formatter_class=configargparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", is_config_file=True,
                   help="config file (a bare name is also looked up in configs/)")
    p.add_argument("--out_dir", default="outputs/run", help="folder for every output of the run")
    p.add_argument("--optimizer", default="lbfgs", choices=["lbfgs", "adam"])
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (Adam; default 1e-3) or first trial step (L-BFGS; 1)")
    p.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"],
                   help="Adam: constant, or cosine decay to 0 over --max_seconds")
    p.add_argument("--history_size", type=int, default=100, help="L-BFGS pairs per cell")
    p.add_argument("--line_search", default="strong_wolfe",
                   choices=["strong_wolfe", "armijo", "none"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_seconds", type=float, default=60.0,
                   help="training budget in optimiser seconds")
    if psnr_target:
        p.add_argument("--target_psnr", type=float, default=None,
                       help="stop as soon as this PSNR (dB) is reached")
    p.add_argument("--ckpt_every", type=float, default=30.0,
                   help="seconds of training between checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/checkpoint.pt if it exists")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    if default_config:
        p.set_defaults(config=default_config)
    return p


def _resolve_config_arg(argv: List[str]) -> List[str]:
    """Rewrite ``--config NAME`` to a path; one clear error when it cannot be found."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            idx, value = i + 1, out[i + 1]
        elif a.startswith("--config="):
            idx, value = i, a.split("=", 1)[1]
        else:
            continue
        if os.path.isfile(value):
            path = value
        elif os.path.isfile(os.path.join(CONFIG_DIR, value)):
            path = os.path.join(CONFIG_DIR, value)
        else:
            raise UserError(f"--config {value}: no such file here or in {CONFIG_DIR}")
        out[idx] = path if idx == i + 1 else f"--config={path}"
    return out


def parse_args(parser: configargparse.ArgumentParser,
               argv: Optional[Sequence[str]] = None):
    """Parse, turning unknown options or config keys into one clear :class:`UserError`."""
    argv = _resolve_config_arg(list(sys.argv[1:] if argv is None else argv))
    try:
        args, unknown = parser.parse_known_args(argv)
    except OSError as e:
        raise UserError(f"cannot read config file: {e}") from e
    if unknown:
        keys = sorted({u.split("=", 1)[0] for u in unknown if u.startswith("-")}) or unknown
        src = f" (config file {args.config})" if getattr(args, "config", None) else ""
        raise UserError(f"unknown option or config key {', '.join(keys)}{src}; "
                        f"see --help for the valid ones")
    return args


def require_positive(args, *names: str) -> None:
    for name in names:
        v = getattr(args, name)
        values = v if isinstance(v, (list, tuple)) else [v]
        if v is None or any(x is None or x <= 0 for x in values):
            raise UserError(f"--{name} must be positive, got {v}")


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main: a :class:`UserError` becomes one line on stderr and exit code 1."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept (continue with --resume)",
              file=sys.stderr)
        sys.exit(130)
