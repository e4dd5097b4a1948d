"""CLI ``python -m engine.cli.segment1b`` (runbook section 3): identity checks, --skip-s0, validate-s9, --dictionary
and the end-to-end run -> validate-s9 of the runbook.

The in-process tests reuse the tiny 1B world of ``test_1b_s7_s9``; the workflow tests need the whole pipeline
(embedded spatial reference, every state module) and are skipped with the reason when it cannot run yet.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from engine.cli import segment1b as cli
from engine.core import config as engine_config
from engine.core import identities
from engine.core.errors import EngineError
from engine.segment1b import s7_synthesis as s7
from engine.segment1b import s8_site_locations as s8
from engine.segment1b import s9_validation as s9

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_1b_s7_s9 import SEED, build_world, hx, make_ctx, no_gate  # noqa: E402
from workflow_helpers import small_table_s2_policy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIVE_KEYS = {"passed", "failure_codes", "bundle_path", "flag_path", "stage_log_path"}


def _main(argv, capsys) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _default_1a(seed: int):
    cfg = engine_config.resolve({**engine_config.load_yaml(REPO / "config.yaml"), "seed": seed})
    return identities.resolve_1a(cfg, REPO)


# ====================================================================== identity checks
def test_run_refuses_identities_not_of_the_1a_config(tmp_path, capsys):
    rc, out, err = _main(["run", "--data-root", tmp_path, "--parameter-hash", "a" * 64,
                          "--manifest-fingerprint", "b" * 64, "--seed", 5], capsys)
    assert rc != 0 and out == ""
    assert "E_IDENTITY_MISMATCH" in err and "run segment1a first" in err


def test_run_reads_the_stored_1a_config(tmp_path, capsys):
    """A stored 1A config (logs/config/1A/...) is used instead of the default: here a different seed in the
    stored file is overridden by --seed, and a changed option gives other identities than the default's."""
    base = engine_config.load_yaml(REPO / "config.yaml")
    stored = copy.deepcopy(base)
    stored["segment1a"]["options"]["s3_priors"] = True
    r_default = _default_1a(5)
    r_stored = identities.resolve_1a(engine_config.resolve({**stored, "seed": 5}), REPO)
    assert r_stored.parameter_hash != r_default.parameter_hash
    p = tmp_path / cli.CONFIG_1A_path(r_stored.manifest_fingerprint, 5)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({**stored, "seed": 5}))
    cfg, r1a, source = cli.resolve_1a_checked(tmp_path, r_stored.parameter_hash, r_stored.manifest_fingerprint, 5)
    assert source == str(p) and r1a.run_id == r_stored.run_id and cfg["segment1a"]["options"]["s3_priors"] is True
    with pytest.raises(EngineError) as e:  # the stored config does not give the default identities
        cli.resolve_1a_checked(tmp_path, r_default.parameter_hash, r_stored.manifest_fingerprint, 5)
    assert e.value.code == "E_IDENTITY_MISMATCH"


def _fake_1b(r1a, ph="c" * 64, fp="d" * 64):
    return identities.Resolved1B(
        seed=r1a.seed, parameter_hash=ph, parameter_hash_bytes=bytes.fromhex(ph), manifest_fingerprint=fp,
        fingerprint_bytes=bytes.fromhex(fp), run_id=identities.run_id("1B", fp, ph, r1a.seed), grid_hash="e" * 64,
        weights_hash="f" * 64, code_digest_hex=r1a.code_digest_hex, git_commit=None, param_entries=[],
        artifact_entries=[], options={"basis": "population", "dp": 6}, grid={}, ids_1a=r1a.ids)


def test_skip_s0_without_a_verified_receipt_is_named(tmp_path, capsys, monkeypatch):
    r1a = _default_1a(SEED)
    # the 1B identities need the spatial reference; the refusal happens before anything runs
    monkeypatch.setattr(identities, "resolve_1b", lambda cfg, repo, r, cache=None: _fake_1b(r))
    rc, out, err = _main(["run", "--data-root", tmp_path, "--parameter-hash", r1a.parameter_hash,
                          "--manifest-fingerprint", r1a.manifest_fingerprint, "--seed", SEED, "--skip-s0"], capsys)
    assert rc != 0 and "E301_NO_PASS_FLAG" in err and "--skip-s0" in err
    assert not (tmp_path / "data").exists()


def test_dictionary_option_sets_the_1b_dictionary(tmp_path):
    d = tmp_path / "my.1B.yaml"
    d.write_text((REPO / "contracts" / "dataset_dictionary.layer1.1B.yaml").read_text())
    cfg = cli.apply_1b_options(engine_config.load_yaml(REPO / "config.yaml"), str(d), "uniform", 3)
    assert cfg["segment1b"]["dictionary"] == str(d.resolve())
    assert cfg["segment1b"]["options"]["basis"] == "uniform" and cfg["segment1b"]["options"]["dp"] == 3
    with pytest.raises(EngineError) as e:
        cli.apply_1b_options(cfg, str(tmp_path / "missing.yaml"))
    assert e.value.code == "E_DICTIONARY_RESOLUTION_FAILED"


def test_rule_names_include_the_s0_rule():
    names = cli.rule_names()
    assert cli.S0_RULE in names and "s1b_s9_validation" in names and "all" in names


# ====================================================================== validate-s9 (in-process, tiny world)
@pytest.fixture
def recorded_world(tmp_path, monkeypatch):
    """The tiny world after S7, S8, S9 (PASS) under a complete configuration; S9 leaves the run record that
    validate-s9 looks up (logs/config/1B/...)."""
    no_gate(monkeypatch)
    ctx = make_ctx(tmp_path / "root")
    build_world(ctx)
    cfg = engine_config.load_yaml(REPO / "config.yaml")
    cfg["segment1b"]["inputs"]["world_countries"] = ctx.config["segment1b"]["inputs"]["world_countries"]
    cfg["segment1b"]["options"].update(ctx.config["segment1b"]["options"])
    ctx = type(ctx)(ctx.data_root, ctx.repo_root, engine_config.resolve(cfg), ctx.ids, ctx.ids_1a, ctx.extra)
    s7.run(ctx)
    s8.run(ctx)
    s9.run(ctx)
    rec = ctx.data_root / cli.RECORD_1B_path(ctx.ids.manifest_fingerprint, ctx.ids.seed)
    assert json.loads(rec.read_text())["ids_1b"]["run_id"] == ctx.ids.run_id
    return ctx


def _validate_args(ctx, ids, run_id=None):
    return ["validate-s9", "--data-root", ctx.data_root, "--parameter-hash", ids.parameter_hash,
            "--manifest-fingerprint", ids.manifest_fingerprint, "--seed", ids.seed,
            "--run-id", run_id or ctx.ids.run_id]


@pytest.mark.parametrize("which", ["1B", "1A"])
def test_validate_s9_passes_with_either_identities(recorded_world, capsys, which):
    ctx = recorded_world
    bdir = Path(ctx.path("validation_bundle_1B"))
    before = {p.name: p.read_bytes() for p in bdir.iterdir()}
    rc, out, err = _main(_validate_args(ctx, ctx.ids if which == "1B" else ctx.ids_1a), capsys)
    assert rc == 0, err
    r = json.loads(out)
    assert set(r) == FIVE_KEYS
    assert r["passed"] is True and r["failure_codes"] == []
    assert r["bundle_path"] == str(bdir) and r["flag_path"] == str(bdir / "_passed.flag")
    assert r["stage_log_path"] == str(ctx.path("s9_stage_log"))
    assert {p.name: p.read_bytes() for p in bdir.iterdir()} == before  # nothing re-published
    assert len(Path(r["stage_log_path"]).read_text().splitlines()) == 16  # run (8) + validate-s9 (8)


def test_validate_s9_wrong_run_id_is_named(recorded_world, capsys):
    ctx = recorded_world
    rc, out, err = _main(_validate_args(ctx, ctx.ids, run_id=ctx.ids_1a.run_id), capsys)
    assert rc != 0 and out == "" and "E_RUN_ID_MISMATCH" in err


def test_validate_s9_unknown_identities_are_named(recorded_world, capsys):
    ctx = recorded_world
    args = _validate_args(ctx, ctx.ids)
    args[args.index("--parameter-hash") + 1] = hx("nobody")
    rc, out, err = _main(args, capsys)
    assert rc != 0 and "E_IDENTITY_MISMATCH" in err


def test_validate_s9_reports_a_failure(recorded_world, capsys):
    ctx = recorded_world
    part = Path(ctx.path("site_locations")) / "part-00000.parquet"
    t = pq.read_table(part)
    pq.write_table(t.set_column(3, "lon_deg", t["lon_deg"].cast("float32")), part)
    rc, out, _ = _main(_validate_args(ctx, ctx.ids), capsys)
    r = json.loads(out)
    assert rc == 1 and r["passed"] is False and "E904_EGRESS_SCHEMA_VIOLATION" in r["failure_codes"]


# ====================================================================== workflow (needs the whole pipeline)
def _pipeline_missing() -> str | None:
    cfg = engine_config.load_yaml(REPO / "config.yaml")
    for sec in ("inputs", "parameters"):
        for k, v in cfg["segment1b"][sec].items():
            if not (REPO / v).exists():
                return f"embedded 1B reference {k} ({v}) not built yet"
    from engine import states

    for state, target in states.STATES.items():
        mod, fn = target.split(":")
        try:
            if not hasattr(importlib.import_module(mod), fn):
                return f"{target} not implemented yet"
        except ImportError as exc:
            return f"state {state} ({mod}) not importable yet: {exc}"
    return None


def _cli(module: str, *args, cwd=REPO) -> tuple[int, dict | None, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env)
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        out = None
    return proc.returncode, out, proc.stderr


@pytest.mark.slow
def test_dictionary_template_moves_the_planned_outputs(tmp_path):
    """Dry run: the printed site_locations path follows a user's dictionary (decision 26)."""
    why = _pipeline_missing()
    if why:
        pytest.skip(why)
    r1a = _default_1a(SEED)
    d = _moved_dictionary(tmp_path)
    args = ["run", "--data-root", tmp_path / "root", "--parameter-hash", r1a.parameter_hash,
            "--manifest-fingerprint", r1a.manifest_fingerprint, "--seed", SEED, "--dry-run"]
    rc0, base, err0 = _cli("engine.cli.segment1b", *args)
    rc1, moved, err1 = _cli("engine.cli.segment1b", *args, "--dictionary", d)
    assert rc0 == 0 and rc1 == 0, err0[-3000:] + err1[-3000:]
    assert "/site_locations_moved/" in moved["site_locations"] and "/site_locations/" in base["site_locations"]
    assert moved["manifest_fingerprint"] == base["manifest_fingerprint"]  # a template is not an identity


def _moved_dictionary(tmp_path: Path) -> Path:
    doc = yaml.safe_load((REPO / "contracts" / "dataset_dictionary.layer1.1B.yaml").read_text())
    doc["datasets"]["site_locations"]["path"] = \
        "data/layer1/1B/site_locations_moved/seed={seed}/fingerprint={manifest_fingerprint}/"
    d = tmp_path / "elsewhere" / "my.1B.yaml"
    d.parent.mkdir(parents=True, exist_ok=True)
    d.write_text(yaml.safe_dump(doc, sort_keys=False))
    return d


E2E_SEED = 9248923  # the default seed; small samples can breach 1A's S2 corridors for other seeds
E2E_MERCHANTS = 3000


def _small_merchant_table(path: Path, n: int = E2E_MERCHANTS) -> Path:
    cfg = engine_config.load_yaml(REPO / "config.yaml")
    t = pq.read_table(REPO / cfg["segment1a"]["inputs"]["merchant_table"])
    pq.write_table(t.slice(0, n), path)
    return path


def _failed_jobs(root: Path) -> str:
    """The error lines of the failed Snakemake jobs (their logs under logs/jobs/)."""
    out = []
    for log in sorted((root / "logs" / "jobs").rglob("*.log")):
        text = log.read_text(errors="replace")
        if "FAILED" in text or "Traceback" in text:
            out.append(f"{log.relative_to(root)}: " + " | ".join(text.strip().splitlines()[-4:])[:600])
    return "; ".join(out)


@pytest.mark.slow
def test_runbook_section_3_end_to_end(tmp_path):
    """segment1a -> segment1b run -> validate-s9 ("passed": true), then a changed dictionary moves site_locations.
    The whole workflow on 3,000 merchants (about 2.5 minutes with 2 cores)."""
    why = _pipeline_missing()
    if why:
        pytest.skip(why)
    root = tmp_path / "runs" / "local_layer1"
    small = _small_merchant_table(tmp_path / "merchants.parquet")
    args_1a = ["--output-dir", root, "--merchant-table", small, "--seed", E2E_SEED, "--cores", 2,
               "--validation-policy", small_table_s2_policy(tmp_path / "policy")]
    rc, out1a, err = _cli("engine.cli.segment1a", *args_1a)
    assert rc == 0 and out1a and out1a.get("passed"), \
        f"segment1a failed (exit {rc}): {_failed_jobs(root) or err[-800:]}"
    ph, fp = out1a["parameter_hash"], out1a["manifest_fingerprint"]
    stored = root / cli.CONFIG_1A_path(fp, E2E_SEED)
    if not stored.is_file():
        # until segment1a stores the configuration of its run, store what its own argument parsing resolves to
        from engine.cli import segment1a

        cfg = segment1a.config_from_args(segment1a.build_parser().parse_args([str(a) for a in args_1a]))
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(cfg))
    rc, out, err = _cli("engine.cli.segment1b", "run", "--data-root", root, "--parameter-hash", ph,
                        "--manifest-fingerprint", fp, "--seed", E2E_SEED, "--cores", 2)
    assert rc == 0 and out and out["passed"] is True, err[-5000:]
    assert out["consumed_1A"]["parameter_hash"] == ph and out["consumed_1A"]["manifest_fingerprint"] == fp
    assert Path(out["flag_path"]).is_file() and out["failure_codes"] == []
    assert out["rows"]["site_locations"] == out["rows"]["outlet_catalogue"] > 0
    # runbook 3.4: validate-s9 with the 1A identities and the 1B run id
    rc, val, err = _cli("engine.cli.segment1b", "validate-s9", "--data-root", root, "--parameter-hash", ph,
                        "--manifest-fingerprint", fp, "--seed", E2E_SEED, "--run-id", out["run_id"])
    assert rc == 0 and val is not None and set(val) == FIVE_KEYS and val["passed"] is True, err[-3000:]
    # a changed template moves the outputs; the bundle (which names no path) stays byte-identical
    before = {p.name: p.read_bytes() for p in Path(out["bundle_path"]).iterdir()}
    rc, moved, err = _cli("engine.cli.segment1b", "run", "--data-root", root, "--parameter-hash", ph,
                          "--manifest-fingerprint", fp, "--seed", E2E_SEED, "--dictionary", _moved_dictionary(tmp_path))
    assert rc == 0 and moved["passed"] is True, err[-5000:]
    assert "/site_locations_moved/" in moved["site_locations"]
    new_part = Path(moved["site_locations"]) / "part-00000.parquet"
    assert new_part.read_bytes() == (Path(out["site_locations"]) / "part-00000.parquet").read_bytes()
    assert {p.name: p.read_bytes() for p in Path(moved["bundle_path"]).iterdir()} == before
