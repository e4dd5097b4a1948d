"""Write-once atomic publishing, deterministic Parquet/JSON, failure records (00-core 2.2, 2.4, 5.4)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.core import publish as P
from engine.core.context import SegmentIds
from engine.core.errors import EngineError, PublishError

CODE = P.CODE_1A


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(("_tmp.", "_old.")))


def _write(dirpath: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (dirpath / name).parent.mkdir(parents=True, exist_ok=True)
        (dirpath / name).write_bytes(data)


# ---------------------------------------------------------------------- staged
def test_staged_publishes_atomically_and_identical_rerun_is_a_noop(tmp_path):
    final = tmp_path / "data" / "ds" / "seed=1"
    with P.staged(final, CODE) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith("_tmp.seed=1.")
        assert not final.exists()  # nothing visible before the rename
        _write(tmp, {"part-00000.parquet": b"abc", "sub/x.json": b"{}\n"})
    assert (final / "part-00000.parquet").read_bytes() == b"abc"
    inode = (final / "part-00000.parquet").stat().st_ino
    with P.staged(final, CODE) as tmp:
        _write(tmp, {"part-00000.parquet": b"abc", "sub/x.json": b"{}\n"})
    assert (final / "part-00000.parquet").stat().st_ino == inode  # untouched: no-op
    assert _leftovers(final.parent) == []


@pytest.mark.parametrize("change", ["bytes", "extra_file", "missing_file"])
def test_staged_different_bytes_raise_and_keep_the_original(tmp_path, change):
    final = tmp_path / "p"
    with P.staged(final, CODE) as tmp:
        _write(tmp, {"a": b"1", "b": b"2"})
    files = {"bytes": {"a": b"1", "b": b"X"}, "extra_file": {"a": b"1", "b": b"2", "c": b""},
             "missing_file": {"a": b"1"}}[change]
    with pytest.raises(PublishError) as ei:
        with P.staged(final, "E913_ATOMIC_PUBLISH_VIOLATION") as tmp:
            _write(tmp, files)
    assert ei.value.code == "E913_ATOMIC_PUBLISH_VIOLATION"
    assert ei.value.rows  # names what differs
    assert (final / "a").read_bytes() == b"1" and (final / "b").read_bytes() == b"2"
    assert sorted(p.name for p in final.iterdir()) == ["a", "b"]
    assert _leftovers(tmp_path) == []


def test_exception_inside_staged_publishes_nothing(tmp_path):
    final = tmp_path / "p"
    with pytest.raises(RuntimeError):
        with P.staged(final, CODE) as tmp:
            _write(tmp, {"part-00000.parquet": b"partial"})
            raise RuntimeError("boom")
    assert not final.exists()
    assert _leftovers(tmp_path) == []


def test_empty_existing_directory_is_filled(tmp_path):
    final = tmp_path / "p"
    final.mkdir()
    with P.staged(final, CODE) as tmp:
        _write(tmp, {"x": b"1"})
    assert (final / "x").read_bytes() == b"1"


def test_replace_if_allows_replacing_only_when_asked(tmp_path):
    final = tmp_path / "bundle"
    with P.staged(final, CODE) as tmp:
        _write(tmp, {"x": b"old"})
    with P.staged(final, CODE, replace_if=lambda d: not (d / "_passed.flag").exists()) as tmp:
        _write(tmp, {"x": b"new", "_passed.flag": b"f"})
    assert (final / "x").read_bytes() == b"new"
    with pytest.raises(PublishError):
        with P.staged(final, CODE, replace_if=lambda d: not (d / "_passed.flag").exists()) as tmp:
            _write(tmp, {"x": b"newer"})
    assert (final / "x").read_bytes() == b"new"
    assert _leftovers(tmp_path) == []


def test_publish_file_write_once(tmp_path):
    f = tmp_path / "d" / "s0_gate_receipt.json"
    assert P.publish_file(f, b"one\n", CODE) is True
    assert P.publish_file(f, b"one\n", CODE) is False
    with pytest.raises(PublishError) as ei:
        P.publish_file(f, b"two\n", CODE)
    assert ei.value.code == CODE and f.read_bytes() == b"one\n"
    assert _leftovers(f.parent) == []


# ---------------------------------------------------------------------- parquet
def _table(n=1000, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "merchant_id": pa.array(rng.integers(0, 2 ** 64 - 1, n, dtype=np.uint64)),
        "legal_country_iso": pa.array(rng.choice(["GB", "DE", "NA", "US"], n)),
        "site_order": pa.array(rng.integers(1, 50, n).astype(np.int32)),
        "share": pa.array(rng.random(n)),
    })


def test_write_parquet_is_byte_identical_across_writes_and_input_forms(tmp_path):
    t = _table()
    keys = ["merchant_id", "legal_country_iso", "site_order"]
    P.write_parquet(t, tmp_path / "a.parquet", sort_by=keys)
    P.write_parquet(t, tmp_path / "b.parquet", sort_by=keys)
    shuffled = t.take(pa.array(np.random.default_rng(1).permutation(t.num_rows)))
    P.write_parquet(shuffled, tmp_path / "c.parquet", sort_by=keys)
    df = t.to_pandas()
    df.index = df.index + 17  # a pandas index must never leak into the file
    P.write_parquet(df, tmp_path / "d.parquet", sort_by=keys)
    chunked = pa.concat_tables([t.slice(0, 300), t.slice(300)])
    P.write_parquet(chunked, tmp_path / "e.parquet", sort_by=keys)
    ref = (tmp_path / "a.parquet").read_bytes()
    for name in "bcde":
        assert (tmp_path / f"{name}.parquet").read_bytes() == ref, name
    md = pq.read_metadata(tmp_path / "d.parquet")
    assert b"pandas" not in (md.metadata or {})
    assert md.row_group(0).column(0).compression == "ZSTD"
    assert md.row_group(0).column(0).statistics is not None


def test_write_parquet_sorts_u64_unsigned_and_stably(tmp_path):
    t = pa.table({"merchant_id": pa.array([2 ** 63 + 5, 3, 2 ** 64 - 1, 3], pa.uint64()), "v": [0, 1, 2, 3]})
    P.write_parquet(t, tmp_path / "x.parquet", sort_by=["merchant_id"])
    back = pq.read_table(tmp_path / "x.parquet")
    assert back["merchant_id"].to_pylist() == [3, 3, 2 ** 63 + 5, 2 ** 64 - 1]
    assert back["v"].to_pylist() == [1, 3, 0, 2]  # stable among equal keys


SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["merchant_id", "n"],
    "properties": {"merchant_id": {"type": "integer", "x-arrow": "uint64"},
                   "n": {"type": "integer", "x-arrow": "int32"}},
    "x-column-order": ["merchant_id", "n"],
}


def test_write_parquet_casts_to_schema_and_rejects_column_drift(tmp_path):
    df = pd.DataFrame({"n": [1, 2], "merchant_id": [5, 6]})  # int64 from pandas, other order
    P.write_parquet(df, tmp_path / "x.parquet", schema=SCHEMA)
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema.names == ["merchant_id", "n"]
    assert back.schema.field("merchant_id").type == pa.uint64() and back.schema.field("n").type == pa.int32()
    with pytest.raises(EngineError, match="E_SCHEMA_INVALID"):
        P.write_parquet(df.assign(extra=1), tmp_path / "y.parquet", schema=SCHEMA)
    with pytest.raises(EngineError, match="E_SCHEMA_INVALID"):
        P.write_parquet(pd.DataFrame({"n": [1], "merchant_id": [-1]}), tmp_path / "z.parquet", schema=SCHEMA)


def test_read_parquet_dir_reads_parts_in_order_and_ignores_hidden(tmp_path):
    d = tmp_path / "part"
    P.write_parquet(pa.table({"merchant_id": pa.array([3], pa.uint64()), "n": pa.array([1], pa.int32())}),
                    d / "part-00001.parquet")
    P.write_parquet(pa.table({"merchant_id": pa.array([9], pa.uint64()), "n": pa.array([2], pa.int32())}),
                    d / "part-00000.parquet")
    (d / "_tmp.part-00002.parquet").write_bytes(b"garbage")
    (d / ".hidden.parquet").write_bytes(b"garbage")
    (d / "_passed.flag").write_bytes(b"x")
    t = P.read_parquet_dir(d)
    assert t["merchant_id"].to_pylist() == [9, 3]
    t2 = P.read_parquet_dir(d, schema=SCHEMA)
    assert t2.schema.names == ["merchant_id", "n"]
    with pytest.raises(EngineError, match="E_PARTITION_MISSING"):
        P.read_parquet_dir(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EngineError, match="E_PARTITION_MISSING"):
        P.read_parquet_dir(empty)
    assert P.read_parquet_dir(empty, schema=SCHEMA).num_rows == 0


# ---------------------------------------------------------------------- json
def test_canonical_json_bytes():
    obj = {"b": 0.1 + 0.2, "a": [1, 2 ** 64 - 1, True, None], "é": "ü", "c": np.float64(1.0), "d": np.uint64(7)}
    got = P.canonical_json_bytes(obj)
    assert got == (b'{"a":[1,18446744073709551615,true,null],"b":0.30000000000000004,"c":1.0,"d":7,'
                   b'"\\u00e9":"\\u00fc"}\n')
    assert json.loads(got)["b"] == 0.1 + 0.2
    with pytest.raises(ValueError):
        P.canonical_json_bytes({"x": float("nan")})
    with pytest.raises(TypeError):
        P.canonical_json_bytes({"x": object()})


def test_write_json_and_jsonl(tmp_path):
    P.write_json({"z": 1, "a": 2}, tmp_path / "x.json")
    assert (tmp_path / "x.json").read_bytes() == b'{"a":2,"z":1}\n'
    P.write_jsonl([{"b": 1}, {"a": 1.5}], tmp_path / "x.jsonl")
    assert (tmp_path / "x.jsonl").read_bytes() == b'{"b":1}\n{"a":1.5}\n'


# ---------------------------------------------------------------------- failure records
def test_failure_record_is_atomic_timestamp_free_and_first_wins(tmp_path):
    ids = SegmentIds("1A", 2 ** 64 - 1, "a" * 64, "b" * 64, "c" * 32)
    final = tmp_path / "data/layer1/1A/validation/failures/seed=1/fingerprint=x/run_id=y"
    path, written = P.write_failure_record(final, ids=ids, failure_class="F4", failure_code="rng_counter_mismatch",
                                           state="S1", module="1A.hurdle_sampler", detail={"rows": [3]},
                                           dataset_id="rng_event", merchant_id=2 ** 63 + 1)
    assert written and path == final
    rec = json.loads((final / "failure.json").read_bytes())
    head = json.loads((final / "_FAILED.SENTINEL.json").read_bytes())
    assert rec == {"failure_class": "F4", "failure_code": "rng_counter_mismatch", "state": "S1",
                   "module": "1A.hurdle_sampler", "parameter_hash": "a" * 64, "manifest_fingerprint": "b" * 64,
                   "seed": 2 ** 64 - 1, "run_id": "c" * 32, "detail": {"rows": [3]}, "dataset_id": "rng_event",
                   "merchant_id": str(2 ** 63 + 1)}
    assert head == {k: v for k, v in rec.items() if k != "detail"}
    assert "ts_utc" not in rec  # decision 15
    before = (final / "failure.json").read_bytes()
    _, written2 = P.write_failure_record(final, ids=ids, failure_class="F1", failure_code="other", state="S0",
                                         module="1A.s0")
    assert not written2 and (final / "failure.json").read_bytes() == before
    with pytest.raises(ValueError):
        P.write_failure_record(tmp_path / "z", ids=ids, failure_class="F11", failure_code="x", state="S0", module="m")
    assert _leftovers(final.parent) == []


# ---------------------------------------------------------------------- dead writers' leftovers (issue 7)
_CHILD = r"""
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from engine.core import publish
with publish.staged(Path({final!r}), "E_TEST") as tmp:
    (tmp / "part-00000.parquet").write_bytes(b"half")
    print(tmp.name, flush=True)
    if {kill}:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)
"""


def _start_writer(final, kill):
    import subprocess
    import sys
    from pathlib import Path as _P

    repo = str(_P(__file__).resolve().parents[1])
    code = _CHILD.format(repo=repo, final=str(final), kill=kill)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    name = p.stdout.readline().strip()
    return p, name


def test_killed_writer_leftovers_are_swept_by_next_publish(tmp_path):
    final = tmp_path / "ds" / "seed=1"
    p, name = _start_writer(final, kill=True)
    p.wait()
    assert p.returncode == -9
    left = sorted(x.name for x in final.parent.iterdir())
    assert left == [name, name + ".lock"]  # the kill left its staging dir and lock behind
    with P.staged(final, "E_TEST") as tmp:
        (tmp / "a.txt").write_text("x")
    assert sorted(x.name for x in final.parent.iterdir()) == ["seed=1"]
    assert (final / "a.txt").read_text() == "x"


def test_live_writer_is_never_swept(tmp_path):
    final = tmp_path / "ds" / "seed=1"
    p, name = _start_writer(final, kill=False)
    try:
        assert P.sweep_stale(final) == []
        assert (final.parent / name / "part-00000.parquet").read_bytes() == b"half"
        # a legacy staging dir without a lock (pre-lock engine or a kill before locking) is dead
        (final.parent / "_tmp.seed=1.deadbeef").mkdir()
        (final.parent / "_old.seed=1.cafe").mkdir()
        assert P.sweep_stale(final) == ["_old.seed=1.cafe", "_tmp.seed=1.deadbeef"]
        assert (final.parent / name).is_dir()
    finally:
        p.kill()
        p.wait()
    assert P.sweep_stale(final) == [name]
    assert list(final.parent.iterdir()) == []


def test_publish_file_sweeps_dead_temp_files(tmp_path):
    final = tmp_path / "x" / "flag"
    final.parent.mkdir()
    (final.parent / "_tmp.flag.0011").write_bytes(b"torn")
    assert P.publish_file(final, b"ok", "E_TEST") is True
    assert sorted(x.name for x in final.parent.iterdir()) == ["flag"]
