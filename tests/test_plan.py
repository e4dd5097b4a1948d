"""Change planning (issue 7): for a change of seed, of basis, of one coefficient file and of the merchant table,
the list of `engine.cli.plan` matches what a real run of the workflow then executes.

One scratch data root: a run of the default configuration on the first 3,000 merchants (same DAG, less time),
then the four changes one after the other. For each change the plan is taken first, then the real run; the jobs
the plan says would run must be exactly the jobs Snakemake reports it ran (its `rule X:` blocks: rule name and
every output path), and every partition the plan says is reused must be left alone by the real run (same inode,
mtime and bytes of every file in it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from workflow_helpers import REPO, absolutise, default_config, small_table_s2_policy, snakemake

pytestmark = pytest.mark.slow

# jobs that only gather targets (no output of their own)
AGGREGATE_RULES = {"all", "segment1a", "segment1b"}


# ---------------------------------------------------------------------------------------------- helpers
def executed_jobs(text: str) -> set[tuple[str, str]]:
    """(rule, output path) of every job Snakemake started, from its own job blocks:

        [Fri Nov 27 05:29:43 2026]
        localrule s1b_s1_tile_index:
            input: ...
            output: data/layer1/1B/tile_index/grid=..., data/layer1/1B/tile_bounds/grid=...
            log: ...
    """
    jobs: set[tuple[str, str]] = set()
    rule = None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            rule = m.group(1)
            continue
        if rule is None:
            continue
        if not line.startswith("    "):
            rule = None
            continue
        key, _, value = line.strip().partition(": ")
        if key == "output":
            jobs.update((rule, p.strip()) for p in value.split(", ") if p.strip())
    return jobs


def finished_rules(text: str) -> list[str]:
    return re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", text, flags=re.M)


def run_plan(root: Path, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "engine.cli.plan", "--data-root", str(root), *extra, "--json"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def planned(plan: dict, action: str) -> set[tuple[str, str]]:
    return {(r["state"], r["path"]) for r in plan["outputs"] if r["action"] == action}


def fingerprint(root: Path, rel: str) -> dict:
    """inode, mtime and sha256 of a reused output (every file of a directory partition)."""
    p = root / rel
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    st = p.stat()
    out = {".": (st.st_ino, st.st_mtime_ns)}
    for f in files:
        s = f.stat()
        out[str(f.relative_to(p)) if p.is_dir() else "."] = (s.st_ino, s.st_mtime_ns,
                                                                  hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def write_config(root: Path, name: str, cfg: dict) -> Path:
    path = root.parent / f"{root.name}-{name}.yaml"  # outside the data root
    path.write_text(yaml.safe_dump(absolutise(cfg), sort_keys=True))
    return path


def changed_coefficients(tmp: Path) -> Path:
    """A copy of the hurdle coefficients with one beta changed (text edit: every other byte kept).

    The change is tiny on purpose: the file's bytes (hence parameter_hash and every path under it) change, the
    draws hardly move, so S9's corridors on a small sample cannot tip over (a 1% change of beta[1] breached the
    rho corridor on 3,000 merchants)."""
    src = REPO / default_config()["segment1a"]["parameters"]["hurdle_coefficients.yaml"]
    lines = src.read_text().splitlines(keepends=True)
    i = lines.index("beta:\n") + 2  # the second beta (the first is the intercept)
    old = float(lines[i].strip().lstrip("- "))
    lines[i] = f"- {old * (1 + 1e-9)!r}\n"
    out = tmp / "hurdle_coefficients.yaml"
    out.write_text("".join(lines))
    assert yaml.safe_load(out.read_text())["beta"][1] != yaml.safe_load(src.read_text())["beta"][1]
    return out


def changed_merchants(src: Path, tmp: Path) -> Path:
    """The merchant table without its first merchant."""
    t = pq.read_table(src)
    out = tmp / "merchants.parquet"
    pq.write_table(t.slice(1), out)
    return out


# ---------------------------------------------------------------------------------------------- the test
SMALL_MERCHANTS = 3000  # the first 3,000 merchants: the same DAG as the default, in a fraction of the time


def base_config(tmp: Path) -> dict:
    """The default configuration on the first SMALL_MERCHANTS merchants of the embedded merchant table."""
    cfg = default_config()
    src = REPO / cfg["segment1a"]["inputs"]["merchant_table"]
    small = tmp / "merchants-small.parquet"
    if not small.exists():
        pq.write_table(pq.read_table(src).slice(0, SMALL_MERCHANTS), small)
    cfg["segment1a"]["inputs"]["merchant_table"] = str(small)
    cfg["segment1a"]["parameters"]["s2_validation_policy.yaml"] = str(small_table_s2_policy(tmp / "policy"))
    return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("plan") / "root"
    base = write_config(r, "base", base_config(r.parent))
    snakemake(r, cores=2, extra=["--configfile", str(base)])
    return r


def _scenarios(root: Path):
    """(name, snakemake/plan arguments) of the four changes, each against the base configuration."""
    tmp = root.parent
    base = base_config(tmp)
    yield "seed=7", ["--configfile", str(write_config(root, "base", base)), "--config", "seed=7"]

    basis = copy.deepcopy(base)
    basis["segment1b"]["options"]["basis"] = "uniform"
    yield "basis=uniform", ["--configfile", str(write_config(root, "basis", basis))]

    coef = copy.deepcopy(base)
    coef["segment1a"]["parameters"]["hurdle_coefficients.yaml"] = str(changed_coefficients(tmp))
    yield "one coefficient", ["--configfile", str(write_config(root, "coef", coef))]

    merch = copy.deepcopy(base)
    merch["segment1a"]["inputs"]["merchant_table"] = str(changed_merchants(Path(base["segment1a"]["inputs"]
                                                                                ["merchant_table"]), tmp))
    yield "merchant table", ["--configfile", str(write_config(root, "merchants", merch))]


def test_plan_matches_what_the_real_run_executes(root):
    # nothing changed: the plan reuses everything and a real run runs nothing
    p0 = run_plan(root, ["--configfile", str(root.parent / f"{root.name}-base.yaml")])
    assert p0["recompute_states"] == [] and planned(p0, "reuse"), p0["recompute_states"]

    seen = {}
    for name, args in _scenarios(root):
        t0 = time.monotonic()
        plan = run_plan(root, args)
        would_run = planned(plan, "recompute")
        reused = planned(plan, "reuse")
        assert would_run and reused, name
        assert not {r for r, _ in would_run} & {r for r, _ in reused}, f"{name}: a rule both runs and is reused"
        before = {path: fingerprint(root, path) for _, path in sorted(reused)}

        proc = snakemake(root, cores=2, extra=args)
        log = proc.stdout + "\n" + proc.stderr
        ran = {(r, p) for r, p in executed_jobs(log) if r not in AGGREGATE_RULES}
        assert set(finished_rules(log)) - AGGREGATE_RULES == {r for r, _ in ran}, name

        assert ran == would_run, (f"{name}: planned but not run: {sorted(would_run - ran)[:8]}; "
                                  f"run but not planned: {sorted(ran - would_run)[:8]}")
        assert sorted(plan["recompute_states"]) == sorted({r for r, _ in ran}), name
        for path, fp in before.items():
            assert fingerprint(root, path) == fp, f"{name}: reused partition rewritten: {path}"
        for _, path in would_run:
            assert (root / path).exists(), f"{name}: planned output missing after the run: {path}"
        seen[name] = sorted({r for r, _ in ran})
        print(f"{name}: {len(seen[name])} jobs planned and run, {len(reused)} outputs reused, "
              f"{time.monotonic() - t0:.1f}s")

    # the four changes differ in what they recompute (a plan that lists everything would not pass)
    assert "s1b_s1_tile_index" not in seen["seed=7"] and "s1a_s0_foundations" not in seen["seed=7"]
    assert "s1b_s2_tile_weights" in seen["basis=uniform"] and not [r for r in seen["basis=uniform"]
                                                                   if r.startswith("s1a_")]
    assert "s1a_s0_foundations" in seen["one coefficient"] and "s1b_s2_tile_weights" not in seen["one coefficient"]
    assert "s1a_s0_foundations" in seen["merchant table"] and "s1b_s1_tile_index" not in seen["merchant table"]
