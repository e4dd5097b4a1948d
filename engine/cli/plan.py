"""Change planning: what a proposed change would recompute, and which partitions it would reuse.

    python -m engine.cli.plan [--data-root DIR] [--configfile my.yaml] [--config seed=7 ...] [--json]

Wraps `snakemake --summary` (a dry run) on the proposed configuration: every output of the DAG is
listed with its state (rule) and whether it would be recomputed ("update pending" / missing) or reused
(exists and up to date). Since every path carries the hashes of what its bytes depend on, a change
shows up as new paths to compute, and everything else as reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from engine.cli._common import state_label
from engine.core import config as engine_config

REPO = engine_config.REPO_ROOT


def _segment(rule: str) -> str:
    """1A / 1B / report: the part of the workflow a rule belongs to (rules are named s1a_*, s1b_*, report_*)."""
    if rule.startswith("s1a_"):
        return "1A"
    if rule.startswith("s1b_"):
        return "1B"
    return "report" if rule.startswith("report_") else "other"


def summary(data_root: Path, configfiles: list[str], config_overrides: list[str], targets: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(data_root), "--rerun-triggers", "mtime", "--summary", "--cores", "1"]
    if configfiles:
        cmd += ["--configfile", *[str(Path(c).resolve()) for c in configfiles]]
    if config_overrides:
        cmd += ["--config", *config_overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(proc.returncode)
    rows = []
    lines = [ln for ln in proc.stdout.splitlines() if "\t" in ln]
    if not lines:
        return rows
    header = lines[0].split("\t")
    for ln in lines[1:]:
        rec = dict(zip(header, ln.split("\t")))
        plan = rec.get("plan", "")
        rule = rec.get("rule", "")
        rows.append({
            "path": rec["output_file"],
            "state": rule,
            "segment": _segment(rule),
            "action": "reuse" if plan == "no update" else "recompute",
            "status": rec.get("status", ""),
        })
    rows.sort(key=lambda r: (r["state"], r["path"]))
    return rows


def plan(data_root: Path, configfiles=(), config_overrides=(), targets=("all",)) -> dict:
    rows = summary(data_root, list(configfiles), list(config_overrides), list(targets))
    states = sorted({r["state"] for r in rows})
    recompute = sorted({r["state"] for r in rows if r["action"] == "recompute"})
    return {
        "recompute_states": recompute,
        "reuse_states": [s for s in states if s not in recompute],
        "outputs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.cli.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=".", help="data root of the existing run (default: .)")
    ap.add_argument("--configfile", action="append", default=[], help="proposed configuration file(s)")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="proposed overrides")
    ap.add_argument("--target", action="append", default=[], help="targets (default: all)")
    ap.add_argument("--json", action="store_true", help="print the full JSON plan")
    a = ap.parse_args(argv)
    result = plan(Path(a.data_root).resolve(), a.configfile, a.config, a.target or ["all"])
    if a.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print("states that would recompute:")
    for s in result["recompute_states"]:
        print(f"  {state_label(s):<28} {s}")
    print("states whose outputs are reused:")
    for s in result["reuse_states"]:
        print(f"  {state_label(s):<28} {s}")
    print("per dataset path:")
    for r in result["outputs"]:
        print(f"  {r['action']:<9} {r['state']:<28} {r['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
