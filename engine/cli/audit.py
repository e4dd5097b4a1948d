"""Runbook "Operate, audit, report": audit a finished run from its stored files alone.

    python -m engine.cli.audit --data-root runs/x --fingerprint <1A or 1B manifest_fingerprint> \\
        [--seed N] [--recompute [--scratch DIR] [--cores N]] [--segment 1A|1B|both]

Re-verifies both validation bundles and flags, re-hashes every dataset file the bundles list, re-derives
parameter_hash and manifest_fingerprint from the sealed inputs (re-hashing the input files the run config
names, when present), replays the RNG accounting, and with ``--recompute`` re-runs the workflow into a
scratch root and compares every file under ``data/`` byte for byte (see :mod:`engine.audit`).

Prints ``{"passed": bool, "checks": [{"check", "passed", "detail", "file"}, ...], ...}`` as JSON on stdout.
Exit status: 0 when every check passed, 1 when any check failed, 2 when the run cannot be located
(unknown fingerprint, several seeds without ``--seed``, ...).
"""

from __future__ import annotations

import argparse
import sys

from engine.cli._common import print_json
from engine.core.errors import EngineError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.cli.audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="data root of the run (holds data/ and logs/)")
    p.add_argument("--fingerprint", required=True, help="the run's 1A or 1B manifest_fingerprint")
    p.add_argument("--seed", type=int, help="needed only when several seeds exist under the fingerprint")
    p.add_argument("--recompute", action="store_true",
                   help="re-run the workflow from the stored run config and compare data/ byte for byte")
    p.add_argument("--scratch", help="data root for --recompute (empty or new; default: a temporary folder, removed)")
    p.add_argument("--cores", type=int, default=2, help="cores for --recompute")
    p.add_argument("--segment", choices=("1A", "1B", "both"), default="both", help="which segments to audit")
    p.add_argument("--quiet", action="store_true", help="silence the recompute's Snakemake output")
    return p


def main(argv: list[str] | None = None) -> int:
    from engine import audit as audit_mod

    a = build_parser().parse_args(argv)
    segments = ("1A", "1B") if a.segment == "both" else (a.segment,)
    try:
        verdict = audit_mod.audit(a.data_root, a.fingerprint, seed=a.seed, recompute=a.recompute,
                                  scratch=a.scratch, cores=a.cores, segments=segments, quiet=a.quiet)
    except EngineError as e:
        print(str(e), file=sys.stderr)
        print_json({"passed": False, "checks": [{"check": "locate", "passed": False,
                                                 "detail": f"{e.code}: {e.message}"
                                                 + (f" ({', '.join(map(str, e.rows))})" if e.rows else ""),
                                                 "file": e.path}]})
        return 2
    for c in verdict["checks"]:
        if not c["passed"]:
            print(f"FAILED {c['check']}: {c['detail']}" + (f" [{c['file']}]" if c["file"] else ""), file=sys.stderr)
    print_json(verdict)
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
