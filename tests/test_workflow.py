"""End-to-end: the real Snakemake workflow on the embedded default, run into scratch data roots.

These are the slowest tests of the suite (one full run per data root, about a minute each on 2 cores).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from workflow_helpers import REPO, default_config, planned_rules, snakemake, tree_digest

pytestmark = pytest.mark.slow

RNG_1A = {"s1a_s0_rng_anchor", "s1a_s1_hurdle", "s1a_s2_nb_outlets", "s1a_s4_ztp", "s1a_s6_foreign_selection",
          "s1a_s7_allocation", "s1a_s8_outlet_catalogue", "s1a_s9_validation"}
SEED_FREE_1A = {"s1a_s0_foundations", "s1a_s3_candidates", "s1a_s5_currency_weights"}
LATER_1B = {"s1b_s0_gate", "s1b_s0_rng_anchor", "s1b_s3_requirements", "s1b_s4_alloc_plan", "s1b_s5_site_tile",
            "s1b_s6_jitter", "s1b_s7_synthesis", "s1b_s8_site_locations", "s1b_s9_validation"}


@pytest.fixture(scope="session")
def run_a(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run_a")
    snakemake(root, cores=2)
    return root


def _flags(root: Path) -> list[Path]:
    return sorted(root.glob("data/layer1/*/validation/seed=*/fingerprint=*/_passed.flag"))


def test_default_run_produces_both_pass_flags_and_second_run_does_nothing(run_a):
    flags = _flags(run_a)
    assert [f.parts[-5] for f in flags] == ["1A", "1B"]
    for f in flags:
        assert f.read_text().startswith("sha256_hex = ")
    # no staging directories left behind
    assert not [p for p in (run_a / "data").rglob("_tmp*")]
    again = snakemake(run_a, dry_run=True)
    assert planned_rules(again) == {}, again.stdout[-3000:]


def test_cores_1_gives_byte_identical_data(run_a, tmp_path):
    root_b = tmp_path / "run_b"
    snakemake(root_b, cores=1)
    a, b = tree_digest(run_a), tree_digest(root_b)
    assert a.keys() == b.keys()
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, diff[:10]


def test_touching_an_input_without_changing_bytes_reruns_nothing(run_a):
    cfg = default_config()
    target = REPO / cfg["segment1a"]["inputs"]["merchant_table"]
    st = target.stat()
    try:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
        proc = snakemake(run_a, dry_run=True)
        assert planned_rules(proc) == {}, proc.stdout[-3000:]
    finally:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_seed_change_replans_only_states_that_draw(run_a):
    proc = snakemake(run_a, dry_run=True, extra=["--config", "seed=7"])
    planned = set(planned_rules(proc)) - {"all"}
    assert RNG_1A <= planned
    assert not planned & SEED_FREE_1A
    assert not planned & {"s1b_s1_tile_index", "s1b_s2_tile_weights"}


def test_basis_change_replans_1b_s0_and_s2_onward_only(run_a, tmp_path):
    cfg = default_config()
    cfg["segment1b"]["options"]["basis"] = "uniform"
    proc = snakemake(run_a, cfg=cfg, dry_run=True)
    planned = set(planned_rules(proc)) - {"all"}
    assert "s1b_s2_tile_weights" in planned and "s1b_s0_gate" in planned
    assert not {p for p in planned if p.startswith("s1a_")}
    assert "s1b_s1_tile_index" not in planned


def test_merchant_table_change_never_replans_1b_s1_or_s2(run_a, tmp_path):
    cfg = default_config()
    src = REPO / cfg["segment1a"]["inputs"]["merchant_table"]
    t = pq.read_table(src)
    t = t.slice(1)  # drop one merchant
    new = tmp_path / "merchants.parquet"
    pq.write_table(t, new)
    cfg["segment1a"]["inputs"]["merchant_table"] = str(new)
    proc = snakemake(run_a, cfg=cfg, dry_run=True)
    planned = set(planned_rules(proc)) - {"all"}
    assert SEED_FREE_1A <= planned and RNG_1A <= planned
    assert {"s1b_s0_gate", "s1b_s3_requirements", "s1b_s9_validation"} <= planned
    assert not planned & {"s1b_s1_tile_index", "s1b_s2_tile_weights"}


def test_foreign_outlets_occur_on_the_default(run_a):
    cat = pq.read_table(next((run_a / "data/layer1/1A/outlet_catalogue").rglob("part-*.parquet")))
    home = cat.column("home_country_iso").to_numpy(zero_copy_only=False)
    legal = cat.column("legal_country_iso").to_numpy(zero_copy_only=False)
    foreign = int((home != legal).sum())
    assert foreign > 0
    print(f"foreign outlets: {foreign} of {cat.num_rows}")
