"""Cluster execution: the embedded default through Slurm (profiles/slurm) is byte-identical to a local run.

Runs only when asked (``ENGINE_TEST_SLURM=1``, set by ``make test-slurm`` after
``scripts/setup_local_slurm.sh``) and when a Slurm controller answers ``sinfo`` with a usable node;
otherwise it skips and says why. Each Slurm job re-parses the workflow and runs one state with
``sbatch`` on the node, so the data root must be on a file system the node shares (here: the same machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow_helpers import REPO, snakemake, tree_digest

pytestmark = pytest.mark.slow

PROFILE = REPO / "profiles" / "slurm"
USABLE = {"idle", "mixed", "allocated", "completing"}


def slurm_unavailable() -> str | None:
    """Why Slurm cannot be used here (None = usable)."""
    if os.environ.get("ENGINE_TEST_SLURM") != "1":
        return "Slurm test not requested: run `make test-slurm` (or set ENGINE_TEST_SLURM=1 with Slurm up)"
    if shutil.which("sinfo") is None:
        return "Slurm not available: `sinfo` not found (scripts/setup_local_slurm.sh installs a local one)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "Slurm not available: `sinfo` did not answer within 30 s"
    if proc.returncode != 0:
        return f"Slurm not available: `sinfo` failed: {(proc.stderr.strip().splitlines() or ['?'])[0][:300]}"
    states = {s.strip().rstrip("*~#$@+!%") for s in proc.stdout.split()}
    if not states & USABLE:
        return f"Slurm not available: no usable node (sinfo states: {sorted(states) or 'none'})"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed in this environment"
    return None


def test_slurm_run_is_byte_identical_to_local_run(tmp_path):
    why = slurm_unavailable()
    if why:
        pytest.skip(why)
    root_slurm = tmp_path / "slurm"
    root_slurm.mkdir()
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE), "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(root_slurm)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    t_slurm = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"Slurm run failed ({proc.returncode}):\n{text[-8000:]}"
    # the jobs really went through Slurm
    assert "has been submitted with SLURM jobid" in text, text[-3000:]

    root_local = tmp_path / "local"
    t0 = time.perf_counter()
    snakemake(root_local, cores=2)
    t_local = time.perf_counter() - t0

    a, b = tree_digest(root_local), tree_digest(root_slurm)
    assert a, "the local run produced nothing under data/"
    assert [k for k in a if k.endswith("_passed.flag")], "no _passed.flag in the local run"
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, diff[:10]
    assert not [k for k in b if "/_tmp" in k], "staging leftovers in the Slurm run"
    n_jobs = text.count("has been submitted with SLURM jobid")
    print(f"\nslurm run: {t_slurm:.1f} s for {n_jobs} Slurm jobs; local --cores 2 run: {t_local:.1f} s; "
          f"{len(a)} files under data/ byte-identical")
