"""RNG logs: envelope writing, u64/float exactness, trace accounting, reconciliation (00-core 3.6, 3.7)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine.core import rnglog as R
from engine.core.context import SegmentIds
from engine.core.errors import RngError

U64MAX = 2 ** 64 - 1
IDS = SegmentIds("1A", U64MAX, "a" * 64, "b" * 64, "c" * 32)
IDS_1B = SegmentIds("1B", U64MAX, "d" * 64, "e" * 64, "f" * 32)
CODE_DIGEST = "0123456789abcdef" * 4
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def counters(blocks: list[int], start: int) -> dict:
    """Chained u128 counters for consecutive events of one substream starting at ``start``."""
    bh, bl, ah, al = [], [], [], []
    c = start
    for b in blocks:
        bh.append(c >> 64)
        bl.append(c & U64MAX)
        c += b
        ah.append(c >> 64)
        al.append(c & U64MAX)
    u = lambda x: np.array(x, dtype=np.uint64)  # noqa: E731
    return dict(before_hi=u(bh), before_lo=u(bl), after_hi=u(ah), after_lo=u(al), blocks=u(blocks))


def logs_with_audit(root: Path, ids: SegmentIds = IDS) -> R.RngLogs:
    logs = R.RngLogs(root, ids.segment, ids)
    logs.write_audit(build_commit=CODE_DIGEST, code_digest=CODE_DIGEST)
    return logs


def canonical(line: str) -> str:
    return json.dumps(json.loads(line), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# ---------------------------------------------------------------------- formatting
def test_float_text_is_python_repr():
    rng = np.random.default_rng(7)
    vals = np.concatenate([
        rng.random(20000), rng.random(2000) * 1e-5, rng.integers(-10 ** 6, 10 ** 6, 2000).astype(float),
        rng.integers(0, U64MAX, 20000, dtype=np.uint64).view(np.float64),
        [0.0, -0.0, 1.0, 1e-4, 9.9999e-5, 1e15, 1e16, 123456789012345.0, 0.1 + 0.2, 1 / 3, 5e-324,
         1.7976931348623157e308, 2.5e-07, 0.9999999999999999],
    ])
    vals = vals[np.isfinite(vals)]
    want = [repr(float(v)) for v in vals]
    assert R._float_strings(vals).to_pylist() == want
    old = R._FLOAT_PAR_MIN
    try:  # the two-thread path (large columns): same text, same order
        R._FLOAT_PAR_MIN = 2
        assert R._float_strings(vals).to_pylist() == want
        assert R._float_strings(vals[:3]).to_pylist() == want[:3]
    finally:
        R._FLOAT_PAR_MIN = old


def test_string_text_is_json_dumps():
    vals = ['GB', 'a"b', "back\\slash", "caf\u00e9", "tab\tnew\nline", "\x7f", ""]
    assert R._json_strings(pa.array(vals)).to_pylist() == [json.dumps(v) for v in vals]


# ---------------------------------------------------------------------- round trip
def test_round_trip_u64_17_digit_floats_nulls(tmp_path):
    logs = logs_with_audit(tmp_path)
    mids = np.array([1, 2 ** 63 + 1, U64MAX, 12345], dtype=np.uint64)
    c = {"before_hi": np.array([5, 2 ** 63, U64MAX - 1, 0], np.uint64),
         "before_lo": np.array([U64MAX, 17, U64MAX, 0], np.uint64)}
    blocks = np.array([1, 0, 1, 1], np.uint64)
    c["after_hi"] = c["before_hi"] + (c["before_lo"] == U64MAX).astype(np.uint64) * blocks
    c["after_lo"] = c["before_lo"] + blocks  # wraps to 0 with a carry into hi
    u = [0.1 + 0.2, None, 1e-05, 0.9999999999999999]
    cols = dict(c, merchant_id=mids, blocks=blocks, draws=blocks.copy(), pi=[0.5, 1.0, 0.7, 1e-300],
                u=u, is_multi=[True, True, True, False], deterministic=[False, True, False, False])
    assert logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", cols) == 4
    summary = logs.close()
    assert summary["events"] == {"hurdle_bernoulli": {"events": 4, "parts": ["part-00000.jsonl"]}}
    path = logs.event_dir("hurdle_bernoulli") / "part-00000.jsonl"
    assert "logs/rng/events/hurdle_bernoulli/seed=18446744073709551615/" in path.as_posix()
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    for line in lines:
        assert line == canonical(line)  # sorted keys, compact, ASCII
    rows = [json.loads(x) for x in lines]
    assert [r["merchant_id"] for r in rows] == [int(x) for x in mids]
    assert rows[0]["u"] == 0.1 + 0.2 and '"u":0.30000000000000004' in lines[0]
    assert '"u":1e-05' in lines[2] and '"pi":1e-300' in lines[3]
    assert rows[1]["u"] is None and '"u":null' in lines[1]
    assert rows[0]["rng_counter_after_hi"] == 6 and rows[0]["rng_counter_after_lo"] == 0
    assert rows[2]["rng_counter_after_hi"] == U64MAX
    assert [r["draws"] for r in rows] == ["1", "0", "1", "1"]
    assert all(r["seed"] == U64MAX and r["run_id"] == "c" * 32 for r in rows)
    assert len({r["ts_utc"] for r in rows}) == 1 and TS_RE.match(rows[0]["ts_utc"])
    assert rows[0]["is_multi"] is True and rows[1]["deterministic"] is True
    t = R.read_events(tmp_path, IDS, "hurdle_bernoulli")
    assert t.schema.field("merchant_id").type == pa.uint64()
    assert t["merchant_id"].to_pylist() == [int(x) for x in mids]
    assert t["u"].to_pylist() == u
    assert t["rng_counter_before_hi"].to_pylist() == [5, 2 ** 63, U64MAX - 1, 0]
    assert t["draws"].to_pylist() == ["1", "0", "1", "1"]
    assert R.read_events(tmp_path, IDS, "hurdle_bernoulli", columns=["u"]).column_names == ["u"]
    assert R.reconcile(tmp_path, IDS, chain=True) == []
    # a line with a field outside the closed schema is reported, not silently read
    path.write_text(path.read_text().replace('"pi":0.5,', '"pi":0.5,"extra":1,', 1))
    with pytest.raises(RngError, match="E_SCHEMA_INVALID"):
        R.read_events(tmp_path, IDS, "hurdle_bernoulli")
    assert "E_SCHEMA_INVALID" in {f["code"] for f in R.reconcile(tmp_path, IDS)}


def test_optional_fields_are_omitted_and_lists_written(tmp_path):
    logs = logs_with_audit(tmp_path)
    c = counters([1, 1, 1], 1000)
    logs.add_events("gumbel_key", "1A.foreign_country_selector", "gumbel_key", dict(
        c, draws=[1, 1, 1], merchant_id=[7, 7, 7], country_iso=["DE", "FR", "GB"], weight=[0.5, 0.0, 0.5],
        u=[0.25, 0.5, 0.75], key=[-0.3, np.nan, 1.25], selected=[False, False, True],
        selection_order=[None, None, 1]))
    logs.add_events("dirichlet_gamma_vector", "1A.dirichlet_allocator", "dirichlet_gamma_vector", dict(
        counters([4], 5), draws=[6], merchant_id=[7], home_country_iso=["GB"], country_isos=[["GB", "DE"]],
        alpha=[[1.5, 0.25]], gamma_raw=[[2.0, 0.1]], weights=[[0.95, 0.05]], n_domestic=[None]))
    logs.close()
    lines = (logs.event_dir("gumbel_key") / "part-00000.jsonl").read_text().splitlines()
    assert "selection_order" not in lines[0] and '"selection_order":1' in lines[2]
    assert '"key":null' in lines[1]  # required, nullable
    assert all(line == canonical(line) for line in lines)
    t = R.read_events(tmp_path, IDS, "gumbel_key")
    assert t["selection_order"].to_pylist() == [None, None, 1]
    d = (logs.event_dir("dirichlet_gamma_vector") / "part-00000.jsonl").read_text()
    assert '"alpha":[1.5,0.25]' in d and '"country_isos":["GB","DE"]' in d and "n_domestic" not in d
    dt = R.read_events(tmp_path, IDS, "dirichlet_gamma_vector")
    assert dt["weights"].to_pylist() == [[0.95, 0.05]]
    assert R.reconcile(tmp_path, IDS, families=["gumbel_key", "dirichlet_gamma_vector"]) == []


def test_anchor_event_without_merchant(tmp_path):
    logs = logs_with_audit(tmp_path)
    z = np.zeros(1, np.uint64)
    logs.add_events("anchor", "1A.s0", "s0.anchor", dict(before_hi=z, before_lo=z, after_hi=z, after_lo=z,
                                                           blocks=z, draws=z))
    logs.close()
    row = json.loads((logs.event_dir("anchor") / "part-00000.jsonl").read_text())
    assert "merchant_id" not in row and row["draws"] == "0" and row["module"] == "1A.s0"
    assert R.reconcile(tmp_path, IDS, families=["anchor"]) == []


# ---------------------------------------------------------------------- audit and guards
def test_audit_must_exist_and_is_written_once(tmp_path):
    logs = R.RngLogs(tmp_path, "1A", IDS)
    c = counters([1], 10)
    cols = dict(c, draws=[1], merchant_id=[1], pi=[0.5], u=[0.2], is_multi=[True], deterministic=[False])
    with pytest.raises(RngError) as ei:
        logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", cols)
    assert ei.value.code == "E_RNG_AUDIT_MISSING"
    assert logs.write_audit(build_commit=CODE_DIGEST, rng_key=2 ** 64 - 1) is True
    assert logs.write_audit(build_commit=CODE_DIGEST, rng_key=2 ** 64 - 1, ts_utc="2000-01-01T00:00:00.000000Z") is False
    rows = R.read_audit(tmp_path, IDS)
    assert len(rows) == 1
    assert rows[0]["algorithm"] == "philox2x64-10" and rows[0]["rng_key"] == 2 ** 64 - 1
    assert rows[0]["seed"] == U64MAX and rows[0]["manifest_fingerprint"] == "b" * 64
    assert logs.write_audit(build_commit=CODE_DIGEST, rng_key=2 ** 64 - 1, notes="rerun") is True
    assert len(R.read_audit(tmp_path, IDS)) == 2
    with pytest.raises(RngError, match="E_RNG_ENVELOPE"):
        logs.write_audit(build_commit="not-hex")
    with pytest.raises(RngError, match="E_RNG_ENVELOPE"):
        logs.write_audit(build_commit=CODE_DIGEST, hostnme="typo")


@pytest.mark.parametrize("case,code", [
    ("unregistered_pair", "E_RNG_ENVELOPE"),
    ("other_segment_family", "E_RNG_ENVELOPE"),
    ("unknown_column", "E_RNG_ENVELOPE"),
    ("missing_payload", "E_RNG_ENVELOPE"),
    ("bad_payload_value", "E_RNG_ENVELOPE"),
    ("negative_counter", "E_RNG_ENVELOPE"),
    ("counter_mismatch", "E_RNG_COUNTER_MISMATCH"),
    ("budget", "E_RNG_BUDGET_VIOLATION"),
    ("nonconsuming_moved", "E_NONCONSUMING_CHANGED_COUNTERS"),
])
def test_writer_refuses_bad_events(tmp_path, case, code):
    logs = logs_with_audit(tmp_path)
    c = counters([1, 1], 50)
    g = dict(c, draws=[1, 1], merchant_id=[3, 3], country_iso=["DE", "FR"], weight=[0.5, 0.5], u=[0.1, 0.2],
             key=[0.0, 1.0], selected=[True, False])
    fam, mod, lab = "gumbel_key", "1A.foreign_country_selector", "gumbel_key"
    if case == "unregistered_pair":
        mod = "1A.hurdle_sampler"
    elif case == "other_segment_family":
        fam, mod, lab = "site_tile_assign", "1B.S5.assigner", "site_tile_assign"
    elif case == "unknown_column":
        g["attempt_index"] = [1, 2]
    elif case == "missing_payload":
        del g["weight"]
    elif case == "bad_payload_value":
        g["country_iso"] = ["DE", "fr"]
    elif case == "negative_counter":
        g["before_lo"] = np.array([-1, 3], dtype=np.int64)
    elif case == "counter_mismatch":
        g["blocks"] = np.array([1, 2], np.uint64)
    elif case == "budget":
        g["draws"] = [1, 2]
    elif case == "nonconsuming_moved":
        fam, mod, lab = "nb_final", "1A.nb_sampler", "nb_final"
        g = dict(counters([0], 9), draws=[0], merchant_id=[3], mu=[2.0], dispersion_k=[1.5], n_outlets=[4],
                 nb_rejections=[0])
        g["after_lo"] = g["after_lo"] + np.uint64(1)
        g["blocks"] = np.array([1], np.uint64)
    with pytest.raises(RngError) as ei:
        logs.add_events(fam, mod, lab, g)
    assert ei.value.code == code
    logs.close()
    assert not (tmp_path / "logs/rng/events").exists()  # nothing written


# ---------------------------------------------------------------------- trace
def _s2_writer(root: Path) -> R.RngLogs:
    logs = logs_with_audit(root)
    # merchant 10: two gamma attempts chained, two poisson attempts; merchant 2**63+7: one each
    g1, g2 = counters([2, 3], 100), counters([2], 900)
    p1, p2 = counters([3, 1], 2 ** 64 + 5), counters([5], 7)
    cat = lambda a, b: {k: np.concatenate([a[k], b[k]]) for k in a}  # noqa: E731
    mids = np.array([10, 10, 2 ** 63 + 7], np.uint64)
    logs.add_events("gamma_component", "1A.nb_and_dirichlet_sampler", "gamma_nb", dict(
        cat(g1, g2), draws=[3, 4, 3], merchant_id=mids, context="nb", index=0, alpha=[4.5, 4.5, 0.75],
        gamma_value=[2.25, 3.0, 0.5]))
    logs.add_events("poisson_component", "1A.nb_poisson_component", "poisson_nb", dict(
        cat(p1, p2), draws=[3, 1, 5], merchant_id=mids, context="nb", **{"lambda": [1.5, 1.5, 6.25]},
        k=[1, 0, 4], attempt=[1, 2, 1]))
    z = counters([0, 0], 42)
    logs.add_events("nb_final", "1A.nb_sampler", "nb_final", dict(
        z, draws=[0, 0], merchant_id=np.array([10, 2 ** 63 + 7], np.uint64), mu=[3.0, 6.5], dispersion_k=[2.0, 0.5],
        n_outlets=[2, 4], nb_rejections=[1, 0]))
    return logs


def test_trace_is_cumulative_per_key_and_reruns_do_not_double(tmp_path):
    logs = _s2_writer(tmp_path)
    summary = logs.close()
    assert summary["trace_keys"] == [["1A.nb_and_dirichlet_sampler", "gamma_nb"],
                                     ["1A.nb_poisson_component", "poisson_nb"], ["1A.nb_sampler", "nb_final"]]
    tr = R.read_trace(tmp_path, IDS)
    assert tr.num_rows == 8
    g = tr.filter(pa.compute.equal(tr["substream_label"], "gamma_nb")).to_pylist()
    assert [(r["events_total"], r["blocks_total"], r["draws_total"]) for r in g] == [(1, 2, 3), (2, 5, 7), (3, 7, 10)]
    p = tr.filter(pa.compute.equal(tr["substream_label"], "poisson_nb")).to_pylist()
    assert p[0]["rng_counter_before_hi"] == 1 and p[0]["rng_counter_before_lo"] == 5  # u128 start above 2**64
    assert all(r["seed"] == U64MAX and "parameter_hash" not in r for r in tr.to_pylist())
    assert R.reconcile(tmp_path, IDS, chain=True) == []
    first_trace = R.trace_path(tmp_path, IDS).read_text().splitlines()
    # re-run the same state: events replaced, trace rows of its keys replaced (never doubled)
    _s2_writer(tmp_path).close()
    second = R.trace_path(tmp_path, IDS).read_text().splitlines()
    assert len(second) == len(first_trace) == 8
    assert [json.loads(x)["events_total"] for x in second] == [json.loads(x)["events_total"] for x in first_trace]
    assert R.read_events(tmp_path, IDS, "gamma_component").num_rows == 3
    assert R.reconcile(tmp_path, IDS, chain=True) == []


def test_s2_and_s4_share_a_family_in_separate_parts(tmp_path):
    _s2_writer(tmp_path).close()

    def s4():
        logs = R.RngLogs(tmp_path, "1A", IDS)  # audit already written by S0/S1
        p = counters([2, 1], 555)
        key = ("1A.ztp_sampler", "poisson_component")
        logs.add_events("poisson_component", *key, dict(
            p, draws=[2, 1], merchant_id=[10, 10], context="ztp", **{"lambda": [0.5, 0.5]}, k=[0, 2],
            attempt=[1, 2]), part=1)
        at = {k: v[:1] for k, v in counters([0], 557).items()}
        logs.add_events("ztp_rejection", *key, dict(
            at, draws=[0], merchant_id=[10], context="ztp", lambda_extra=[0.5], k=[0], attempt=[1]))
        logs.add_events("ztp_final", *key, dict(
            counters([0], 558), draws=[0], merchant_id=[10], context="ztp", K_target=[2], lambda_extra=[0.5],
            attempts=[2], regime="inversion"))
        return logs.close()

    s4()
    pc_table = R.read_events(tmp_path, IDS, "poisson_component", with_source=True)
    assert pc_table["_part"].to_pylist() == ["part-00000.jsonl"] * 3 + ["part-00001.jsonl"] * 2
    assert pc_table["context"].to_pylist() == ["nb", "nb", "nb", "ztp", "ztp"]
    tr = R.read_trace(tmp_path, IDS)
    s4rows = tr.filter(pa.compute.equal(tr["module"], "1A.ztp_sampler")).to_pylist()
    assert [r["events_total"] for r in s4rows] == [1, 2, 3, 4]  # one key across three families
    assert s4rows[-1]["blocks_total"] == 3 and s4rows[-1]["draws_total"] == 3
    assert R.reconcile(tmp_path, IDS, chain=True) == []
    assert R.reconcile(tmp_path, IDS, families=["ztp_final"]) == []
    s4()  # re-run S4 only
    assert R.read_trace(tmp_path, IDS).num_rows == tr.num_rows
    assert R.reconcile(tmp_path, IDS) == []


# ---------------------------------------------------------------------- reconcile
def _write_gumbel(root: Path) -> Path:
    logs = logs_with_audit(root)
    n = 5
    logs.add_events("gumbel_key", "1A.foreign_country_selector", "gumbel_key", dict(
        counters([1] * n, 2 ** 70), draws=[1] * n, merchant_id=[1, 1, 2, 2, 3],
        country_iso=["DE", "FR", "DE", "US", "GB"], weight=[0.5, 0.5, 0.25, 0.75, 1.0],
        u=[0.1, 0.2, 0.3, 0.4, 0.5], key=[0.1, 0.2, 0.3, 0.4, 0.5], selected=[True, False, True, True, True],
        selection_order=[1, None, 2, 1, 1]))
    logs.add_events("nb_final", "1A.nb_sampler", "nb_final", dict(
        counters([0], 77), draws=[0], merchant_id=[1], mu=[2.0], dispersion_k=[1.0], n_outlets=[3],
        nb_rejections=[0]))
    logs.close()
    assert R.reconcile(root, IDS) == []
    return logs.event_dir("gumbel_key") / "part-00000.jsonl"


def _edit_line(path: Path, i: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[i]
    lines[i] = lines[i].replace(old, new, 1)
    path.write_text("".join(lines))


def _codes(failures: list[dict]) -> set[str]:
    return {f["code"] for f in failures}


def test_reconcile_detects_a_removed_event(tmp_path):
    p = _write_gumbel(tmp_path)
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:2] + lines[3:]))
    f = R.reconcile(tmp_path, IDS)
    assert _codes(f) == {"E_TRACE_COVERAGE_MISSING", "E_TRACE_TOTALS_MISMATCH"}
    assert all(x["family"] == "gumbel_key" for x in f)


def test_reconcile_detects_a_changed_counter(tmp_path):
    p = _write_gumbel(tmp_path)
    row = json.loads(p.read_text().splitlines()[3])
    _edit_line(p, 3, f'"rng_counter_after_lo":{row["rng_counter_after_lo"]}',
               f'"rng_counter_after_lo":{row["rng_counter_after_lo"] + 1}')
    f = R.reconcile(tmp_path, IDS)
    assert _codes(f) == {"E_RNG_COUNTER_MISMATCH"}
    assert f[0]["rows"][0]["_line"] == 3 and f[0]["rows"][0]["_part"] == "part-00000.jsonl"
    assert f[0]["rows"][0]["merchant_id"] == 2 and f[0]["count"] == 1


def test_reconcile_detects_wrong_draws(tmp_path):
    p = _write_gumbel(tmp_path)
    _edit_line(p, 1, '"draws":"1"', '"draws":"2"')
    f = R.reconcile(tmp_path, IDS)
    assert _codes(f) == {"E_RNG_BUDGET_VIOLATION", "E_TRACE_TOTALS_MISMATCH"}
    budget = [x for x in f if x["code"] == "E_RNG_BUDGET_VIOLATION"][0]
    assert budget["rows"][0]["_line"] == 1
    _edit_line(p, 1, '"draws":"2"', '"draws":"01"')
    assert "E_RNG_BUDGET_VIOLATION" in _codes(R.reconcile(tmp_path, IDS))


def test_reconcile_detects_identity_audit_and_nonconsuming_problems(tmp_path):
    p = _write_gumbel(tmp_path)
    _edit_line(p, 0, '"run_id":"' + "c" * 32, '"run_id":"' + "0" * 32)
    assert _codes(R.reconcile(tmp_path, IDS)) == {"E_PATH_EMBED_MISMATCH"}
    _edit_line(p, 0, '"run_id":"' + "0" * 32, '"run_id":"' + "c" * 32)
    nb = R.event_dir(tmp_path, IDS, "nb_final") / "part-00000.jsonl"
    row = json.loads(nb.read_text())
    _edit_line(nb, 0, f'"rng_counter_after_lo":{row["rng_counter_after_lo"]}',
               f'"rng_counter_after_lo":{row["rng_counter_after_lo"] + 1}')
    assert {"E_NONCONSUMING_CHANGED_COUNTERS", "E_RNG_COUNTER_MISMATCH"} <= _codes(R.reconcile(tmp_path, IDS))
    R.audit_path(tmp_path, IDS).unlink()
    assert "E_RNG_AUDIT_MISSING" in _codes(R.reconcile(tmp_path, IDS))


def _composed_reconcile(root: Path, ids: SegmentIds, chain: bool, dictionary: bool) -> list[dict]:
    """reconcile from its public parts, one event table at a time (as 1A S9 streams the logs)."""
    fams = R.dictionary.load(ids.segment).families()
    summaries: dict = {}
    for f in R.reconciled_families(fams, ids.segment):
        try:
            ev = R.read_events(root, ids, f, with_source=True, dictionary=dictionary)
        except RngError as exc:
            summaries[f] = exc
            continue
        summaries[f] = R.summarise_events(ev, f, fams[f], ids, chain=chain)
        del ev
    try:
        tsum = R.summarise_trace(R.read_trace(root, ids, dictionary=dictionary), ids)
    except RngError as exc:
        tsum = exc
    return R.reconcile_summaries(ids, fams, summaries, tsum, R.read_audit(root, ids), R.audit_path(root, ids))


def test_reconcile_is_the_composition_of_its_parts(tmp_path, monkeypatch):
    p = _write_gumbel(tmp_path)
    for chain in (False, True):
        assert _composed_reconcile(tmp_path, IDS, chain, True) == R.reconcile(tmp_path, IDS, chain=chain) == []
    # faults: one trace row removed (nb_final's only one), one event removed, a counter off its chain, no audit
    tp = R.trace_path(tmp_path, IDS)
    lines = tp.read_text().splitlines(keepends=True)
    kept = [x for x in lines if '"substream_label":"nb_final"' not in x]
    assert len(kept) == len(lines) - 1
    tp.write_text("".join(kept))
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:1] + lines[2:]))
    row = json.loads(p.read_text().splitlines()[2])
    _edit_line(p, 2, f'"rng_counter_before_lo":{row["rng_counter_before_lo"]}',
               f'"rng_counter_before_lo":{row["rng_counter_before_lo"] + 7}')
    R.audit_path(tmp_path, IDS).unlink()
    for chain in (False, True):
        want = R.reconcile(tmp_path, IDS, chain=chain)
        assert [f["code"] for f in want][:1] == ["E_RNG_AUDIT_MISSING"]
        assert _codes(want) == {"E_RNG_AUDIT_MISSING", "E_RNG_COUNTER_MISMATCH", "E_TRACE_COVERAGE_MISSING",
                                "E_TRACE_TOTALS_MISMATCH"}
        cover = [(f["family"], f["trace_rows"], f["events"]) for f in want if f["code"] == "E_TRACE_COVERAGE_MISSING"]
        assert cover == [("gumbel_key", 5, 4), ("nb_final", 0, 1)]  # sorted by (module, label)
        assert want[1]["code"] == "E_RNG_COUNTER_MISMATCH" and want[1]["rows"][0]["_line"] == 2
        for dictionary in (False, True):  # plain (1A S9's reads) or dictionary strings: the same failures
            assert _composed_reconcile(tmp_path, IDS, chain, dictionary) == want
        with monkeypatch.context() as m:  # the sort paths (final row by the full 00-core 3.7 sort, chain sort)
            _slow_checks(m)
            assert _composed_reconcile(tmp_path, IDS, chain, False) == want
    # unreadable logs are reported in place of their summaries (an event family; the trace ends the list)
    nb = R.event_dir(tmp_path, IDS, "nb_final") / "part-00000.jsonl"
    nb.write_text(nb.read_text() + '{"not": "an event"}\n')
    tp.write_text(tp.read_text() + '{"module": 1}\n')
    want = R.reconcile(tmp_path, IDS, chain=True)
    read_errors = [f for f in want if f.get("path")]
    assert [f["family"] for f in read_errors] == [None, "nb_final", None]  # audit, nb_final, trace (last)
    assert want[-1] is read_errors[-1]
    assert _composed_reconcile(tmp_path, IDS, True, False) == want
    with pytest.raises(ValueError):  # anything but an RngError is not a finding
        R.reconcile_summaries(IDS, R.dictionary.load("1A").families(), {}, ValueError("boom"), [])
    # a chain break (1B site_tile_assign: merchant 5 / DE's second event jumps) with a removed trace row
    root = tmp_path / "b"
    logs = logs_with_audit(root, IDS_1B)
    a, b, b2 = counters([1, 1, 1], 500), counters([1], 9000), counters([1], 1000)
    logs.add_events("site_tile_assign", "1B.S5.assigner", "site_tile_assign", dict(
        {k: np.concatenate([a[k], b[k], b2[k]]) for k in a}, draws=[1] * 5, merchant_id=[4, 4, 4, 5, 5],
        legal_country_iso=["GB", "GB", "GB", "DE", "DE"], site_order=[1, 2, 3, 1, 2],
        tile_id=np.array([2 ** 64 - 1, 7, 7, 1, 2], np.uint64), u=[0.5, 0.25, 0.75, 0.5, 0.5]))
    logs.close()
    tp = R.trace_path(root, IDS_1B)
    tp.write_text("".join(tp.read_text().splitlines(keepends=True)[:-1]))  # the final row: totals differ too
    for chain in (False, True):
        want = R.reconcile(root, IDS_1B, chain=chain)
        assert [f["code"] for f in want] == ["E_RNG_COUNTER_MISMATCH"] * chain + [
            "E_TRACE_COVERAGE_MISSING", "E_TRACE_TOTALS_MISMATCH"]
        for dictionary in (False, True):
            assert _composed_reconcile(root, IDS_1B, chain, dictionary) == want
        with monkeypatch.context() as m:
            _slow_checks(m)
            assert _composed_reconcile(root, IDS_1B, chain, True) == want


def test_chain_check_detects_a_gap_within_one_substream(tmp_path):
    logs = logs_with_audit(tmp_path, IDS_1B)
    a = counters([1, 1, 1], 500)
    b = counters([1], 9000)
    b2 = counters([1], 1000)  # merchant 5 / DE second event jumps: before != previous after
    cat = {k: np.concatenate([a[k], b[k], b2[k]]) for k in a}
    logs.add_events("site_tile_assign", "1B.S5.assigner", "site_tile_assign", dict(
        cat, draws=[1] * 5, merchant_id=[4, 4, 4, 5, 5], legal_country_iso=["GB", "GB", "GB", "DE", "DE"],
        site_order=[1, 2, 3, 1, 2], tile_id=np.array([2 ** 64 - 1, 7, 7, 1, 2], np.uint64),
        u=[0.5, 0.25, 0.75, 0.5, 0.5]))
    logs.close()
    assert "logs/rng/events/site_tile_assign/seed=18446744073709551615/parameter_hash=" + "d" * 64 in \
        (logs.event_dir("site_tile_assign")).as_posix()
    assert R.reconcile(tmp_path, IDS_1B) == []
    f = R.reconcile(tmp_path, IDS_1B, chain=True)
    assert _codes(f) == {"E_RNG_COUNTER_MISMATCH"}
    assert f[0]["rows"][0]["merchant_id"] == 5 and f[0]["rows"][0]["_line"] == 4


def test_in_cell_jitter_1b(tmp_path):
    logs = logs_with_audit(tmp_path, IDS_1B)
    logs.add_events("in_cell_jitter", "1B.S6.jitter", "in_cell_jitter", dict(
        counters([1, 1], 77), draws=[2, 2], merchant_id=[4, 4], legal_country_iso=["GB", "GB"], site_order=[1, 1],
        delta_lat_deg=[0.001, -0.5], delta_lon_deg=[-0.25, 0.125], sigma_lat_deg=0, sigma_lon_deg=np.float64(0)))
    logs.close()
    rows = [json.loads(x) for x in (logs.event_dir("in_cell_jitter") / "part-00000.jsonl").read_text().splitlines()]
    text = (logs.event_dir("in_cell_jitter") / "part-00000.jsonl").read_text()
    assert '"sigma_lat_deg":0.0,' in text and '"sigma_lon_deg":0.0,' in text  # int 0 typed as a float
    assert R.reconcile(tmp_path, IDS_1B, chain=True) == []
    with pytest.raises(RngError, match="E_RNG_BUDGET_VIOLATION"):
        logs.add_events("in_cell_jitter", "1B.S6.jitter", "in_cell_jitter", dict(
            counters([1], 5), draws=[1], merchant_id=[4], legal_country_iso=["GB"], site_order=[2],
            delta_lat_deg=[0.0], delta_lon_deg=[0.0], sigma_lat_deg=0.0, sigma_lon_deg=0.0))


# ---------------------------------------------------------------------- throughput
def test_writer_throughput(tmp_path):
    """Columnar writing: events + their trace rows. Prints the CPU rate; the bound is loose (shared CI)."""
    n = 100_000
    rng = np.random.default_rng(0)
    bh = rng.integers(0, U64MAX, n, dtype=np.uint64)
    bl = rng.integers(0, U64MAX - 1, n, dtype=np.uint64)
    u = rng.random(n)
    cols = dict(before_hi=bh, before_lo=bl, after_hi=bh, after_lo=bl + np.uint64(1), blocks=np.ones(n, np.uint64),
                draws=np.ones(n, np.uint64), merchant_id=rng.integers(1, U64MAX, n, dtype=np.uint64),
                country_iso=pa.array(rng.choice(["DE", "FR", "GB", "US"], n)), weight=rng.random(n), u=u,
                key=np.log(u), selected=u < 0.5, selection_order=np.where(u < 0.5, 1, np.nan))
    logs = logs_with_audit(tmp_path)
    logs.add_events("gumbel_key", "1A.foreign_country_selector", "gumbel_key",
                    {k: v[:100] for k, v in cols.items()})
    logs.close()  # warm-up (numba cache)
    t0, w0 = time.process_time(), time.perf_counter()
    logs.add_events("gumbel_key", "1A.foreign_country_selector", "gumbel_key", cols)
    logs.close()
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    print(f"\nrnglog writer: {n / cpu:,.0f} events/s CPU, {n / wall:,.0f} events/s wall "
          f"(events + trace rows, {n} gumbel_key events)")
    assert n / cpu > 100_000
    t = R.read_events(tmp_path, IDS, "gumbel_key", columns=["u", "merchant_id"])
    assert np.array_equal(t["u"].to_numpy(), u)
    assert np.array_equal(t["merchant_id"].to_numpy(), cols["merchant_id"])


def test_accounting_totals_for_bundles(tmp_path):
    _s2_writer(tmp_path).close()
    acc = R.accounting(tmp_path, IDS, families=["gamma_component", "poisson_component", "nb_final"])
    assert acc["audit_present"] is True
    assert acc["families"]["gamma_component"] == {"events_total": 3, "blocks_total": 7, "draws_total": "10",
                                                  "nonconsuming_events": 0}
    assert acc["families"]["nb_final"]["nonconsuming_events"] == 2
    s = acc["streams"]["1A.nb_poisson_component|poisson_nb"]
    assert s == {"events_total": 3, "blocks_total": 9, "draws_total": "9", "trace_rows_total": 3,
                 "trace_final": {"events_total": 3, "blocks_total": 9, "draws_total": 9}}


# ---------------------------------------------------------------------- columnar mirrors, trace appends
def _families_on_disk(root: Path, ids: SegmentIds) -> list[str]:
    d = root / "logs/rng/events"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _mirror_only(monkeypatch) -> None:
    """Any JSONL parse now fails: reads must come from the mirrors."""
    def boom(*a, **k):
        raise AssertionError("JSONL parsed although a valid mirror exists")
    monkeypatch.setattr(R, "_read_jsonl", boom)
    monkeypatch.setattr(R, "_parse_trace_bytes", boom)


def test_mirrors_equal_the_jsonl_parse_for_every_family(tmp_path, monkeypatch):
    """Mirror rows == parsed JSONL rows (u64 extremes, nulls, omitted optionals, lists, constants, strings)."""
    _s2_writer(tmp_path).close()
    _write_gumbel(tmp_path / "g")
    logs = logs_with_audit(tmp_path)
    logs.add_events("dirichlet_gamma_vector", "1A.dirichlet_allocator", "dirichlet_gamma_vector", dict(
        counters([4, 2], 5), draws=[6, 3], merchant_id=[7, U64MAX], home_country_iso=["GB", "DE"],
        country_isos=[["GB", "DE"], ["DE"]], alpha=[[1.5, 0.25], [2.0]], gamma_raw=[[2.0, 0.1], [1e-300]],
        weights=[[0.95, 0.05], [1.0]], n_domestic=[None, 3]))
    z = np.zeros(1, np.uint64)
    logs.add_events("anchor", "1A.s0", "s0.anchor", dict(before_hi=z, before_lo=z, after_hi=z, after_lo=z,
                                                           blocks=z, draws=z))
    logs.close()
    for root in (tmp_path, tmp_path / "g"):
        fams = _families_on_disk(root, IDS)
        assert len(fams) >= 2
        parsed = {f: R.read_events(root, IDS, f, source="jsonl", with_source=True) for f in fams}
        trace = R.read_trace(root, IDS, source="jsonl")
        for f in fams:
            for p in R.event_dir(root, IDS, f).glob("part-*.jsonl"):
                assert R.mirror_path(p).is_file()
        with monkeypatch.context() as m:
            _mirror_only(m)
            for f in fams:
                got = R.read_events(root, IDS, f, with_source=True)
                assert got.equals(parsed[f]), f
                assert got.schema == parsed[f].schema
                cols = [c for c in ("u", "merchant_id") if c in got.column_names]
                assert R.read_events(root, IDS, f, columns=cols).equals(parsed[f].select(cols))
            assert R.read_trace(root, IDS).equals(trace)
            assert R.reconcile(root, IDS, chain=True) == []
    with pytest.raises(ValueError):
        R.read_events(tmp_path, IDS, "anchor", source="parquet")


def test_a_changed_jsonl_is_parsed_not_its_stale_mirror(tmp_path):
    p = _write_gumbel(tmp_path)
    _edit_line(p, 1, '"draws":"1"', '"draws":"7"')  # same size, same instant: only the bytes differ
    assert R.read_events(tmp_path, IDS, "gumbel_key")["draws"].to_pylist()[1] == "7"
    # a corrupt or foreign mirror is ignored, never trusted
    m = R.mirror_path(p)
    m.write_bytes(b"not parquet")
    assert R.read_events(tmp_path, IDS, "gumbel_key")["draws"].to_pylist()[1] == "7"
    m.unlink()
    assert R.read_events(tmp_path, IDS, "gumbel_key")["draws"].to_pylist()[1] == "7"


def _hurdle_writer(root: Path, n: int = 4) -> None:
    logs = R.RngLogs(root, "1A", IDS)
    logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", dict(
        counters([1] * n, 3000), draws=[1] * n, merchant_id=np.arange(1, n + 1, dtype=np.uint64), pi=[0.5] * n,
        u=[0.25] * n, is_multi=[True] * n, deterministic=[False] * n))
    logs.close()


def test_trace_is_appended_when_keys_are_new_and_rewritten_on_a_rerun(tmp_path, monkeypatch):
    _s2_writer(tmp_path).close()
    tpath = R.trace_path(tmp_path, IDS)
    first = tpath.read_bytes()
    _hurdle_writer(tmp_path)  # a new key: appended, the earlier bytes untouched
    second = tpath.read_bytes()
    assert second.startswith(first) and len(second) > len(first)
    segs = sorted(tpath.parent.glob("_mirror.rng_trace_log.*.parquet"))
    assert [int(s.name.split(".")[2]) for s in segs] == [0, len(first)]
    want = R.read_trace(tmp_path, IDS, source="jsonl")
    with monkeypatch.context() as m:
        _mirror_only(m)
        assert R.read_trace(tmp_path, IDS).equals(want)
    # re-run of S2: its keys' rows are dropped and re-appended; one mirror segment covers the new file
    _s2_writer(tmp_path).close()
    third = tpath.read_bytes()
    assert len(third.splitlines()) == len(second.splitlines())
    assert [json.loads(x)["module"] for x in third.splitlines()][:4] == ["1A.hurdle_sampler"] * 4
    assert len(list(tpath.parent.glob("_mirror.rng_trace_log.*.parquet"))) == 1
    want = R.read_trace(tmp_path, IDS, source="jsonl")
    with monkeypatch.context() as m:
        _mirror_only(m)
        assert R.read_trace(tmp_path, IDS).equals(want)
        assert R.reconcile(tmp_path, IDS) == []
    # without its mirror the file is simply parsed
    for s in tpath.parent.glob("_mirror.rng_trace_log.*.parquet"):
        s.unlink()
    assert R.read_trace(tmp_path, IDS).equals(want)


def test_trace_gap_parse_and_tampered_segment(tmp_path, monkeypatch):
    _s2_writer(tmp_path).close()
    _hurdle_writer(tmp_path)
    tpath = R.trace_path(tmp_path, IDS)
    segs = sorted(tpath.parent.glob("_mirror.rng_trace_log.*.parquet"))
    assert len(segs) == 2
    segs[0].unlink()  # first range parsed, second from its segment
    calls = []
    parse = R._parse_trace_bytes
    monkeypatch.setattr(R, "_parse_trace_bytes", lambda buf, *a: calls.append(buf.size) or parse(buf, *a))
    assert R.read_trace(tmp_path, IDS).equals(R.read_trace(tmp_path, IDS, source="jsonl"))
    assert calls == [int(segs[1].name.split(".")[2])]  # only the uncovered range was parsed
    assert R.reconcile(tmp_path, IDS) == []
    # a same-size edit inside the mirrored range: the segment no longer verifies, the edit is seen
    lines = tpath.read_bytes().splitlines(keepends=True)
    i = max(j for j, x in enumerate(lines) if b'"substream_label":"hurdle_bernoulli"' in x)
    lines[i] = lines[i].replace(b'"draws_total":4', b'"draws_total":5')
    tpath.write_bytes(b"".join(lines))
    assert _codes(R.reconcile(tmp_path, IDS)) == {"E_TRACE_TOTALS_MISMATCH"}


def test_torn_trace_tail_is_dropped_by_the_next_writer(tmp_path):
    _s2_writer(tmp_path).close()
    tpath = R.trace_path(tmp_path, IDS)
    good = tpath.read_bytes()
    with open(tpath, "ab") as f:
        f.write(b'{"blocks_total":1,"draws_tot')  # an append cut short by a crash
    with pytest.raises(RngError, match="E_SCHEMA_INVALID"):
        R.read_trace(tmp_path, IDS)
    _hurdle_writer(tmp_path)  # drops the torn line, appends its rows, reconciles clean
    assert tpath.read_bytes().startswith(good)
    assert b'"draws_tot{' not in tpath.read_bytes()
    assert R.read_trace(tmp_path, IDS).num_rows == len(good.splitlines()) + 4
    assert R.reconcile(tmp_path, IDS) == []


def test_drop_trace_keys_matches_the_line_rule():
    lines = [b'{"module":"A","substream_label":"x"}', b'{"module":"A","substream_label":"xy"}',
             b'{"module":"B","substream_label":"x"}', b"", b'{"substream_label":"x"}',
             b'{"module":"A","note":"\\"module\\":\\"B\\"","substream_label":"x"}']
    data = b"\n".join(lines) + b"\n"
    kept = R._drop_trace_keys(data, {("A", "x")})
    assert kept == b"\n".join([lines[1], lines[2], lines[3], lines[4]]) + b"\n"
    assert R._drop_trace_keys(data + b'{"module":"B"', {("Z", "z")}) == data  # torn tail dropped
    assert R._drop_trace_keys(b"", {("A", "x")}) == b""


def test_verified_digest_cache_never_hides_an_edit(tmp_path, monkeypatch):
    """A part settled for > 2 s is hashed once per process; a later same-size edit (new ctime) is still seen."""
    p = _write_gumbel(tmp_path)
    time.sleep(2.1)
    hashed = []
    real = R._buffer_sha256
    monkeypatch.setattr(R, "_buffer_sha256", lambda b: hashed.append(len(b)) or real(b))
    for _ in range(2):
        assert R.read_events(tmp_path, IDS, "gumbel_key", verify="sha256")["draws"].to_pylist()[1] == "1"
    assert hashed == [p.stat().st_size]  # second read: cached digest
    _edit_line(p, 1, '"draws":"1"', '"draws":"3"')
    assert R.read_events(tmp_path, IDS, "gumbel_key")["draws"].to_pylist()[1] == "3"


# ---------------------------------------------------------------------- dictionary reads, fast checks, prefetch
def _slow_checks(monkeypatch) -> None:
    """Disable the one-pass proofs: every check takes its sort / filter path."""
    monkeypatch.setattr(R, "_chains_clean", lambda *a, **k: False)
    monkeypatch.setattr(R, "_final_trace_row_of",
                        lambda trace, rows, ev: R._final_trace_row(trace.take(pa.array(rows, pa.int64()))))


def test_dictionary_reads_and_pre_read_reconcile_equal_the_plain_path(tmp_path, monkeypatch):
    _s2_writer(tmp_path).close()
    p = _write_gumbel(tmp_path / "g")
    for root in (tmp_path, tmp_path / "g"):
        for f in _families_on_disk(root, IDS):
            plain = R.read_events(root, IDS, f, with_source=True)
            dic = R.read_events(root, IDS, f, with_source=True, dictionary=True)
            assert any(pa.types.is_dictionary(x.type) for x in dic.schema)  # from the mirror, as stored
            assert R.plain_strings(dic).equals(plain), f
            spec = R.dictionary.load("1A").families()[f]
            assert R.check_events(dic, f, spec, IDS) == R.check_events(plain, f, spec, IDS) == []
            d1, b1 = R.parse_draws(dic)
            d2, b2 = R.parse_draws(plain)
            assert np.array_equal(d1, d2) and np.array_equal(b1, b2)
        tr = R.read_trace(root, IDS, dictionary=True)
        assert R.plain_strings(tr).equals(R.read_trace(root, IDS))
        for f in _families_on_disk(root, IDS):
            assert R.stream_rows(tr, "no.such", "module").size == 0
    # a tampered counter and draws: the same failures whether reconcile reads or is handed the tables
    row = json.loads(p.read_text().splitlines()[3])
    _edit_line(p, 3, f'"rng_counter_after_lo":{row["rng_counter_after_lo"]}',
               f'"rng_counter_after_lo":{row["rng_counter_after_lo"] + 1}')
    _edit_line(p, 1, '"draws":"1"', '"draws":"2"')
    root = tmp_path / "g"
    want = R.reconcile(root, IDS, chain=True)
    assert _codes(want) == {"E_RNG_COUNTER_MISMATCH", "E_RNG_BUDGET_VIOLATION", "E_TRACE_TOTALS_MISMATCH"}
    events = {f: R.read_events(root, IDS, f, with_source=True, dictionary=True) for f in _families_on_disk(root, IDS)}
    assert R.reconcile(root, IDS, chain=True, events=events, trace=R.read_trace(root, IDS, dictionary=True)) == want
    with monkeypatch.context() as m:
        _slow_checks(m)
        assert R.reconcile(root, IDS, chain=True) == want
    assert R.reconcile(root, IDS, chain=True, source="jsonl") == want


def _chain_table(order: list[int], iso_dictionary: bool, broken: int | None = None) -> pa.Table:
    """site_tile_assign-like events of 3 substreams (4 events each), rows in ``order``; ``broken`` moves one
    event's counters off its chain."""
    mids, isos, bh, bl, ah, al = [], [], [], [], [], []
    for s, (m, iso) in enumerate([(5, "GB"), (5, "DE"), (9, "GB")]):
        for k in range(4):
            mids.append(m)
            isos.append(iso)
            bh.append(s)
            bl.append(100 + k)
            ah.append(s)
            al.append(101 + k)
    if broken is not None:
        bl[broken] += 7
        al[broken] += 7
    take = lambda x, t: pa.array([x[i] for i in order], t)  # noqa: E731
    iso = take(isos, pa.string())
    n = len(order)
    return pa.table({
        "module": pa.array(["1B.S5.assigner"] * n), "substream_label": pa.array(["site_tile_assign"] * n),
        "merchant_id": take(mids, pa.uint64()),
        "legal_country_iso": pc_dictionary(iso) if iso_dictionary else iso,
        "rng_counter_before_hi": take(bh, pa.uint64()), "rng_counter_before_lo": take(bl, pa.uint64()),
        "rng_counter_after_hi": take(ah, pa.uint64()), "rng_counter_after_lo": take(al, pa.uint64()),
        "blocks": pa.array([1] * n, pa.uint64()), "_line": pa.array(list(range(n)), pa.int64())})


def pc_dictionary(arr):
    import pyarrow.compute as pc

    return pc.dictionary_encode(arr)


@pytest.mark.parametrize("iso_dictionary", [False, True])
def test_chain_fast_path_agrees_with_the_sort(monkeypatch, iso_dictionary):
    spec = {"stream_key": ["merchant_id", "legal_country_iso"]}
    writer = list(range(12))  # rows (5,GB) (5,DE) (9,GB): not in key order across streams, each stream contiguous
    key_order = [4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11]  # (5,DE) (5,GB) (9,GB): key order
    interleaved = [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    cases = []
    for order in (writer, key_order, interleaved):
        for broken in (None, 2, 9):
            cases.append((order, broken))
    for order, broken in cases:
        t = _chain_table(order, iso_dictionary, broken)
        fast = R.check_chains(t, "site_tile_assign", spec)
        with monkeypatch.context() as m:
            m.setattr(R, "_chains_clean", lambda *a, **k: False)
            slow = R.check_chains(t, "site_tile_assign", spec)
        assert fast == slow, (order, broken)
        assert bool(slow) == (broken is not None)
    # the one-pass proof holds only for key-ordered, unbroken tables
    assert R._chains_clean(_chain_table(key_order, iso_dictionary), ["merchant_id", "legal_country_iso"])
    assert not R._chains_clean(_chain_table(key_order, iso_dictionary, 9), ["merchant_id", "legal_country_iso"])
    assert not R._chains_clean(_chain_table(interleaved, iso_dictionary), ["merchant_id", "legal_country_iso"])


def test_parse_draws_per_distinct_value_plain_and_dictionary():
    vals = ["1", "0", "01", "", None, str(U64MAX), str(U64MAX + 1), "\uff12", "7", " 7", "7\n"]
    want_bad = [False, False, True, True, True, False, True, True, False, True, True]
    want_num = [1, 0, 0, 0, 0, U64MAX, 0, 0, 7, 0, 0]
    for arr in (pa.array(vals, pa.string()), pc_dictionary(pa.array(vals, pa.string()))):
        num, bad = R.parse_draws(pa.table({"draws": pa.chunked_array([arr.slice(0, 4), arr.slice(4)])}))
        assert bad.tolist() == want_bad and num.tolist() == want_num


def test_prefetched_digests_are_used_and_never_hide_an_edit(tmp_path, monkeypatch):
    p = _write_gumbel(tmp_path)
    monkeypatch.setattr(R, "_SETTLED_NS", -1)  # treat the fresh files as settled
    monkeypatch.setattr(R, "_VERIFIED", {})
    monkeypatch.setattr(R, "_PENDING", {})
    monkeypatch.setenv("ENGINE_RNGLOG_VERIFY", "sha256")  # the process default: always hash
    assert R.prefetch_digests(tmp_path, IDS, ["gumbel_key", "nb_final"], verify="stat") == 0  # stat-trusted
    n = R.prefetch_digests(tmp_path, IDS, ["gumbel_key", "nb_final"])
    assert n == 3  # two event parts and the trace's one mirror segment
    assert R.prefetch_digests(tmp_path, IDS, ["gumbel_key"]) == 0  # already pending or verified
    want = R.read_events(tmp_path, IDS, "gumbel_key", source="jsonl")
    with monkeypatch.context() as m:
        _mirror_only(m)  # the prefetched digests match: mirrors are used
        assert R.read_events(tmp_path, IDS, "gumbel_key").equals(want)
        assert R.read_events(tmp_path, IDS, "nb_final").num_rows == 1
        assert R.read_trace(tmp_path, IDS).num_rows == 6
    assert not R._PENDING  # every prefetched digest was consumed by a read
    # an edit after the prefetch (same size; a new stat) is parsed, never hidden by the earlier digest
    st = p.stat()
    _edit_line(p, 1, '"draws":"1"', '"draws":"5"')
    os_utime_ns = (st.st_atime_ns, st.st_mtime_ns + 1_000_000_000)
    import os

    os.utime(p, ns=os_utime_ns)
    assert R.prefetch_digests(tmp_path, IDS, ["gumbel_key"]) == 1
    assert R.read_events(tmp_path, IDS, "gumbel_key")["draws"].to_pylist()[1] == "5"


def test_mirrors_are_lz4_and_hash_thread_honours_the_offset(tmp_path):
    import hashlib

    import pyarrow.parquet as pq

    p = _write_gumbel(tmp_path)
    md = pq.ParquetFile(R.mirror_path(p)).metadata
    assert md.row_group(0).column(0).compression == "LZ4"
    chunks = [np.frombuffer(bytes([i % 251]) * (1000 + i), np.uint8) for i in range(40)]
    data = b"".join(c.tobytes() for c in chunks)
    for start in (0, 1, 999, 5000, len(data) - 1):
        h = hashlib.sha256()
        size = R._atomic_write(tmp_path / "x.bin", iter(chunks), hasher=h, hash_from=start)
        assert size == len(data) and (tmp_path / "x.bin").read_bytes() == data
        assert h.digest() == hashlib.sha256(data[start:]).digest()


def test_close_reports_progress_lines(tmp_path):
    import io

    from engine.core.progress import Progress

    logs = logs_with_audit(tmp_path)
    n = 7
    logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", dict(
        counters([1] * n, 3000), draws=[1] * n, merchant_id=np.arange(1, n + 1, dtype=np.uint64), pi=[0.5] * n,
        u=[0.25] * n, is_multi=[True] * n, deterministic=[False] * n))
    buf = io.StringIO()
    logs.close(progress=Progress("1A.S1", total=2 * n, unit="rng log lines", stream=buf))
    last = buf.getvalue().splitlines()[-1]
    assert last.startswith("[progress] 1A.S1 rng log lines 14/14 (100.0%)") and last.endswith("done")
    assert R.reconcile(tmp_path, IDS) == []


def test_close_runs_alongside_after_its_checks_and_raises_its_error(tmp_path):
    n = 5
    cols = dict(counters([1] * n, 3000), draws=[1] * n, merchant_id=np.arange(1, n + 1, dtype=np.uint64),
                pi=[0.5] * n, u=[0.25] * n, is_multi=[True] * n, deterministic=[False] * n)
    calls = []
    logs = logs_with_audit(tmp_path)
    logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", cols)
    logs.close(alongside=lambda: calls.append("published"))
    assert calls == ["published"] and R.reconcile(tmp_path, IDS) == []

    def fails():
        raise RngError("E_TEST", "publish failed")

    root = tmp_path / "b"
    logs = logs_with_audit(root)
    logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", cols)
    with pytest.raises(RngError, match="E_TEST"):
        logs.close(alongside=fails)
    assert R.reconcile(root, IDS) == []  # the logs were completed before the error surfaced
    # a close that fails its own checks never runs it (nothing is published beside refused logs)
    root = tmp_path / "c"
    logs = logs_with_audit(root)
    logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", cols)
    R.audit_path(root, IDS).unlink()
    with pytest.raises(RngError, match="E_RNG_AUDIT_MISSING"):
        logs.close(alongside=lambda: calls.append("too early"))
    assert calls == ["published"]


# ---------------------------------------------------------------------- stat fast path, direct I/O, parallel render
def _count_hashes(monkeypatch) -> list:
    hashed: list = []
    real = R._buffer_sha256
    monkeypatch.setattr(R, "_buffer_sha256", lambda b: hashed.append(len(b)) or real(b))
    monkeypatch.setattr(R, "_VERIFIED", {})
    monkeypatch.setattr(R, "_PENDING", {})
    return hashed


def _same_size_edit_keeping_mtime(path: Path, old: bytes, new: bytes) -> None:
    import os

    st = path.stat()
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as the writer left them
    st2 = path.stat()
    assert (st2.st_size, st2.st_mtime_ns, st2.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert st2.st_ctime_ns != st.st_ctime_ns


def test_stat_fast_path_trusts_only_an_unchanged_file(tmp_path, monkeypatch):
    p = _write_gumbel(tmp_path)
    meta = R._mirror_meta(R.mirror_path(p))[1]
    assert R._stat_matches(meta["stat"], p.stat())
    hashed = _count_hashes(monkeypatch)
    want = R.read_events(tmp_path, IDS, "gumbel_key", source="jsonl")
    with monkeypatch.context() as m:
        _mirror_only(m)
        assert R.read_events(tmp_path, IDS, "gumbel_key").equals(want)
        assert R.read_trace(tmp_path, IDS).num_rows == 6
        assert R.reconcile(tmp_path, IDS) == []
        assert hashed == []  # trusted by stat: nothing hashed
        assert R.prefetch_digests(tmp_path, IDS, ["gumbel_key", "nb_final"]) == 0
        # forced full verification (archival audits): argument or process default
        assert R.read_events(tmp_path, IDS, "gumbel_key", verify="sha256").equals(want)
        assert hashed == [p.stat().st_size]
        m.setenv("ENGINE_RNGLOG_VERIFY", "sha256")
        hashed.clear()
        assert R.read_trace(tmp_path, IDS).num_rows == 6
        assert len(hashed) == 1
    with pytest.raises(ValueError):
        R.read_events(tmp_path, IDS, "gumbel_key", verify="trust")
    # a same-size edit with mtime restored: ctime differs, the file is hashed and the edit seen
    _same_size_edit_keeping_mtime(p, b'"draws":"1"', b'"draws":"7"')
    assert R.read_events(tmp_path, IDS, "gumbel_key")["draws"].to_pylist()[0] == "7"
    tpath = R.trace_path(tmp_path, IDS)
    _same_size_edit_keeping_mtime(tpath, b'"draws_total":1,', b'"draws_total":9,')
    assert "E_TRACE_TOTALS_MISMATCH" in _codes(R.reconcile(tmp_path, IDS))


def test_copied_root_hashes_and_still_uses_its_mirrors(tmp_path, monkeypatch):
    import shutil

    _s2_writer(tmp_path / "a").close()
    _hurdle_writer(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copy2: mtime kept, inode and ctime new
    hashed = _count_hashes(monkeypatch)
    want = R.read_trace(tmp_path / "a", IDS, source="jsonl")
    with monkeypatch.context() as m:
        _mirror_only(m)
        assert R.read_trace(tmp_path / "b", IDS).equals(want)
        assert R.reconcile(tmp_path / "b", IDS, chain=True) == []
    assert len(hashed) >= 3  # two trace segments and the event parts were hashed, then trusted


def test_trace_stat_chain_is_extended_only_over_an_unchanged_file(tmp_path, monkeypatch):
    _s2_writer(tmp_path).close()
    _hurdle_writer(tmp_path)
    tpath = R.trace_path(tmp_path, IDS)
    segs = R._trace_segments(tpath)
    assert [len(s[4]["stat_chain"]) for s in segs] == [1, 2]
    assert segs[1][4]["stat_chain"][0] == [segs[0][0], segs[0][1], segs[0][2]]
    hashed = _count_hashes(monkeypatch)
    with monkeypatch.context() as m:
        _mirror_only(m)
        assert R.reconcile(tmp_path, IDS) == []
    assert hashed == []
    # the file changed between two appends (same size, mtime restored): the next appender vouches only for its
    # own range, so the earlier one is hashed -- and the edit found -- from then on
    root2 = tmp_path / "r2"
    _s2_writer(root2).close()
    t2 = R.trace_path(root2, IDS)
    _same_size_edit_keeping_mtime(t2, b'"events_total":1,', b'"events_total":8,')
    _hurdle_writer(root2)
    segs = R._trace_segments(t2)
    assert [len(s[4]["stat_chain"]) for s in segs] == [1, 1]
    hashed.clear()
    assert "E_TRACE_TOTALS_MISMATCH" in _codes(R.reconcile(root2, IDS)) or \
        "E_TRACE_COVERAGE_MISSING" in _codes(R.reconcile(root2, IDS))
    assert hashed  # the first segment no longer verifies by stat
    assert R.read_trace(root2, IDS).equals(R.read_trace(root2, IDS, source="jsonl"))


def test_settled_stat_waits_past_the_timestamp_tick(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x")
    rec = R._settled_stat(p)
    assert rec is not None and R._stat_matches(rec, p.stat())
    assert R._clock_ns() >= rec["ctime_ns"]  # any later change gets a later ctime


def _direct_roundtrip(d: Path) -> None:
    import os

    from engine.core import _direct_io as D

    rng = np.random.default_rng(7)
    want = bytearray()
    path = d / "x.bin"
    fd, direct = D.open_fd(path)
    w = D.SeqWriter(fd, 0, direct)
    buf = D.aligned_empty(3 * D.BLOCK + 4096 * 8)
    for i in range(30):
        n = int(rng.integers(0, 3 * D.BLOCK))
        data = rng.integers(0, 256, n, dtype=np.uint8)
        if i % 3 == 0:  # placed at the phase, as the renderer does: written without a copy
            ph = w.phase()
            buf[ph:ph + n] = data
            w.write(buf[ph:ph + n])
        elif i % 3 == 1:
            w.write(data.tobytes())
        else:
            w.write(memoryview(np.concatenate([[0], data]).astype(np.uint8))[1:])  # odd address
        want += data.tobytes()
    w.finish()
    os.fsync(fd)
    os.close(fd)
    assert path.read_bytes() == bytes(want)
    # appends at an unaligned offset rewrite the partial block unchanged
    for _ in range(3):
        extra = rng.integers(0, 256, int(rng.integers(1, 2 * D.BLOCK)), dtype=np.uint8).tobytes()
        fd, direct = D.open_fd(path, append=True)
        w = D.SeqWriter(fd, len(want), direct)
        w.write(extra)
        w.finish()
        os.close(fd)
        want += extra
        assert path.read_bytes() == bytes(want)


def test_direct_writer_bytes_on_disk_and_tmpfs(tmp_path):
    _direct_roundtrip(tmp_path)
    shm = Path("/dev/shm")
    if shm.is_dir():
        import tempfile

        with tempfile.TemporaryDirectory(dir=shm) as d:
            _direct_roundtrip(Path(d))


def _fixed_ts(monkeypatch) -> None:
    monkeypatch.setattr(R, "utc_now", lambda: "2026-01-01T00:00:00.000000Z")


def _log_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "logs").rglob("*.jsonl"))}


def test_direct_io_fallbacks_give_the_same_bytes(tmp_path, monkeypatch):
    import errno
    import fcntl
    import os

    from engine.core import _direct_io as D

    _fixed_ts(monkeypatch)
    _s2_writer(tmp_path / "ref").close()
    _hurdle_writer(tmp_path / "ref", 200)
    ref = _log_bytes(tmp_path / "ref")
    real_open, real_pwrite = os.open, os.pwrite
    with monkeypatch.context() as m:  # the file system refuses O_DIRECT at open (tmpfs on older kernels)
        m.setattr(os, "open", lambda p, fl, *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "no O_DIRECT"))
                  if fl & D.O_DIRECT else real_open(p, fl, *a))
        _s2_writer(tmp_path / "a").close()
        _hurdle_writer(tmp_path / "a", 200)
    assert _log_bytes(tmp_path / "a") == ref
    refused = []

    def pwrite(fd, data, off):  # ... or at the first write: O_DIRECT is cleared, the write retried buffered
        if fcntl.fcntl(fd, fcntl.F_GETFL) & D.O_DIRECT:
            refused.append(off)
            raise OSError(errno.EINVAL, "no O_DIRECT")
        return real_pwrite(fd, data, off)

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", pwrite)
        m.setattr(R, "_CHUNK_BYTES", 5000)  # several chunks, whole blocks among them
        _s2_writer(tmp_path / "b").close()
        _hurdle_writer(tmp_path / "b", 200)
    assert _log_bytes(tmp_path / "b") == ref
    if D.enabled():
        assert refused
    with monkeypatch.context() as m:  # O_DIRECT disabled by the environment
        m.setenv("ENGINE_DIRECT_IO", "0")
        _s2_writer(tmp_path / "c").close()
        _hurdle_writer(tmp_path / "c", 200)
    assert _log_bytes(tmp_path / "c") == ref
    assert R.reconcile(tmp_path / "b", IDS, chain=True) == []


def test_parallel_render_keeps_the_line_order(tmp_path, monkeypatch):
    _fixed_ts(monkeypatch)
    n = 3000
    mids = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(2 ** 40 + 12345)

    def write(root: Path) -> dict:
        logs = logs_with_audit(root)
        logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", dict(
            counters([1] * n, 2 ** 66), draws=[1] * n, merchant_id=mids, pi=np.linspace(0.001, 0.999, n),
            u=np.linspace(1e-9, 0.5, n), is_multi=np.arange(n) % 3 == 0, deterministic=[False] * n))
        logs.close()
        return _log_bytes(root)

    with monkeypatch.context() as m:
        m.setattr(R, "_PAR_MIN_ROWS", 10 ** 9)
        ref = write(tmp_path / "serial")
    with monkeypatch.context() as m:
        m.setattr(R, "_PAR_MIN_ROWS", 2)
        m.setattr(R, "_CHUNK_BYTES", 50_000)  # many chunks, each rendered as two halves
        got = write(tmp_path / "parallel")
    assert got == ref
    assert len(next(v for k, v in got.items() if "events" in k).splitlines()) == n
