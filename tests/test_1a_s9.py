"""1A S9 — replay validation and the PASS gate (1A-S5-S9 §6, 00-core §5, decisions 5, 15, 19, 21, 25, 27).

A small synthetic but fully consistent 1A output tree is built once per module with the core writers
(publish / RngLogs) and the scalar RNG oracle (``rng.substream`` + ``samplers.Stream``), not by running
S0-S8: six merchants (one id above 2^63), three multi-site eligible, one multi-site ineligible, two single-site
(one deterministic). Each failure test copies the tree and breaks one thing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.core import identities, publish, rng, samplers
from engine.core.context import RunContext
from engine.core.errors import GateError, ValidationFailure
from engine.core.rnglog import RngLogs
from engine.core.schema import arrow_schema, validate_record, validate_table
from engine.segment1a import inputs as inp
from engine.segment1a import s0_foundations as s0
from engine.segment1a import s4_ztp
from engine.segment1a import s5_currency_weights as s5
from engine.segment1a import s6_foreign_selection as s6
from engine.segment1a import s9_validation as s9

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "contracts" / "schemas" / "1A"
CODE = "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL"
BIG = (1 << 63) + 11  # u64 id above 2^63-1 (decision 12)

# merchant -> (home, kind, foreign candidates in rank order, eligible)
MERCHANTS = {
    1: ("GB", "multi", ["DE", "FR"], True),
    2: ("DE", "multi", ["GB"], True),
    3: ("FR", "multi", [], False),
    4: ("US", "single", [], False),
    5: ("GB", "single_det", [], False),
    BIG: ("US", "multi_det", ["GB", "DE", "FR"], True),
}
ISO = ["DE", "ES", "FR", "GB", "US"]
NB = {1: (6.0, 2.0), 2: (9.0, 0.7), 3: (4.0, 3.0), BIG: (12.0, 1.5)}  # (mu, phi); phi < 1 uses the boost


# ====================================================================== fixture builders
def _write_config(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    mids = sorted(MERCHANTS)
    pq.write_table(pa.table({
        "merchant_id": pa.array(mids, pa.uint64()),
        "mcc": pa.array([5411] * len(mids), pa.int32()),
        "channel": ["card_present"] * len(mids),
        "home_country_iso": [MERCHANTS[m][0] for m in mids],
    }), d / "merchants.parquet")
    pq.write_table(pa.table({"country_iso": ISO}), d / "iso.parquet")
    for name in ("gdp.bin", "bucket.bin", "numeric_policy.json", "math_profile.json"):
        (d / name).write_bytes(name.encode() * 3)
    params = {}
    for name in identities.required_parameters("1A"):
        p = d / name
        if name == "crossborder_hyperparams.yaml":
            shutil.copyfile(REPO / "config" / "policy" / "crossborder_hyperparams.yaml", p)
        elif name == "s2_validation_policy.yaml":  # generous corridors: four merchants cannot meet rho <= 0.2
            p.write_text("corridors: {rho_reject_max: 0.99, p99_max: 50}\ncusum: {reference_k: 0.5, threshold_h: 1000.0}\n")
        elif name == "s6_selection_policy.yaml":
            p.write_text("defaults:\n  emit_membership_dataset: true\n  log_all_candidates: true\n"
                         "  max_candidates_cap: 0\n  zero_weight_rule: exclude\n")
        else:
            p.write_text(f"# {name} (test stand-in; hashed only)\n")
        params[name] = str(p)
    return {
        "seed": 424242,
        "segment1a": {
            "inputs": {"merchant_table": str(d / "merchants.parquet"), "iso_table": str(d / "iso.parquet"),
                       "gdp_table": str(d / "gdp.bin"), "bucket_table": str(d / "bucket.bin"),
                       "numeric_policy": str(d / "numeric_policy.json"), "math_profile": str(d / "math_profile.json")},
            "parameters": params,
            "options": {},
        },
    }


def _publish(ctx, ds: str, cols: dict, sort: list[str]) -> None:
    sp = SCHEMAS / f"{ds}.schema.json"
    t = pa.table(cols).cast(arrow_schema(sp))
    assert validate_table(t, sp) == [], (ds, validate_table(t, sp))
    with publish.staged(ctx.path(ds), CODE) as tmp:
        publish.write_parquet(t, Path(tmp) / "part-00000.parquet", sort_by=sort, schema=arrow_schema(sp))


def _stream(M: bytes, label: str, m: int, iso: str | None = None) -> samplers.Stream:
    ids = rng.ser_u64(rng.merchant_u64(m)) + (rng.ser_iso(iso) if iso else b"")
    return samplers.Stream(*rng.substream(M, "1A", label, ids))


def _base(M: bytes, label: str, m: int, iso: str | None = None) -> tuple[int, int]:
    s = _stream(M, label, m, iso)
    return s.hi, s.lo


def _ev(rows: list[dict]) -> dict:
    """row dicts -> column dict for RngLogs.add_events (u64 counters exact)."""
    cols = {k: [r.get(k) for r in rows] for k in rows[0]}
    for k in ("merchant_id", "before_hi", "before_lo", "after_hi", "after_lo", "blocks", "draws"):
        if k in cols:
            cols[k] = np.array(cols[k], dtype=np.uint64)
    return cols


def _nc(M, label, m, iso=None, **payload) -> dict:
    """A non-consuming event row at the base counter of its keyed substream."""
    hi, lo = _base(M, label, m, iso)
    return {"merchant_id": m, "before_hi": hi, "before_lo": lo, "after_hi": hi, "after_lo": lo, "blocks": 0,
            "draws": 0, **({"country_iso": iso} if iso else {}), **payload}


def build_tree(root: Path, cfg: dict) -> RunContext:
    res = identities.resolve_1a(cfg, REPO)
    ids = res.ids
    ctx = RunContext(data_root=root, repo_root=REPO, config=cfg, ids=ids,
                     extra={"code_digest": res.code_digest_hex, "git_commit": None})
    ph, fp = ids.parameter_hash, ids.manifest_fingerprint
    mids = sorted(MERCHANTS)
    n = len(mids)
    M = rng.master_material("1A", ids.fingerprint_bytes, ids.seed)

    # ---- S0: receipt + lineage evidence (S0's own pure record builder), design matrix, eligibility, audit
    counts = {"merchants_ingress": n, "merchants_in_run": n, "merchants_dropped_unplaceable": 0,
              "dropped_by_home_country": {}, "eligible": sum(MERCHANTS[m][3] for m in mids), "pi_deterministic": 2}
    attest = {"passed": True, "math_profile_id": "test-profile"}
    rec = s0.lineage_records(res, attest, counts, dict(res.options))
    with publish.staged(ctx.path("s0_gate_receipt_1A"), CODE) as tmp:
        publish.write_json(rec["receipt"], Path(tmp) / "s0_gate_receipt.json")
        publish.write_json(attest, Path(tmp) / "numeric_policy_attest.json")
        publish.write_jsonl(rec["param_digest_log"], Path(tmp) / "param_digest_log.jsonl")
    with publish.staged(ctx.path("sealed_inputs_1A"), CODE) as tmp:
        publish.write_json(rec["sealed"], Path(tmp) / "sealed_inputs_1A.json")
    _publish(ctx, "hurdle_design_matrix", {
        "merchant_id": pa.array(mids, pa.uint64()), "mcc": [5411] * n, "channel": ["CP"] * n,
        "home_country_iso": [MERCHANTS[m][0] for m in mids], "gdp_bucket_id": [3] * n,
        "gdp_pc_usd_2015": [30000.0] * n, "log_gdp_pc_usd_2015": [math.log(30000.0)] * n, "intercept": [1.0] * n,
        "parameter_hash": [ph] * n, "produced_by_fingerprint": [fp] * n}, ["merchant_id"])
    _publish(ctx, "crossborder_eligibility_flags", {
        "merchant_id": pa.array(mids, pa.uint64()), "is_eligible": [MERCHANTS[m][3] for m in mids],
        "reason": ["default_allow" if MERCHANTS[m][3] else "deny_test" for m in mids], "rule_set": ["test"] * n,
        "parameter_hash": [ph] * n, "produced_by_fingerprint": [fp] * n}, ["merchant_id"])
    logs = RngLogs(root, "1A", ids)
    logs.write_audit(build_commit=res.code_digest_hex, code_digest=res.code_digest_hex)
    z = np.zeros(1, np.uint64)
    logs.add_events("anchor", "1A.s0", "s0.anchor",
                    {"before_hi": z, "before_lo": z, "after_hi": z, "after_lo": z, "blocks": z, "draws": z})
    logs.close()

    # ---- S1: hurdle from the scalar oracle; pi chosen around the drawn u so the outcome is the intended one
    rows, multi = [], []
    for m in mids:
        kind = MERCHANTS[m][1]
        s = _stream(M, "hurdle_bernoulli", m)
        bh, bl = s.hi, s.lo
        if kind.endswith("_det"):
            pi, u, is_multi, det = (1.0 if kind == "multi_det" else 0.0), None, kind == "multi_det", True
        else:
            u = s.uniform()
            pi = (1.0 + u) / 2.0 if kind == "multi" else u / 2.0
            is_multi, det = u < pi, False
        rows.append({"merchant_id": m, "before_hi": bh, "before_lo": bl, "after_hi": s.hi, "after_lo": s.lo,
                     "blocks": s.blocks, "draws": s.draws, "pi": pi, "u": u, "is_multi": is_multi,
                     "deterministic": det})
        if is_multi:
            multi.append(m)
    with RngLogs(root, "1A", ids) as logs:
        logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", _ev(rows))

    # ---- S2: NB attempts (scalar samplers) + finals
    g_rows, p_rows, f_rows, N = [], [], [], {}
    for m in multi:
        mu, phi = NB[m]
        sg, sp = _stream(M, "gamma_nb", m), _stream(M, "poisson_nb", m)
        t = 0
        while True:
            b = (sg.hi, sg.lo, sg.blocks, sg.draws)
            G = samplers.gamma(sg, phi)
            g_rows.append({"merchant_id": m, "before_hi": b[0], "before_lo": b[1], "after_hi": sg.hi, "after_lo": sg.lo,
                           "blocks": sg.blocks - b[2], "draws": sg.draws - b[3], "context": "nb", "index": 0,
                           "alpha": phi, "gamma_value": G})
            lam = (mu / phi) * G
            b = (sp.hi, sp.lo, sp.blocks, sp.draws)
            k = samplers.poisson(sp, lam)
            p_rows.append({"merchant_id": m, "before_hi": b[0], "before_lo": b[1], "after_hi": sp.hi, "after_lo": sp.lo,
                           "blocks": sp.blocks - b[2], "draws": sp.draws - b[3], "context": "nb", "lambda": lam,
                           "k": k, "attempt": t + 1})
            if k >= 2:
                break
            t += 1
        N[m] = k
        f_rows.append(_nc(M, "nb_final", m, mu=mu, dispersion_k=phi, n_outlets=k, nb_rejections=t))
    with RngLogs(root, "1A", ids) as logs:
        logs.add_events("gamma_component", "1A.nb_and_dirichlet_sampler", "gamma_nb", _ev(g_rows))
        logs.add_events("poisson_component", "1A.nb_poisson_component", "poisson_nb", _ev(p_rows), part=0)
        logs.add_events("nb_final", "1A.nb_sampler", "nb_final", _ev(f_rows))

    # ---- S3: candidate sets (home rank 0, foreigns in rank order)
    c = {k: [] for k in ("merchant_id", "country_iso", "candidate_rank", "is_home", "reason_codes", "filter_tags")}
    for m in multi:
        home, _, foreign, _ = MERCHANTS[m]
        for r, iso in enumerate([home, *foreign]):
            c["merchant_id"].append(m)
            c["country_iso"].append(iso)
            c["candidate_rank"].append(r)
            c["is_home"].append(r == 0)
            c["reason_codes"].append(["TEST_RULE"])
            c["filter_tags"].append(["HOME"] if r == 0 else ["TEST"])
    nc = len(c["merchant_id"])
    c["merchant_id"] = pa.array(c["merchant_id"], pa.uint64())
    _publish(ctx, "s3_candidate_set", {**c, "parameter_hash": [ph] * nc, "produced_by_fingerprint": [fp] * nc},
             ["merchant_id", "candidate_rank", "country_iso"])

    # ---- S4: the S4 module's pure core over the eligible multi-site merchants
    elig = [m for m in multi if MERCHANTS[m][3]]
    policy = s4_ztp.ztp_policy(inp.load_crossborder_hyperparams(cfg["segment1a"]["parameters"]
                                                                ["crossborder_hyperparams.yaml"]).ztp)
    key, hi, lo = rng.substreams_vec(M, "1A", "poisson_component", rng.merchant_u64_vec(np.array(elig, np.uint64)))
    A = np.array([len(MERCHANTS[m][2]) for m in elig], np.int64)
    out = s4_ztp.simulate(policy, np.array(elig, np.uint64), np.array([1.3, 2.2, 0.9]), A, key, hi, lo)
    with RngLogs(root, "1A", ids) as logs:
        for fam in ("poisson_component", "ztp_rejection", "ztp_retry_exhausted", "ztp_final"):
            cols = out.events[fam]
            if cols["merchant_id"].size:
                logs.add_events(fam, "1A.ztp_sampler", "poisson_component", cols,
                                part=s4_ztp.S4_PART if fam == "poisson_component" else 0)
    K = dict(zip(elig, out.k_target.tolist()))
    assert all(K[m] >= 1 for m in elig)

    # ---- S6: Gumbel keys from the oracle uniform, S6's key kernel, top-K by (key desc, rank, ISO)
    g6, members = [], {}
    for m in elig:
        foreign = MERCHANTS[m][2]
        w = np.array([0.6, 0.3, 0.1][:len(foreign)])
        wt = w / w.sum()
        u = np.array([_stream(M, "gumbel_key", m, iso).uniform() for iso in foreign])
        keys = s6.gumbel_keys(wt, u)
        order = sorted(range(len(foreign)), key=lambda i: (-keys[i], i, foreign[i]))
        chosen = order[:min(K[m], len(foreign))]
        members[m] = [foreign[i] for i in sorted(chosen)]
        for i, iso in enumerate(foreign):
            hi0, lo0 = _base(M, "gumbel_key", m, iso)
            hi1, lo1 = rng.add128(hi0, lo0, 1)
            sel = i in chosen
            g6.append({"merchant_id": m, "before_hi": hi0, "before_lo": lo0, "after_hi": hi1, "after_lo": lo1,
                       "blocks": 1, "draws": 1, "country_iso": iso, "weight": float(wt[i]), "u": float(u[i]),
                       "key": float(keys[i]), "selected": sel,
                       "selection_order": (chosen.index(i) + 1) if sel else None})
    with RngLogs(root, "1A", ids) as logs:
        logs.add_events("gumbel_key", "1A.foreign_country_selector", "gumbel_key", _ev(g6))
    mm = [(m, iso) for m in elig for iso in members[m]]
    _publish(ctx, "s6_membership", {
        "merchant_id": pa.array([x[0] for x in mm], pa.uint64()), "country_iso": [x[1] for x in mm],
        "seed": pa.array([ids.seed] * len(mm), pa.uint64()), "parameter_hash": [ph] * len(mm),
        "produced_by_fingerprint": [fp] * len(mm)}, ["merchant_id", "country_iso"])
    with publish.staged(ctx.path("s6_receipt"), CODE) as tmp:
        publish.write_json({"seed": ids.seed, "parameter_hash": ph, "manifest_fingerprint": fp},
                           Path(tmp) / s6.RECEIPT_NAME)
        (Path(tmp) / s5.FLAG_NAME).write_bytes(s5.flag_text(s5.receipt_digest(Path(tmp), s6.RECEIPT_MEMBERS)))

    # ---- S7: equal shares over D = home + members, Hamilton with (residual desc, ISO asc)
    alloc, r_rows = [], []
    for m in mids:
        home, kind = MERCHANTS[m][0], MERCHANTS[m][1]
        if m not in multi:
            alloc.append((m, home, 1, 0.0, 1, True))
            continue
        if m not in K:
            alloc.append((m, home, N[m], 0.0, 1, True))
            continue
        D = [home, *members[m]]
        a = N[m] / len(D)
        f = math.floor(a)
        res_q = float(np.round((a - f) * 1e8) / 1e8)
        order = sorted(D, key=lambda iso: (-res_q, iso))
        d = N[m] - f * len(D)
        for iso in D:
            rank = order.index(iso) + 1
            cnt = f + (1 if rank <= d else 0)
            alloc.append((m, iso, cnt, res_q, rank, iso == home))
            r_rows.append(_nc(M, "residual_rank", m, iso, residual=res_q, residual_rank=rank))
    r_rows.sort(key=lambda r: (r["merchant_id"], r["country_iso"]))
    with RngLogs(root, "1A", ids) as logs:
        logs.add_events("residual_rank", "1A.integerisation", "residual_rank", _ev(r_rows))
    _publish(ctx, "s7_integer_allocation", {
        "merchant_id": pa.array([x[0] for x in alloc], pa.uint64()), "country_iso": [x[1] for x in alloc],
        "count": [x[2] for x in alloc], "residual": [x[3] for x in alloc], "residual_rank": [x[4] for x in alloc],
        "is_home": [x[5] for x in alloc]}, ["merchant_id", "country_iso"])

    # ---- S8: catalogue rows + one sequence_finalize per block
    blocks = sorted((m, iso, cnt) for m, iso, cnt, *_ in alloc if cnt > 0)
    cat = {k: [] for k in ("manifest_fingerprint", "merchant_id", "site_id", "home_country_iso", "legal_country_iso",
                           "single_vs_multi_flag", "raw_nb_outlet_draw", "final_country_outlet_count", "site_order",
                           "global_seed")}
    s_rows = []
    for m, iso, cnt in blocks:
        for so in range(1, cnt + 1):
            cat["manifest_fingerprint"].append(fp)
            cat["merchant_id"].append(m)
            cat["site_id"].append(f"{so:06d}")
            cat["home_country_iso"].append(MERCHANTS[m][0])
            cat["legal_country_iso"].append(iso)
            cat["single_vs_multi_flag"].append(m in multi)
            cat["raw_nb_outlet_draw"].append(N.get(m, 1))
            cat["final_country_outlet_count"].append(cnt)
            cat["site_order"].append(so)
            cat["global_seed"].append(ids.seed)
        s_rows.append(_nc(M, "sequence_finalize", m, iso, site_count=cnt, start_sequence="000001",
                          end_sequence=f"{cnt:06d}"))
    cat["merchant_id"] = pa.array(cat["merchant_id"], pa.uint64())
    cat["global_seed"] = pa.array(cat["global_seed"], pa.uint64())
    with RngLogs(root, "1A", ids) as logs:
        logs.add_events("sequence_finalize", "1A.site_id_allocator", "sequence_finalize", _ev(s_rows))
    _publish(ctx, "outlet_catalogue", cat, ["merchant_id", "legal_country_iso", "site_order"])
    return ctx


@pytest.fixture(scope="module", autouse=True)
def _fixed_code_digest():
    """The code digest covers engine/**/*.py (decision 3); pin it so the tree built at fixture time and the
    identities S9 recomputes agree even while engine files change underneath the test session."""
    mp = pytest.MonkeyPatch()
    mp.setattr(identities, "code_digest", lambda repo_root: bytes(range(32)))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tree(tmp_path_factory, _fixed_code_digest):
    base = tmp_path_factory.mktemp("s9")
    cfg = _write_config(base / "cfg")
    ctx = build_tree(base / "good", cfg)
    return ctx


def _copy(ctx: RunContext, dst: Path) -> RunContext:
    for sub in ("data", "logs"):
        shutil.copytree(ctx.data_root / sub, dst / sub)
    return RunContext(data_root=dst, repo_root=ctx.repo_root, config=ctx.config, ids=ctx.ids, extra=ctx.extra)


def _codes(res) -> set[str]:
    return {f["code"] for f in res.failures}


def _rewrite_jsonl(path: Path, fn) -> None:
    rows = [json.loads(x) for x in path.read_bytes().splitlines() if x.strip()]
    rows = fn(rows)
    path.write_bytes(b"".join(publish.canonical_json_bytes(r) for r in rows))


def _validate_fail(ctx: RunContext, code: str) -> dict:
    """validate() only (no publishing): FAIL with ``code``; returns the parsed s9_summary.json bytes."""
    res = s9.validate(ctx)
    assert not res.passed and code in _codes(res), res.failures
    summary = json.loads(res.bundle_files["s9_summary.json"])
    assert summary["run"]["decision"] == "FAIL" and code in summary["failure_codes"]
    return summary


def _assert_fail(ctx: RunContext, code: str) -> dict:
    with pytest.raises(ValidationFailure) as ei:
        s9.run(ctx)
    assert code in ei.value.detail["failure_codes"], ei.value
    bdir = ctx.path("validation_bundle_1A")
    assert (bdir / "index.json").is_file() and (bdir / "s9_summary.json").is_file()
    assert not (bdir / "_passed.flag").exists()
    summary = json.loads((bdir / "s9_summary.json").read_bytes())
    assert summary["passed"] is False and summary["run"]["decision"] == "FAIL" and code in summary["failure_codes"]
    rec = json.loads((ctx.path("validation_failures_1A") / "failure.json").read_bytes())
    assert rec["state"] == "S9" and rec["failure_class"] == "F8" and "ts_utc" not in rec
    assert validate_record(rec, SCHEMAS / "validation_failures_1A.schema.json") == []
    with pytest.raises(GateError) as gi:
        s9.verify_1a_gate(ctx.data_root, ctx.ids)
    assert str(gi.value).startswith("No PASS -> no read:") and gi.value.code == "E_PASS_MISSING"
    return summary


# ====================================================================== tests
def test_pass_writes_flag_and_gate_verifies(tree, tmp_path):
    ctx = _copy(tree, tmp_path)
    res = s9.validate(ctx)
    assert res.passed, json.dumps(res.failures, indent=1)[:4000]
    s9.run(ctx)
    bdir = ctx.path("validation_bundle_1A")
    assert bdir.as_posix().endswith(f"validation/seed={ctx.ids.seed}/fingerprint={ctx.ids.manifest_fingerprint}")
    flag = s9.verify_1a_gate(ctx.data_root, ctx.ids)
    assert flag == bdir / "_passed.flag" and flag.read_text().startswith("sha256_hex = ")
    index = json.loads((bdir / "index.json").read_bytes())
    assert all(validate_record(e, SCHEMAS / "validation_bundle_1A.schema.json") == [] for e in index)
    paths = [e["path"] for e in index]
    for need in ("MANIFEST.json", "parameter_hash_resolved.json", "manifest_fingerprint_resolved.json",
                 "param_digest_log.jsonl", "fingerprint_artifacts.jsonl", "numeric_policy_attest.json",
                 "rng_accounting.json", "s9_summary.json", "egress_checksums.json", "index.json"):
        assert need in paths
    man = json.loads((bdir / "MANIFEST.json").read_bytes())
    assert "created_utc_ns" not in man and "git_commit" not in man and man["artifact_count"] == len(index)
    assert man["git_commit_hex"] == json.loads((bdir / "manifest_fingerprint_resolved.json").read_bytes())[
        "git_commit_hex"] and len(man["git_commit_hex"]) == 64
    assert man["math_profile_id"] == "test-profile"
    summary = json.loads((bdir / "s9_summary.json").read_bytes())
    assert summary["passed"] and summary["membership_source"] == "s6_membership" and summary["merchants_total"] == 6
    acct = json.loads((bdir / "rng_accounting.json").read_bytes())
    assert acct["audit_present"] and all(v["coverage_ok"] and v["totals_ok"] for v in acct["trace_keys"].values())
    ck = json.loads((bdir / "egress_checksums.json").read_bytes())
    assert [f["path"] for f in ck["files"]] == [
        f"data/layer1/1A/outlet_catalogue/seed={ctx.ids.seed}/fingerprint={ctx.ids.manifest_fingerprint}/part-00000.parquet"]
    # byte-deterministic: a re-run is a no-op and validate gives the same bytes
    before = {p.name: p.read_bytes() for p in bdir.iterdir()}
    s9.run(ctx)
    assert {p.name: p.read_bytes() for p in bdir.iterdir()} == before
    assert s9.validate(ctx).bundle_files == res.bundle_files
    assert s9.validate(tree).bundle_files == res.bundle_files  # another data root: no location in the bytes
    assert not ctx.path("validation_failures_1A").exists()
    # the gated reader re-checks the embedded identities
    t = s9.read_outlet_catalogue_gated(ctx.data_root, ctx.ids)
    assert t.num_rows > 6 and set(t.column("manifest_fingerprint").to_pylist()) == {ctx.ids.manifest_fingerprint}


def test_catalogue_changed_after_pass_is_refused_by_gate(tree, tmp_path):
    ctx = _copy(tree, tmp_path)
    s9.run(ctx)
    part = ctx.path("outlet_catalogue") / "part-00000.parquet"
    t = pq.read_table(part)
    pq.write_table(t.slice(0, t.num_rows - 1), part)
    with pytest.raises(GateError) as gi:
        s9.verify_1a_gate(ctx.data_root, ctx.ids)
    assert gi.value.code == "E_EGRESS_CHECKSUM_MISMATCH" and str(gi.value).startswith("No PASS -> no read:")
    assert str(ctx.path("validation_bundle_1A")) in str(gi.value)


def _edit_catalogue(ctx: RunContext, fn) -> None:
    part = ctx.path("outlet_catalogue") / "part-00000.parquet"
    t = pq.read_table(part)
    publish.write_parquet(fn(t), part)


def _multi_block_row(t: pa.Table) -> int:
    """Index of the last row of the first block with at least two sites."""
    m = t.column("merchant_id").to_pylist()
    c = t.column("legal_country_iso").to_pylist()
    n = t.column("final_country_outlet_count").to_pylist()
    for i in range(len(m) - 1, -1, -1):
        if n[i] >= 2 and (i + 1 == len(m) or (m[i + 1], c[i + 1]) != (m[i], c[i])):
            return i
    raise AssertionError("no block with two sites")


def test_catalogue_row_removed_fails_sum(tree, tmp_path):
    ctx = _copy(tree, tmp_path)

    def drop(t):
        i = _multi_block_row(t)
        return pa.concat_tables([t.slice(0, i), t.slice(i + 1)])

    _edit_catalogue(ctx, drop)
    summary = _assert_fail(ctx, "E_SUM_MISMATCH")
    assert "E_S8_SEQUENCE_GAP" in summary["failure_codes"]  # final_country_outlet_count no longer == rows
    assert summary["merchants_failed"] >= 1


def test_catalogue_site_order_gap_fails(tree, tmp_path):
    ctx = _copy(tree, tmp_path)

    def gap(t):
        i = _multi_block_row(t)
        so = t.column("site_order").to_pylist()
        so[i] += 1
        return t.set_column(t.column_names.index("site_order"), "site_order", pa.array(so, pa.int32()))

    _edit_catalogue(ctx, gap)
    _validate_fail(ctx, "E_S8_SEQUENCE_GAP")


def test_catalogue_unsorted_and_duplicate_rows_fail(tree, tmp_path):
    ctx = _copy(tree, tmp_path)
    _edit_catalogue(ctx, lambda t: pa.concat_tables([t.slice(1, 1), t]))
    summary = _validate_fail(ctx, "E_WRITER_SORT_BROKEN")
    assert "E_DUP_PK" in summary["failure_codes"]


def test_event_removed_fails_rng_accounting(tree, tmp_path):
    ctx = _copy(tree, tmp_path)
    part = ctx.path("rng_event", family="residual_rank") / "part-00000.jsonl"
    _rewrite_jsonl(part, lambda rows: rows[:-1])
    summary = _assert_fail(ctx, "E_TRACE_COVERAGE_MISSING")
    assert "E_TRACE_TOTALS_MISMATCH" in summary["failure_codes"]
    assert "E_S7_PARITY" in summary["failure_codes"]


def test_wrong_trace_total_fails(tree, tmp_path):
    ctx = _copy(tree, tmp_path)

    def bump(rows):
        key = [i for i, r in enumerate(rows) if r["module"] == "1A.hurdle_sampler"]
        last = max(key, key=lambda i: rows[i]["events_total"])
        rows[last]["draws_total"] = int(rows[last]["draws_total"]) + 1
        return rows

    _rewrite_jsonl(ctx.path("rng_trace_log"), bump)
    summary = _assert_fail(ctx, "E_TRACE_TOTALS_MISMATCH")
    assert "E_TRACE_COVERAGE_MISSING" not in summary["failure_codes"]


def test_hurdle_u_replayed_from_philox(tree, tmp_path):
    """A stochastic hurdle u moved by one ulp (still in (0,1), still consistent with is_multi) is caught only by
    the Philox replay."""
    ctx = _copy(tree, tmp_path)
    part = ctx.path("rng_event", family="hurdle_bernoulli") / "part-00000.jsonl"

    def nudge(rows):
        r = next(r for r in rows if r["u"] is not None and not r["is_multi"])
        r["u"] = math.nextafter(r["u"], 1.0)
        return rows

    _rewrite_jsonl(part, nudge)
    summary = _validate_fail(ctx, "E_S1_REPLAY_MISMATCH")
    assert set(summary["failure_codes"]) == {"E_S1_REPLAY_MISMATCH"}


def test_nb_gamma_value_replayed(tree, tmp_path):
    ctx = _copy(tree, tmp_path)
    part = ctx.path("rng_event", family="gamma_component") / "part-00000.jsonl"

    def nudge(rows):
        rows[0]["gamma_value"] = math.nextafter(rows[0]["gamma_value"], 0.0)
        return rows

    _rewrite_jsonl(part, nudge)
    summary = _validate_fail(ctx, "E_S2_REPLAY_MISMATCH")
    assert "E_S2_COMPONENT_ORDER" in summary["failure_codes"]  # lambda == (mu/phi)*gamma_value no longer holds


def test_gating_violation_for_single_site_event(tree, tmp_path):
    """An nb_final for a single-site merchant (decision 19: no S2..S7 events)."""
    ctx = _copy(tree, tmp_path)
    part = ctx.path("rng_event", family="nb_final") / "part-00000.jsonl"
    M = rng.master_material("1A", ctx.ids.fingerprint_bytes, ctx.ids.seed)

    def add(rows):
        r = dict(rows[0])
        hi, lo = _base(M, "nb_final", 4)
        r.update(merchant_id=4, rng_counter_before_hi=hi, rng_counter_before_lo=lo, rng_counter_after_hi=hi,
                 rng_counter_after_lo=lo)
        return sorted(rows + [r], key=lambda x: x["merchant_id"])

    _rewrite_jsonl(part, add)
    summary = _validate_fail(ctx, "E_S1_GATING_VIOLATION")
    assert "E_TRACE_COVERAGE_MISSING" in summary["failure_codes"]


def test_lineage_recompute_mismatch(tree, tmp_path):
    """A parameter file edited after the run: recomputed identities differ from the path tokens."""
    ctx = _copy(tree, tmp_path)
    cfg = json.loads(json.dumps(ctx.config))
    p = tmp_path / "policy.s3.bounds.yaml"
    p.write_text("# changed\n")
    cfg["segment1a"]["parameters"]["policy.s3.bounds.yaml"] = str(p)
    ctx2 = RunContext(data_root=ctx.data_root, repo_root=ctx.repo_root, config=cfg, ids=ctx.ids, extra=ctx.extra)
    _validate_fail(ctx2, "E_LINEAGE_RECOMPUTE_MISMATCH")


# ---------------------------------------------------------------------- pure parts
def test_corridor_fallback_matches_s2():
    from engine.segment1a import s2_nb_outlets as s2

    r_ = np.random.default_rng(7)
    mu = r_.uniform(2.0, 30.0, 200)
    phi = r_.uniform(0.3, 5.0, 200)
    r = r_.integers(0, 3, 200)
    pol = {"rho_reject_max": 0.2, "p99_max": 3, "cusum": {"reference_k": 0.5, "threshold_h": 16.0, "alpha_cap": 0.999}}
    a = s9.s2_corridor_metrics(mu, phi, r, pol)
    b = s2.corridor_metrics(mu, phi, r, pol)
    for k in ("M", "R", "A", "rho_hat", "p99", "breaches"):
        assert a[k] == b[k], k
    assert a["s_max"] == pytest.approx(b["s_max"], rel=1e-12)


def test_corridor_breach_code():
    nb = __import__("pandas").DataFrame({"merchant_id": np.arange(1, 101, dtype=np.uint64), "mu": np.full(100, 7.0),
                                         "dispersion_k": np.full(100, 2.25),
                                         "nb_rejections": np.r_[np.zeros(98), [5, 6]].astype(np.int64)})
    pol = {"rho_reject_max": 0.5, "p99_max": 3, "cusum": {"reference_k": 0.5, "threshold_h": 100.0}}
    f = s9.Failures()
    met = s9.check_s2_corridors(nb, pol, f)
    assert met["breaches"] == ["p99"] and met["p99"] == 5
    assert [x["code"] for x in f.items] == ["corridor_breach"] and "p99" in f.items[0]["detail"]
    f2 = s9.Failures()
    s9.check_s2_corridors(nb.assign(nb_rejections=np.zeros(100, np.int64)), pol, f2)
    assert f2.items == []
    f3 = s9.Failures()  # spec constants (rho <= 0.06) and the runbook CUSUM: all three breached
    met = s9.check_s2_corridors(nb, {"rho_reject_max": 0.06, "p99_max": 3,
                                     "cusum": {"reference_k": 0.5, "threshold_h": 16.0}}, f3)
    assert met["breaches"] == ["rho", "p99", "cusum"] and len(f3.items) == 3


def test_u64_helpers_exact():
    big = np.array([(1 << 64) - 1, (1 << 64) - 1, 5], dtype=np.uint64)
    assert s9._u128_sum(big) == 2 * ((1 << 64) - 1) + 5
    ok = s9._u128_delta_is([1, 0], [0, 5], [0, 0], [(1 << 64) - 1, 7], [1, 0])
    assert ok.tolist() == [True, False]  # carry across the 64-bit boundary; after < before never matches
    assert s9._parse_u64(np.array(["18446744073709551615", "x", None], dtype=object)).tolist() == [
        (1 << 64) - 1, (1 << 64) - 1, (1 << 64) - 1]


def test_reconcile_findings_are_rnglogs_own(tree, tmp_path, monkeypatch):
    """S9 streams the logs through rnglog's reconcile parts (one event family held at a time): its findings are
    rnglog.reconcile(chain=True)'s failure dicts, whole (richer details included), in the same order."""
    from engine.core import rnglog

    ctx = _copy(tree, tmp_path)
    _rewrite_jsonl(ctx.path("rng_trace_log"), lambda rows: [r for i, r in enumerate(rows) if i != 3])
    _rewrite_jsonl(ctx.path("rng_event", family="residual_rank") / "part-00000.jsonl", lambda rows: rows[:-1])
    _rewrite_jsonl(ctx.path("rng_event", family="gumbel_key") / "part-00000.jsonl",
                   lambda rows: rows + [dict(rows[-1])])  # a duplicate: breaks its substream's chain
    ctx.path("rng_audit_log").write_bytes(b"")
    got = []
    orig = rnglog.reconcile_summaries
    monkeypatch.setattr(rnglog, "reconcile_summaries", lambda *a, **k: got.append(orig(*a, **k)) or got[-1])
    res = s9.validate(ctx)
    assert not res.passed and len(got) == 1
    want = rnglog.reconcile(ctx.data_root, ctx.ids, chain=True, config=ctx.config)
    assert got[0] == want
    codes = [f["code"] for f in want]
    assert codes[0] == "E_RNG_AUDIT_MISSING" and {"E_RNG_COUNTER_MISMATCH", "E_TRACE_COVERAGE_MISSING",
                                                  "E_TRACE_TOTALS_MISMATCH"} <= set(codes)
