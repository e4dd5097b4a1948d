#!/usr/bin/env python
"""Benchmark 1B S1 (tile_index, tile_bounds) + S2 (tile_weights) on a 30 arc-second global grid.

    .venv/bin/python benchmarks/bench_1b_s1_s2.py [--scratch /tmp/bench_1b] [--workers 2] [--basis population]

1. Builds a 43,200 x 21,600 float32 GeoTIFF (deflate, 512 x 512 tiles) in the scratch dir by resampling the
   shipped 5' population raster: each 5' cell becomes 10 x 10 cells of 1/100 of its value (totals kept;
   NODATA kept). Reused on later runs if present (its build time is reported separately).
2. Runs S1 then S2 through their ``run_with_report`` functions with a hand-built ``RunContext`` (shipped
   polygons, ``grid_hash``/``weights_hash`` from ``engine.core.identities``), ``workers`` processes.
3. Prints tiles emitted, wall and CPU time per state, peak memory (max over time of the summed RSS of this
   process and its children, sampled from /proc every 20 ms, plus ``ru_maxrss``), and bytes written.

Targets (issue): S1 + S2 under 2 minutes on 2 cores, peak memory under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

FACTOR = 10  # 5' -> 30"


def build_30s_raster(src: Path, dst: Path) -> float:
    import rasterio
    from rasterio.transform import Affine
    from rasterio.windows import Window

    t0 = time.perf_counter()
    with rasterio.open(src) as s:
        data = s.read(1)
        nodata = s.nodata
        t = s.transform
    h, w = data.shape[0] * FACTOR, data.shape[1] * FACTOR
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": "float32", "crs": "EPSG:4326",
        "transform": Affine(t.a / FACTOR, 0.0, t.c, 0.0, t.e / FACTOR, t.f), "nodata": nodata,
        "compress": "deflate", "tiled": True, "blockxsize": 512, "blockysize": 512, "BIGTIFF": "YES",
    }
    tmp = dst.with_suffix(".partial.tif")
    dst.parent.mkdir(parents=True, exist_ok=True)
    band = 512  # output rows per write (block aligned)
    with rasterio.open(tmp, "w", **profile) as d:
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            src_rows = np.arange(r0, r1) // FACTOR
            block = data[src_rows]
            block = np.where(block == nodata, block, block / np.float32(FACTOR * FACTOR)).astype(np.float32)
            d.write(np.repeat(block, FACTOR, axis=1), 1, window=Window(0, r0, w, r1 - r0))
    os.replace(tmp, dst)
    return time.perf_counter() - t0


class PeakRSS:
    """Max over time of the summed VmRSS of this process and all its descendants (from /proc)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree_rss(root: int) -> int:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/status") as f:
                    ppid = None
                    kb = 0
                    for line in f:
                        if line.startswith("PPid:"):
                            ppid = int(line.split()[1])
                        elif line.startswith("VmRSS:"):
                            kb = int(line.split()[1])
                children.setdefault(ppid, []).append(int(d))
                rss[int(d)] = kb
            except (OSError, ValueError):
                continue
        total, stack = 0, [root]
        while stack:
            p = stack.pop()
            total += rss.get(p, 0)
            stack.extend(children.get(p, []))
        return total * 1024

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss(me))
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._stop.clear()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def cpu_seconds() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/bench_1b"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--basis", default="population", choices=["population", "area_m2", "uniform"])
    ap.add_argument("--dp", type=int, default=6)
    ap.add_argument("--keep", action="store_true", help="keep the written partitions")
    args = ap.parse_args(argv)

    from engine.core import config as cfgmod
    from engine.core import identities as ident
    from engine.core.context import RunContext, SegmentIds
    from engine.core.hashing import file_sha256
    from engine.segment1b import s1_tile_index as s1
    from engine.segment1b import s2_tile_weights as s2

    cfg = cfgmod.load()
    raster = args.scratch / "population_30s.tif"
    if raster.exists():
        print(f"raster: reusing {raster} ({raster.stat().st_size / 1e6:.1f} MB)")
    else:
        secs = build_30s_raster(Path(cfg["segment1b"]["inputs"]["population_raster"]), raster)
        print(f"raster: built {raster} in {secs:.1f} s ({raster.stat().st_size / 1e6:.1f} MB)")
    cfg["segment1b"]["inputs"]["population_raster"] = str(raster)
    cfg["segment1b"]["options"]["basis"] = args.basis
    cfg["segment1b"]["options"]["dp"] = args.dp

    g = ident.read_grid_definition(raster)
    poly = cfg["segment1b"]["inputs"]["world_countries"]
    gh, gb = ident.grid_hash(g["width"], g["height"], g["transform"], g["crs_wkt"], file_sha256(poly))
    wh, _ = ident.weights_hash(gb, args.basis, args.dp, file_sha256(raster) if args.basis == "population" else None)
    data_root = args.scratch / "run"
    if data_root.exists():
        shutil.rmtree(data_root)
    ids = SegmentIds("1B", int(cfg["seed"]), "0" * 64, "0" * 64, "0" * 32)
    ctx = RunContext(data_root=data_root, repo_root=REPO, config=cfg, ids=ids,
                     extra={"grid_hash": gh, "weights_hash": wh, "workers": args.workers})
    print(f"grid {g['width']} x {g['height']}, workers {args.workers}, basis {args.basis}, dp {args.dp}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")

    results = {}
    for name, fn, ds in (("S1", s1.run_with_report, ("tile_index", "tile_bounds")), ("S2", s2.run_with_report, ("tile_weights",))):
        c0 = cpu_seconds()
        with PeakRSS() as mon:
            t0 = time.perf_counter()
            rep = fn(ctx)
            wall = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
        written = {d: dir_bytes(ctx.path(d)) for d in ds}
        results[name] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": mon.peak, "rows": rep["rows_emitted"],
                         "bytes_written": written}
        print(f"{name}: {rep['rows_emitted']:,} tiles, wall {wall:.1f} s, cpu {cpu:.1f} s, "
              f"peak RSS {mon.peak / 2**30:.2f} GiB, written "
              + ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in written.items()))
    total_wall = results["S1"]["wall_s"] + results["S2"]["wall_s"]
    peak = max(results["S1"]["peak_rss_bytes"], results["S2"]["peak_rss_bytes"])
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ruc = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"S1+S2: wall {total_wall:.1f} s (target < 120 s: {'OK' if total_wall < 120 else 'MISSED'}), "
          f"peak summed RSS {peak / 2**30:.2f} GiB (target < 4 GiB: {'OK' if peak < 4 * 2**30 else 'MISSED'}); "
          f"ru_maxrss self {ru / 2**30:.2f} GiB, largest child {ruc / 2**30:.2f} GiB")
    print(json.dumps({"tiles": results["S1"]["rows"], **{k: v for k, v in results.items()}}, sort_keys=True))
    if not args.keep:
        shutil.rmtree(data_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
