"""docs/results records from finished benchmark runs: merging runs made side by side, the
run's date, machine and threads, and the ``--record`` options the benchmark scripts share."""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Callable, Dict, Sequence

import torch

from kilonerf_lbfgs.config import UserError, for_option
from kilonerf_lbfgs.io import save_json


def merge_reports(reports: Sequence[Dict], same: Sequence[str], field: str) -> Dict:
    """Runs of one benchmark made side by side (contenders split over processes) as one
    report: the keys ``same`` must agree; ``field`` (a dict or a list of contenders) is
    joined over the runs."""
    for r in reports[1:]:
        differ = [k for k in same if r.get(k) != reports[0].get(k)]
        if differ:
            raise ValueError(f"the reports were not made with the same race settings "
                             f"({', '.join(differ)} differ)")
    out = dict(reports[0])
    parts = [r[field] for r in reports]
    out[field] = ({k: v for p in parts for k, v in p.items()} if isinstance(parts[0], dict)
                  else [e for p in parts for e in p])
    return out


def machine() -> str:
    """This machine, as the records state it."""
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU, {gib:.0f} GiB, "
            f"torch {torch.__version__}")


def add_record_args(parser) -> None:
    parser.add_argument("--record", default=None,
                        help="write a docs/results record from the --from JSON files and stop")
    parser.add_argument("--from", dest="sources", nargs="+", default=None)
    parser.add_argument("--command", default=None, help="the command(s) the record states")
    parser.add_argument("--note", action="append", default=[], help="a note for the record")


def write_record(args, merge: Callable[[Sequence[Dict]], Dict],
                 to_record: Callable[..., Dict], default_command: str, **kw) -> None:
    """Read ``args.sources``, merge them, and write ``to_record(report, command=, date=,
    machine=, threads=, notes=, **kw)`` to ``args.record``. The date is the first source's
    modification date (when the run finished)."""
    if not args.sources:
        raise UserError("--record needs --from FILE ...")
    reports = []
    for path in args.sources:
        with for_option("--from", path), open(path) as f:
            reports.append(json.load(f))
    threads = sorted({str(r.get("threads")) for r in reports})
    date = datetime.datetime.fromtimestamp(os.path.getmtime(args.sources[0])).date()
    rec = to_record(merge(reports), command=args.command or default_command, date=str(date),
                    machine=machine(), notes=args.note,
                    threads=f"{threads[0]} per process" if len(threads) == 1 else str(threads),
                    **kw)
    save_json(args.record, rec)
    print(f"wrote {args.record}")


def concat_rows(reports: Sequence[Dict]) -> Dict:
    """Reports of one benchmark run in parts: the first report with every part's rows."""
    return {**reports[0], "rows": [r for rep in reports for r in rep["rows"]]}


def add_run_args(parser, name: str) -> None:
    """``--threads``, ``--out bench/NAME.json`` and ``--runs_dir bench/NAME``."""
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads per process (OMP_NUM_THREADS of the runs)")
    parser.add_argument("--out", default=os.path.join("bench", f"{name}.json"))
    parser.add_argument("--runs_dir", default=os.path.join("bench", name))


def run_script(cmd: Sequence[str], threads: int, what: str) -> float:
    """Run a command (a script as a user runs it) with ``threads`` threads; its wall seconds.
    A failure becomes a :class:`UserError` with the command's last line of output."""
    import subprocess
    import time
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout or "no output").strip().splitlines()
        raise UserError(f"{what} failed: {lines[-1] if lines else 'no output'}")
    return time.time() - t0

# where a record written by a benchmark script's --record option comes from
PROVENANCE = ("the script's JSON output (bench/, not committed), turned into this record by its "
              "--record option")
