"""Benchmark: the RNG log layer (engine.core.rnglog) at 10^6 events.

Prints events/s for writing (``add_events`` + ``close``: event JSONL lines, their cumulative trace rows,
and the columnar mirrors) and reading (``read_events`` full / two columns / forced JSONL parse,
``read_trace``, ``reconcile``), plus one append into a trace that already holds the first family's rows
(the S2..S8 situation). Synthetic inputs: a seeded numpy Generator (benchmark data only, never engine
randomness). Wall and CPU time are both shown: on a shared 2-core box wall is the noisier one.

    .venv/bin/python benchmarks/bench_rnglog.py [--events 1000000] [--root /tmp/bench_rnglog]
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.core import rnglog as R  # noqa: E402
from engine.core.context import SegmentIds  # noqa: E402

IDS = SegmentIds("1A", 9248923, "a" * 64, "b" * 64, "c" * 32)
CODE = "0123456789abcdef" * 4


def hurdle_columns(n: int, rng: np.random.Generator) -> dict:
    """S1-like hurdle_bernoulli events: one per merchant, one block each."""
    mid = np.sort(rng.choice(np.arange(1, 50 * n, dtype=np.uint64), size=n, replace=False))
    bh = rng.integers(0, 2 ** 63, n, dtype=np.uint64)
    bl = rng.integers(0, 2 ** 63, n, dtype=np.uint64)
    pi = rng.random(n)
    u = rng.random(n)
    one = np.ones(n, np.uint64)
    return dict(merchant_id=mid, before_hi=bh, before_lo=bl, after_hi=bh, after_lo=bl + one, blocks=one,
                draws=one, pi=pi, u=u, is_multi=u < pi, deterministic=np.zeros(n, bool))


def sequence_columns(n: int, rng: np.random.Generator) -> dict:
    """S8-like sequence_finalize events: non-consuming, string payload."""
    mid = np.sort(rng.integers(1, 2 ** 63, n, dtype=np.uint64))
    bh = rng.integers(0, 2 ** 63, n, dtype=np.uint64)
    bl = rng.integers(0, 2 ** 63, n, dtype=np.uint64)
    z = np.zeros(n, np.uint64)
    cnt = rng.integers(1, 40, n)
    iso = pa.array(rng.choice(["DE", "FR", "GB", "US", "IE", "NL"], n))
    end = pa.array(np.char.zfill(cnt.astype(str), 6))
    return dict(merchant_id=mid, before_hi=bh, before_lo=bl, after_hi=bh, after_lo=bl, blocks=z, draws=z,
                country_iso=iso, site_count=cnt, start_sequence="000001", end_sequence=end)


def timed(label: str, n: int, fn, cached: bool = False):
    if not cached:  # the first read of a file in a process hashes it (the per-process digest cache is cleared)
        getattr(R, "_VERIFIED", {}).clear()
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    print(f"{label:<52}{wall:>8.2f} s wall {n / wall:>12,.0f} ev/s wall {n / max(cpu, 1e-9):>12,.0f} ev/s CPU")
    return out


def write(root: Path, family: str, module: str, label: str, cols: dict) -> None:
    logs = R.RngLogs(root, "1A", IDS)
    logs.add_events(family, module, label, cols)
    logs.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--root", default="/tmp/bench_rnglog")
    a = ap.parse_args()
    n = a.events
    root = Path(a.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(20251009)
    h = hurdle_columns(n, rng)
    s = sequence_columns(n, rng)
    logs = R.RngLogs(root, "1A", IDS)
    logs.write_audit(build_commit=CODE)
    # warm-up: numba kernels (cached on disk after the first run)
    R.RngLogs(root / "warm", "1A", IDS).write_audit(build_commit=CODE)
    write(root / "warm", "hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli",
          {k: v[:100] for k, v in h.items()})
    R.read_events(root / "warm", IDS, "hurdle_bernoulli")
    print(f"rnglog benchmark: {n:,} events per family, root {root}")
    timed("write hurdle_bernoulli (empty trace)", n,
          lambda: write(root, "hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", h))
    timed("write sequence_finalize (trace already 1e6 rows)", n,
          lambda: write(root, "sequence_finalize", "1A.site_id_allocator", "sequence_finalize", s))
    timed("re-write sequence_finalize (re-run: trace rewrite)", n,
          lambda: write(root, "sequence_finalize", "1A.site_id_allocator", "sequence_finalize", s))
    jsonl = (R.event_dir(root, IDS, "hurdle_bernoulli") / "part-00000.jsonl").stat().st_size
    print(f"  hurdle_bernoulli part: {jsonl / 1e6:,.0f} MB JSONL")
    t = timed("read_events hurdle_bernoulli (all columns)", n, lambda: R.read_events(root, IDS, "hurdle_bernoulli"))
    assert t.num_rows == n and np.array_equal(t["u"].to_numpy(), h["u"])
    timed("read_events hurdle_bernoulli [merchant_id, is_multi]", n,
          lambda: R.read_events(root, IDS, "hurdle_bernoulli", columns=["merchant_id", "is_multi"]))
    if hasattr(R, "_VERIFIED"):
        time.sleep(max(0.0, 2.1 - (time.time() - R.event_dir(root, IDS, "hurdle_bernoulli").stat().st_mtime)))
        R.read_events(root, IDS, "hurdle_bernoulli", columns=["merchant_id"])  # settled: digest remembered
        timed("  same, second read in the process (digest cached)", n,
              lambda: R.read_events(root, IDS, "hurdle_bernoulli", columns=["merchant_id", "is_multi"]), cached=True)
    if "source" in inspect.signature(R.read_events).parameters:
        t2 = timed("read_events hurdle_bernoulli (source='jsonl')", n,
                   lambda: R.read_events(root, IDS, "hurdle_bernoulli", source="jsonl"))
        assert t2.equals(t)
    timed("read_events sequence_finalize (all columns)", n, lambda: R.read_events(root, IDS, "sequence_finalize"))
    tr = timed(f"read_trace ({2 * n:,} rows)", 2 * n, lambda: R.read_trace(root, IDS))
    assert tr.num_rows == 2 * n
    f = timed("reconcile hurdle_bernoulli + sequence_finalize", 2 * n,
              lambda: R.reconcile(root, IDS, families=["hurdle_bernoulli", "sequence_finalize"]))
    assert f == [], f
    return 0


if __name__ == "__main__":
    sys.exit(main())
