"""Benchmark: segment 1B states S3..S9 on the 10^6-merchant table (issue target: >= 200,000 sites/s end to
end on 2 cores, S1 and S2 reused; peak memory < 8 GB).

Builds the merchant table exactly as ``benchmarks/bench_1a.py`` does (its ``make_table``), runs 1A (target
``segment1a``) and then 1B (rule ``s1b_s9_validation``: S0..S9) through the real workflow into a scratch data
root, and prints per 1B state S3..S9 the wall time and max RSS from Snakemake's benchmark files, the number
of sites (rows of ``site_locations``), the S3..S9 sum, sites/s and the ratios to the targets.

    .venv/bin/python benchmarks/bench_1b.py [--rows 1000000] [--root /tmp/bench1b] [--cores 2]
    .venv/bin/python benchmarks/bench_1b.py --root /tmp/bench1b --reuse-1a   # iterate on 1B S3..S9 only

``--reuse-1a`` keeps an existing root's 1A outputs and 1B S0..S2, deletes 1B S3..S9 outputs (datasets, the
1B RNG event logs of S5/S6 and the 1B trace, done markers, job logs, benchmark files) and re-runs 1B: the
Snakemake wall of that invocation is S3..S9 end to end (plus Snakemake's own start-up).

Notes. The code digest is part of 1A's manifest_fingerprint: after any change to ``engine/`` (or rules,
contracts) the root's 1A outputs no longer match the new identities and ``--reuse-1a`` re-runs 1A too. The first
run of new code also compiles its numba kernels (cached after): run twice and read the second. CPU time
(user + sys, all threads) is the steadier figure on a shared machine; "written MB" is what the state wrote to
disk (Snakemake's io_out), which bounds S5/S6 (~2.7 KB of JSONL event + trace lines per site).

A state whose rule declares no ``benchmark:`` file is reported from its job log (``[1B.Sx] done in ...``:
in-process time, interpreter start-up excluded) with RSS unknown.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
STATES = ("s3", "s4", "s5", "s6", "s7", "s8", "s9")
TARGET_SITES_PER_S = 200_000
TARGET_RSS_MB = 8 * 1024
# 1B datasets written by S3..S9 (dictionary ids); S0..S2 and the RNG audit row are kept
DATASETS_S3_S9 = ("s3_requirements", "s4_alloc_plan", "s5_site_tile_assignment", "s6_site_jitter",
                  "s7_site_synthesis", "site_locations", "validation_bundle_1B")
FAMILIES_1B = ("site_tile_assign", "in_cell_jitter")


def _bench_1a():
    spec = importlib.util.spec_from_file_location("bench_1a", REPO / "benchmarks" / "bench_1a.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ids_and_dictionary(cfg_path: Path, run: Path):
    """1B identities and dictionary of this root, resolved as the Snakefile does."""
    sys.path.insert(0, str(REPO))
    from engine.core import config as engine_config
    from engine.core import dictionary, identities

    cfg = engine_config.resolve(yaml.safe_load(open(cfg_path)), REPO)
    cache = run / ".snakemake" / "identity-cache.json"
    r1a = identities.resolve_1a(cfg, REPO, cache)
    r1b = identities.resolve_1b(cfg, REPO, r1a, cache)
    d = dictionary.load("1B", cfg)
    toks = {"seed": r1b.seed, "parameter_hash": r1b.parameter_hash, "manifest_fingerprint": r1b.manifest_fingerprint,
            "run_id": r1b.run_id, "grid_hash": r1b.grid_hash, "weights_hash": r1b.weights_hash}
    return r1b, d, toks


def clear_s3_s9(cfg_path: Path, run: Path) -> list[Path]:
    """Delete what 1B S3..S9 wrote in ``run`` (see module docstring); returns the removed paths."""
    r1b, d, toks = ids_and_dictionary(cfg_path, run)
    gone: list[Path] = []

    def rm(p: Path) -> None:
        if p.is_dir():
            shutil.rmtree(p)
            gone.append(p)
        elif p.exists():
            p.unlink()
            gone.append(p)

    for ds in DATASETS_S3_S9:
        rm(run / d.path(ds, **toks).rstrip("/"))
    for fam in FAMILIES_1B:
        rm(run / d.path("rng_event", family=fam, **toks).rstrip("/"))
    trace = run / d.path("rng_trace_log", **toks)
    rm(trace.parent)  # the 1B trace holds S5/S6 rows only (its mirrors and lock live beside it)
    tail = f"seed={r1b.seed}/parameter_hash={r1b.parameter_hash}/run_id={r1b.run_id}"
    for st in ("s5", "s6"):
        rm(run / "logs" / "states" / "1B" / st / tail)
    for st in STATES:
        for kind in ("benchmarks", "jobs"):
            for p in sorted((run / "logs" / kind / "1B" / st).glob("**/*")):
                if p.is_file():
                    rm(p)
    return gone


def snakemake(target: str, cfg_path: Path, run: Path, cores: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "snakemake", target, "-s", str(REPO / "Snakefile"), "-d", str(run),
                         "--configfile", str(cfg_path), "--cores", str(cores), "--rerun-triggers", "mtime"]).returncode
    return rc, time.perf_counter() - t0


def _num(r: dict, k: str) -> float | None:
    v = r.get(k)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def state_figures(run: Path) -> dict[str, dict]:
    """state -> {wall, rss (MB), cpu (s), io_out (MB), source} from the benchmark tsv, else the job log (wall
    only). CPU time is the steadier figure on a shared machine; io_out shows what the disk had to take."""
    out = {}
    for st in STATES:
        tsvs = sorted((run / "logs" / "benchmarks" / "1B" / st).glob("**/*.tsv"))
        if tsvs:
            with open(tsvs[-1]) as f:
                r = next(csv.DictReader(f, delimiter="\t"))
            out[st] = {"wall": float(r["s"]), "rss": _num(r, "max_rss"), "cpu": _num(r, "cpu_time"),
                       "io_out": _num(r, "io_out"), "source": "tsv"}
            continue
        logs = sorted((run / "logs" / "jobs" / "1B" / st).glob("**/*.log"))
        if logs:
            m = re.search(r"\] done in ([0-9.]+)s", logs[-1].read_text(errors="replace"))
            if m:
                out[st] = {"wall": float(m.group(1)), "rss": None, "cpu": None, "io_out": None,
                           "source": "job log"}
    return out


def count_sites(cfg_path: Path, run: Path) -> int:
    _, d, toks = ids_and_dictionary(cfg_path, run)
    sl = run / d.path("site_locations", **toks).rstrip("/")
    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(sl.glob("part-*.parquet")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--root", default="/tmp/bench1b")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--reuse-1a", action="store_true",
                    help="keep the root's 1A and 1B S0..S2 outputs; delete and re-run 1B S3..S9")
    ap.add_argument("--s2-policy", default=None,
                    help="a replacement s2_validation_policy.yaml (only if 1A S9 fails its corridors at 10^6)")
    a = ap.parse_args()
    root = Path(a.root)
    run = root / "run"
    cfg_path = root / "config.yaml"
    wall_1a = None
    if a.reuse_1a:
        if not cfg_path.exists():
            print(f"--reuse-1a: {cfg_path} not found (run once without --reuse-1a)", file=sys.stderr)
            return 2
        gone = clear_s3_s9(cfg_path, run)
        print(f"reuse: removed {len(gone)} 1B S3..S9 paths under {run}", file=sys.stderr)
    else:
        if root.exists():
            shutil.rmtree(root)
        table = _bench_1a().make_table(a.rows, root / "input" / "merchants.parquet")
        cfg_path = _bench_1a().write_config(root, table, a.s2_policy)
        rc, wall_1a = snakemake("segment1a", cfg_path, run, a.cores)
        if rc:
            print(f"1A failed (exit {rc}); if 1A S9 failed its S2 corridors, re-run with --s2-policy", file=sys.stderr)
            return rc
    rc, wall_1b = snakemake("s1b_s9_validation", cfg_path, run, a.cores)
    figs = state_figures(run)
    sites = count_sites(cfg_path, run) if rc == 0 else 0
    print()
    if wall_1a is not None:
        print(f"1A (segment1a) wall incl. Snakemake start-up = {wall_1a:.1f} s")
    what = "S3..S9" if a.reuse_1a else "S0..S9 (S1/S2 included when not cached)"
    print(f"1B {what} Snakemake wall incl. start-up = {wall_1b:.1f} s, exit {rc}")
    print(f"{'state':<8}{'wall s':>10}{'max RSS MB':>12}{'CPU s':>9}{'written MB':>12}  source")
    total = cpu = peak = 0.0
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    for st in STATES:
        if st not in figs:
            print(f"1B/{st:<5}{'-':>10}{'-':>12}{'-':>9}{'-':>12}  (no figures)")
            continue
        g = figs[st]
        total += g["wall"]
        cpu += g["cpu"] or 0.0
        peak = max(peak, g["rss"] or 0.0)
        print(f"1B/{st:<5}{g['wall']:>10.2f}{fmt(g['rss'], '.0f'):>12}{fmt(g['cpu'], '.2f'):>9}"
              f"{fmt(g['io_out'], '.0f'):>12}  {g['source']}")
    print(f"sites (rows of site_locations) = {sites:,}")
    if total > 0 and sites:
        rate = sites / total
        print(f"S3..S9 sum = {total:.1f} s (CPU {cpu:.1f} s) -> {rate:,.0f} sites/s = "
              f"{rate / TARGET_SITES_PER_S:.2f}x the {TARGET_SITES_PER_S:,}/s target")
        if a.reuse_1a:
            print(f"S3..S9 Snakemake wall = {wall_1b:.1f} s -> {sites / wall_1b:,.0f} sites/s = "
                  f"{sites / wall_1b / TARGET_SITES_PER_S:.2f}x the target")
    print(f"peak RSS of any S3..S9 state (tsv) = {peak:.0f} MB = {peak / TARGET_RSS_MB:.2f}x the 8 GB limit")
    missing = [st for st in STATES if figs.get(st, {}).get("source") != "tsv"]
    if missing:
        print(f"note: no benchmark tsv for {', '.join(missing)} (their rules declare no benchmark:); wall from "
              "the job log, RSS unknown")
    return rc


if __name__ == "__main__":
    sys.exit(main())
