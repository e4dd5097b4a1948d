"""1A S9 at scale: the fast paths (sorted-array set operations, pre-sorted frames, dictionary-read datasets
checked in Arrow, per-family event processing, trace checked from Arrow arrays, rnglog.reconcile computed
from the tables S9 already read) must decide exactly like the plain pandas code they stand in for.

The strongest check is differential: on a tree with one injected fault at a time, ``validate`` with every
fast path disabled (the plain code, and ``rnglog.reconcile`` re-reading the logs) gives the same bundle bytes
as the default run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_1a_s9 as t9

from engine.core import identities, rnglog
from engine.core.context import SegmentIds
from engine.core.schema import arrow_schema, load_schema, validate_table
from engine.segment1a import s9_validation as s9

SCHEMAS = t9.SCHEMAS


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The S9 fixture tree of test_1a_s9 (code digest pinned, as there)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(identities, "code_digest", lambda repo_root: bytes(range(32)))
    base = tmp_path_factory.mktemp("s9perf")
    ctx = t9.build_tree(base / "good", t9._write_config(base / "cfg"))
    yield ctx
    mp.undo()


# ====================================================================== pure helpers
def test_set_helpers_match_numpy():
    r = np.random.default_rng(5)
    for dt in (np.uint64, np.int64, np.int32):
        hi = np.iinfo(dt).max
        a = r.integers(0, 50, 400).astype(dt)
        b = r.integers(20, 80, 300).astype(dt)
        a[:3] = [hi, 0, hi]
        for x, y in ((a, b), (a, a[:0]), (a[:0], b), (a[:1], b)):
            assert np.array_equal(s9._uniq(x), np.unique(x)) and s9._uniq(x).dtype == np.unique(x).dtype
            assert np.array_equal(s9._isin(x, y), np.isin(x, y))
            assert np.array_equal(s9._setdiff(x, y), np.setdiff1d(x, y))
            assert np.array_equal(s9._intersect(x, y), np.intersect1d(x, y))
            assert np.array_equal(s9._union(x, y), np.union1d(x, y))
            assert np.array_equal(s9._setxor(x, y), np.setxor1d(x, y))
    # other dtypes (strings, mixed widths) go to numpy itself
    s = np.array(["GB", "DE", "GB", "US"], dtype="U")
    assert np.array_equal(s9._isin(s, np.array(["GB"], dtype="U")), [True, False, True, False])
    assert np.array_equal(s9._setdiff(np.array([5, 1], np.uint64), np.array([1], np.int64)), [5])


@pytest.mark.parametrize("by,asc", [
    (["m", "iso", "r"], True),
    (["m", "r"], [True, False]),
    (["m", "key", "iso"], [True, False, True]),
    (["flag", "m"], [False, True]),
    (["m", "x"], True),  # NaN: pandas decides
])
def test_sorted_frame_matches_sort_values(by, asc):
    r = np.random.default_rng(11)
    n = 500
    df = pd.DataFrame({"m": r.integers(0, 40, n).astype(np.uint64), "iso": r.choice(["DE", "FR", "GB", "US"], n),
                       "r": r.integers(-3, 3, n), "key": np.where(r.random(n) < 0.2, -np.inf, r.normal(size=n)),
                       "flag": r.random(n) < 0.5, "x": np.where(r.random(n) < 0.1, np.nan, r.random(n))},
                      index=pd.RangeIndex(100, 100 + n))
    df["iso"] = df["iso"].astype("str")
    for frame in (df, df.sort_values(by, ascending=asc, kind="stable")):  # unsorted, and already in order
        got = s9._sorted_frame(frame, by, asc)
        pd.testing.assert_frame_equal(got, frame.sort_values(by, ascending=asc, kind="stable"))


def test_cumcount_sorted_matches_groupby():
    r = np.random.default_rng(3)
    df = pd.DataFrame({"m": np.sort(r.integers(0, 30, 300)).astype(np.uint64), "c": r.integers(0, 3, 300)})
    df = df.sort_values(["m", "c"], kind="stable").reset_index(drop=True)
    want = df.groupby(["m", "c"], sort=False).cumcount().to_numpy()
    assert np.array_equal(s9._cumcount_sorted([df["m"].to_numpy(), df["c"].to_numpy()]), want)


# ====================================================================== structural fast paths
def _candidate_parquet(path: Path, ph: str, fp: str, rows: int = 60) -> None:
    mids = np.repeat(np.arange(1, rows // 3 + 1, dtype=np.uint64), 3)
    isos = np.tile(["GB", "DE", "FR"], rows // 3)
    t = pa.table({"merchant_id": mids, "country_iso": isos, "candidate_rank": np.tile([0, 1, 2], rows // 3),
                  "is_home": np.tile([True, False, False], rows // 3),
                  "reason_codes": [["RULE_A"]] * rows, "filter_tags": [["HOME"], ["X_1"], ["X_2"]] * (rows // 3),
                  "parameter_hash": [ph] * rows, "produced_by_fingerprint": [fp] * rows})
    t = t.cast(arrow_schema(SCHEMAS / "s3_candidate_set.schema.json"))
    pq.write_table(t, path, row_group_size=rows // 4)  # several row groups: chunked dictionaries


def _read(path: Path) -> pa.Table:
    return s9._read_parts_dict([path], {"merchant_id", "country_iso", "candidate_rank", "is_home"})


def test_dictionary_read_and_structural_fast_paths(tmp_path):
    sp = SCHEMAS / "s3_candidate_set.schema.json"
    schema = load_schema(sp)
    ph, fp = "a" * 64, "b" * 64
    p = tmp_path / "part-00000.parquet"
    _candidate_parquet(p, ph, fp)
    t = _read(p)
    # the lineage strings and the list items are read as dictionaries (one value per row group, not per row)
    assert pa.types.is_dictionary(t.schema.field("parameter_hash").type)
    assert pa.types.is_dictionary(t.schema.field("reason_codes").type.value_type)
    assert not pa.types.is_dictionary(t.schema.field("country_iso").type)
    plain = pq.read_table(p)
    assert validate_table(plain, sp) == [] and s9._schema_clean(t, schema) is True
    assert s9._embed_clean(t, {"parameter_hash": ph}) and not s9._embed_clean(t, {"parameter_hash": "c" * 64})
    assert s9._pk_unique(t, ["merchant_id", "country_iso"]) and s9._fk_clean(t, {"GB", "DE", "FR"})
    assert not s9._fk_clean(t, {"GB", "DE"})
    # the frame of the kept columns is the plain reader's
    pd.testing.assert_frame_equal(s9._frame(t, ("merchant_id", "country_iso")),
                                  s9._frame(plain, ("merchant_id", "country_iso")))

    def edited(fn) -> Path:
        q = tmp_path / "edit.parquet"
        pq.write_table(fn(pq.read_table(p)), q, row_group_size=15)
        return q

    def setcol(name, i, value):
        def fn(x):
            v = x[name].to_pylist()
            v[i] = value
            f = x.schema.field(name)
            return x.set_column(x.column_names.index(name), f, pa.array(v, f.type))
        return fn

    for fn, seen in ((setcol("parameter_hash", 7, "Z" * 64), True), (setcol("reason_codes", 3, ["lower case"]), True),
                     (setcol("filter_tags", 40, []), False), (setcol("produced_by_fingerprint", 2, None), False)):
        q = edited(fn)
        exact = validate_table(pq.read_table(q), sp)
        assert bool(exact) or not seen
        if exact:  # a fault the schema sees is never shown clean through the dictionary
            assert s9._schema_clean(_read(q), schema) is False
    dup = _read(edited(lambda x: pa.concat_tables([x, x.slice(5, 1)])))
    assert not s9._pk_unique(dup, ["merchant_id", "country_iso"])
    unsorted = _read(edited(lambda x: x.take(np.r_[np.arange(30, 60), np.arange(0, 30)])))
    assert s9._pk_unique(unsorted, ["merchant_id", "country_iso"])
    assert not s9._pk_unique(_read(edited(lambda x: pa.concat_tables([x.slice(30), x.slice(0, 31)]))),
                             ["merchant_id", "country_iso"])


# ====================================================================== trace fast path
def _trace_table(rows: list[tuple]) -> pa.Table:
    cols = ("module", "substream_label", "events_total", "draws_total", "blocks_total", "rng_counter_after_hi",
            "rng_counter_after_lo")
    d = {c: [r[i] for r in rows] for i, c in enumerate(cols)}
    n = len(rows)
    return pa.table({"ts_utc": [f"2026-01-01T00:00:{i:02d}.000000Z" for i in range(n)], "run_id": ["r" * 32] * n,
                     "seed": pa.array([7] * n, pa.uint64()), "module": d["module"],
                     "substream_label": d["substream_label"],
                     **{c: pa.array(d[c], pa.uint64()) for c in cols[2:]}})


def test_trace_fast_path_matches_frame_path():
    ids = SegmentIds("1A", 7, "p" * 64, "f" * 64, "r" * 32)
    rows = [("A", "x", 1, 1, 1, 0, 1), ("B", "y", 1, 2, 1, 0, 5), ("A", "x", 3, 4, 3, 0, 3),
            ("A", "x", 2, 2, 2, 0, 2), ("B", "y", 2, 4, 2, 0, 6), ("A", "x", 3, 9, 3, 0, 3)]  # out of order, a tie
    t = _trace_table(rows)
    fast = s9._trace_finals_fast(t, ids)
    f = s9.Failures()
    assert fast == s9._trace_finals(s9.trace_frame_from_table(t), ids, f) and not f.items
    assert fast[0][("A", "x")] == {"events_total": 3, "draws_total": 9, "blocks_total": 3}  # the later tied row
    # anything the frame path would report is left to it
    assert s9._trace_finals_fast(_trace_table(rows + [("B", "y", 3, 1, 3, 0, 7)]), ids) is None
    assert s9._trace_finals_fast(t, SegmentIds("1A", 8, "p" * 64, "f" * 64, "r" * 32)) is None


# ====================================================================== whole validate: fast == plain
def _plain(monkeypatch) -> None:
    """Disable every fast path: validate then runs the plain pandas code and rnglog.reconcile itself."""
    monkeypatch.setattr(s9, "_schema_clean", lambda t, schema: False)
    monkeypatch.setattr(s9, "_embed_clean", lambda t, tokens: False)
    monkeypatch.setattr(s9, "_pk_unique", lambda t, pk: False)
    monkeypatch.setattr(s9, "_fk_clean", lambda t, iso: False)
    monkeypatch.setattr(s9, "_tokens_clean", lambda t, tok: False)
    monkeypatch.setattr(s9, "_trace_finals_fast", lambda t, ids: None)
    monkeypatch.setattr(s9, "_aligned", lambda df, base, keys: False)
    monkeypatch.setattr(s9, "_restrict", lambda right, *lefts: right)
    monkeypatch.setattr(s9, "_sorted_frame", lambda df, by, ascending=True: df.sort_values(
        by, ascending=ascending, kind="stable"))
    monkeypatch.setattr(s9, "_reconcile_findings", lambda *a, **k: None)

    def plain_read(parts, keep):
        raise ValueError("plain")
    monkeypatch.setattr(s9, "_read_parts_dict", plain_read)


def _fault(name: str, ctx) -> None:
    ev = lambda fam: ctx.path("rng_event", family=fam) / "part-00000.jsonl"  # noqa: E731
    if name == "catalogue_row":
        t9._edit_catalogue(ctx, lambda t: pa.concat_tables([t.slice(0, 3), t.slice(4)]))
    elif name == "trace_total":
        def bump(rows):
            i = max((i for i, r in enumerate(rows) if r["module"] == "1A.hurdle_sampler"),
                    key=lambda i: rows[i]["events_total"])
            rows[i]["draws_total"] = int(rows[i]["draws_total"]) + 1
            return rows
        t9._rewrite_jsonl(ctx.path("rng_trace_log"), bump)
    elif name == "event_removed":
        t9._rewrite_jsonl(ev("residual_rank"), lambda rows: rows[:-1])
    elif name == "event_seed":
        t9._rewrite_jsonl(ev("hurdle_bernoulli"), lambda rows: [dict(r, seed=1) if i == 2 else r
                                                                for i, r in enumerate(rows)])
    elif name == "nonconsuming_draws":
        t9._rewrite_jsonl(ev("nb_final"), lambda rows: [dict(r, draws="1") if i == 0 else r
                                                        for i, r in enumerate(rows)])
    elif name == "audit_missing":
        ctx.path("rng_audit_log").write_bytes(b"")
    elif name == "gamma_value":
        t9._rewrite_jsonl(ev("gamma_component"), lambda rows: [
            dict(r, gamma_value=math.nextafter(r["gamma_value"], 0.0)) if i == 0 else r for i, r in enumerate(rows)])
    elif name.startswith("cand_"):
        part = ctx.path("s3_candidate_set") / "part-00000.parquet"
        t = pq.read_table(part)
        col, value = {"cand_hash": ("parameter_hash", "c" * 64), "cand_iso": ("country_iso", "ZZ"),
                      "cand_tag": ("filter_tags", ["bad tag"])}.get(name, (None, None))
        if col is None:  # cand_dup
            t = pa.concat_tables([t, t.slice(1, 1)])
        else:
            v = t[col].to_pylist()
            v[1] = value
            t = t.set_column(t.column_names.index(col), t.schema.field(col), pa.array(v, t.schema.field(col).type))
        pq.write_table(t, part)
    else:
        assert name == "none"


FAULTS = ["none", "catalogue_row", "trace_total", "event_removed", "event_seed", "nonconsuming_draws",
          "audit_missing", "gamma_value", "cand_hash", "cand_iso", "cand_tag", "cand_dup"]


@pytest.mark.parametrize("fault", FAULTS)
def test_fast_paths_give_the_plain_bundle(tree, tmp_path, monkeypatch, fault):
    ctx = t9._copy(tree, tmp_path)
    _fault(fault, ctx)
    fast = s9.validate(ctx)
    assert fast.passed == (fault == "none"), fast.failures
    with monkeypatch.context() as m:
        _plain(m)
        plain = s9.validate(ctx)
    assert fast.bundle_files == plain.bundle_files
    assert fast.failures == plain.failures


def test_reconcile_from_held_tables_matches_rnglog(tree, tmp_path, monkeypatch):
    """The findings S9 derives from its own reads are rnglog.reconcile's (code, family, detail, rows, count)."""
    ctx = t9._copy(tree, tmp_path)
    _fault("event_removed", ctx)
    t9._rewrite_jsonl(ctx.path("rng_event", family="gumbel_key") / "part-00000.jsonl",
                      lambda rows: rows + [dict(rows[-1])])  # a chain break / duplicate for check_chains
    got = []
    orig = s9._reconcile_findings
    monkeypatch.setattr(s9, "_reconcile_findings", lambda *a: got.append(orig(*a)) or got[-1])
    s9.validate(ctx)

    def key(r):
        return (r["code"], r.get("family"), r.get("detail"), json.dumps(r.get("rows") or [], sort_keys=True,
                                                                       default=str), r.get("count"))

    want = rnglog.reconcile(ctx.data_root, ctx.ids, chain=True, config=ctx.config)
    assert want and [key(r) for r in got[0]] == [key(r) for r in want]


def test_progress_lines_and_kept_columns(tree, tmp_path, capsys, monkeypatch):
    ctx = t9._copy(tree, tmp_path)
    kept = {}
    orig = s9._datasets
    monkeypatch.setattr(s9, "_datasets", lambda *a: kept.update(orig(*a)) or kept)
    assert s9.validate(ctx).passed
    err = capsys.readouterr().err
    n = len(s9.PROGRESS_STEPS)
    assert f"[progress] 1A.S9 checks {n}/{n} (100.0%)" in err and err.rstrip().endswith("done")
    # only what the replay checks read is kept: no lineage strings or list columns per candidate row
    assert list(kept["s3_candidate_set"].columns) == ["merchant_id", "country_iso", "candidate_rank", "is_home"]
    assert list(kept["hurdle_design_matrix"].columns) == ["merchant_id", "home_country_iso"]
