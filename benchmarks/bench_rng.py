"""Benchmark: vectorised Philox2x64-10 (engine.core.rng.philox_vec) against numpy's built-in Philox.

Prints uint64 values per second for both and their ratio (target >= 0.25), plus the speed of
``substreams_vec`` / ``merchant_u64_vec`` (the hashlib loops) and of two vectorised samplers.

    .venv/bin/python benchmarks/bench_rng.py [--n 20000000] [--repeat 5]

Our kernel gets one counter array per call (the realistic use: one block per keyed substream);
numpy's ``random_raw`` streams from a single internal counter (Philox4x64-10), so it is the
stronger baseline. Best of ``--repeat`` timings, after a warm-up call (numba compile / cache load).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core import rng, samplers  # noqa: E402


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000_000, help="uint64 values per timing")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--streams", type=int, default=1_000_000, help="rows for the substream/sampler timings")
    args = ap.parse_args()
    n = args.n - args.n % 2
    nb = n // 2  # Philox2x64 gives two values per block

    key = np.full(nb, 0x243F6A8885A308D3, np.uint64)
    hi = np.full(nb, 0x13198A2E03707344, np.uint64)
    lo = np.arange(nb, dtype=np.uint64)

    t0 = time.perf_counter()
    rng.philox_vec(key[:16], hi[:16], lo[:16])  # warm-up: compile or load the cached kernel
    warm = time.perf_counter() - t0

    t_ours = best_of(lambda: rng.philox_vec(key, hi, lo), args.repeat)
    bg = np.random.Philox(1)
    bg.random_raw(16)
    t_np = best_of(lambda: bg.random_raw(n), args.repeat)
    gen = np.random.Generator(np.random.Philox(1))
    t_np_int = best_of(lambda: gen.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False), args.repeat)

    ours = n / t_ours
    raw = n / t_np
    ints = n / t_np_int
    print(f"values per timing: {n:,} (best of {args.repeat}); kernel warm-up {warm:.2f} s")
    print(f"philox_vec (Philox2x64-10, numba)           : {ours / 1e6:8.1f} M uint64/s  ({t_ours:.3f} s)")
    print(f"numpy Philox.random_raw (Philox4x64-10, C)  : {raw / 1e6:8.1f} M uint64/s  ({t_np:.3f} s)")
    print(f"numpy Generator(Philox).integers(0, 2**64)  : {ints / 1e6:8.1f} M uint64/s  ({t_np_int:.3f} s)")
    print(f"ratio philox_vec / random_raw               : {ours / raw:.3f}   (target >= 0.25)")
    print(f"ratio philox_vec / Generator.integers       : {ours / ints:.3f}")

    # --- substreams (hashlib loops) and samplers on args.streams rows ------------------------
    m = args.streams
    fp = bytes.fromhex("991c57a380d81d7ab9ba4901efb0d0db3eb7a82af59249d7cc71017126622709")
    M = rng.master_material("1A", fp, 9248923)
    ids = np.arange(1, m + 1, dtype=np.uint64)
    t = time.perf_counter()
    mu = rng.merchant_u64_vec(ids)
    t_mu = time.perf_counter() - t
    t = time.perf_counter()
    k, h, l = rng.substreams_vec(M, "1A", "hurdle_bernoulli", mu)
    t_ss = time.perf_counter() - t
    iso = np.array(["GB", "DE", "FR", "US"])[np.arange(m) % 4]
    t = time.perf_counter()
    rng.substreams_vec(M, "1B", "in_cell_jitter", mu, iso=iso, site_order=np.ones(m, np.uint64))
    t_ss3 = time.perf_counter() - t
    print(f"merchant_u64_vec            {m:,} ids : {t_mu:.2f} s ({m / t_mu / 1e6:.2f} M/s)")
    print(f"substreams_vec (merchant)   {m:,} rows: {t_ss:.2f} s ({m / t_ss / 1e6:.2f} M/s)")
    print(f"substreams_vec (m, iso, so) {m:,} rows: {t_ss3:.2f} s ({m / t_ss3 / 1e6:.2f} M/s)")

    alpha = 0.5 + (np.arange(m) % 100) / 10.0
    lam = (np.arange(m) % 300) / 10.0
    samplers.gamma_vec(k[:8], h[:8], l[:8], alpha[:8])
    samplers.poisson_vec(k[:8], h[:8], l[:8], lam[:8])
    t_g = best_of(lambda: samplers.gamma_vec(k, h, l, alpha), 3)
    t_p = best_of(lambda: samplers.poisson_vec(k, h, l, lam), 3)
    print(f"gamma_vec   (alpha 0.5..10.4) {m:,} rows: {t_g:.3f} s ({m / t_g / 1e6:.1f} M/s)")
    print(f"poisson_vec (lambda 0..29.9)  {m:,} rows: {t_p:.3f} s ({m / t_p / 1e6:.1f} M/s)")


if __name__ == "__main__":
    main()
