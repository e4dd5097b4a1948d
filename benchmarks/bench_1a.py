"""Benchmark: segment 1A (and optionally 1B) on a 10^6-merchant table.

Generates a merchant table of N rows (default 1,000,000) by resampling the embedded one with new,
unique uint64 ids (seeded numpy Generator: benchmark input only, never engine randomness), runs the
real workflow into a scratch data root, and prints wall time and peak memory per state from
Snakemake's benchmark files, with the ratio to the issue targets.

    .venv/bin/python benchmarks/bench_1a.py [--rows 1000000] [--root /tmp/bench1a] [--target segment1a|all]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]


def make_table(rows: int, out: Path) -> Path:
    cfg = yaml.safe_load(open(REPO / "config.yaml"))
    src = pq.read_table(REPO / cfg["segment1a"]["inputs"]["merchant_table"])
    rng = np.random.default_rng(20251009)
    idx = rng.integers(0, src.num_rows, size=rows)
    t = src.take(pa.array(idx))
    ids = np.unique(rng.integers(1, np.iinfo(np.uint64).max, size=rows * 2, dtype=np.uint64, endpoint=False))[:rows]
    rng.shuffle(ids)
    t = t.set_column(t.schema.get_field_index("merchant_id"), "merchant_id", pa.array(ids, pa.uint64()))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, out, compression="zstd")
    return out


def write_config(root: Path, table: Path, s2_policy: str | None = None) -> Path:
    """The default config with absolute paths, the generated merchant table and optionally another S2 policy."""
    cfg = yaml.safe_load(open(REPO / "config.yaml"))
    cfg["segment1a"]["inputs"]["merchant_table"] = str(table)
    for seg in ("segment1a", "segment1b"):
        for sec in ("inputs", "parameters"):
            for k, v in cfg[seg][sec].items():
                cfg[seg][sec][k] = str(v if Path(v).is_absolute() else REPO / v)
    if s2_policy:
        cfg["segment1a"]["parameters"]["s2_validation_policy.yaml"] = str(Path(s2_policy).resolve())
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--root", default="/tmp/bench1a")
    ap.add_argument("--target", default="segment1a")
    ap.add_argument("--cores", type=int, default=2)
    a = ap.parse_args()
    root = Path(a.root)
    if root.exists():
        shutil.rmtree(root)
    table = make_table(a.rows, root / "input" / "merchants.parquet")
    cfg_path = write_config(root, table)
    target = "segment1a" if a.target == "segment1a" else "all"
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "snakemake", target, "-s", str(REPO / "Snakefile"), "-d", str(root / "run"),
                         "--configfile", str(cfg_path), "--cores", str(a.cores), "--rerun-triggers", "mtime"]).returncode
    wall = time.perf_counter() - t0
    print(f"\nrows={a.rows} target={target} exit={rc} total wall (incl. Snakemake start-up) = {wall:.1f} s")
    print(f"{'state':<28}{'wall s':>10}{'max RSS MB':>12}")
    total = 0.0
    peak = 0.0
    for tsv in sorted((root / "run" / "logs" / "benchmarks").rglob("*.tsv")):
        with open(tsv) as f:
            r = next(csv.DictReader(f, delimiter="\t"))
        name = "/".join(tsv.relative_to(root / "run" / "logs" / "benchmarks").parts[:2])
        s, rss = float(r["s"]), float(r["max_rss"]) if r["max_rss"] not in ("-", "NA") else float("nan")
        total += s
        peak = max(peak, rss)
        print(f"{name:<28}{s:>10.2f}{rss:>12.0f}")
    print(f"sum of benchmarked states = {total:.1f} s, peak RSS of any state = {peak:.0f} MB")
    return rc


if __name__ == "__main__":
    sys.exit(main())
