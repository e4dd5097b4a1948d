"""1B S8 - ``site_locations`` egress (spec 1B 10).

No RNG. Reads only ``s7_site_synthesis`` (seed / 1B parameter_hash / 1B fingerprint), projects it onto the five
egress columns ``merchant_id, legal_country_iso, site_order, lon_deg, lat_deg`` and publishes them under
``[seed, fingerprint]`` (no ``parameter_hash=`` directory: the fingerprint subsumes it), one
``part-00000.parquet`` in writer sort ``[merchant_id, legal_country_iso, site_order]``.

Checks before publishing (codes of the upstream S8 spec): S7 matches its schema (``E804_SCHEMA_VIOLATION``),
has no duplicate key (``E803_DUP_KEY``); the input and output paths carry this run's tokens and the egress path
carries no ``parameter_hash`` (``E805_PARTITION_OR_IDENTITY``); the output matches the egress schema
(``E804_SCHEMA_VIOLATION``) and is in writer sort (``E806_WRITER_SORT_VIOLATION``). Publish is write-once
(``E913_ATOMIC_PUBLISH_VIOLATION``, decision 21). Countries inside a merchant appear in lexical ISO order, which
is not an inter-country order (consumers join 1A ``s3_candidate_set.candidate_rank``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.core import dictionary, publish
from engine.core.errors import EngineError, InputError
from engine.core.schema import arrow_schema, validate_table
from engine.segment1b.s7_synthesis import (
    KEY,
    duplicate_keys,
    first_rows,
    key_order,
    sort_by_key,
    writer_sort,
)

EGRESS_COLUMNS = ("merchant_id", "legal_country_iso", "site_order", "lon_deg", "lat_deg")
PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"


def is_sorted(table: pa.Table, keys=KEY) -> tuple[bool, int]:
    """(rows are in non-decreasing key order, index of the first row out of order or -1). A stable sort of
    sorted rows is the identity permutation."""
    if table.num_rows < 2:
        return True, -1
    order = key_order(table, keys)
    if order is not None and order[0]:
        return True, -1  # non-decreasing keys: the stable sort is the identity (decided in one pass)
    idx = np.asarray(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]).to_numpy())
    wrong = np.flatnonzero(idx != np.arange(table.num_rows))
    return (wrong.size == 0), (int(wrong[0]) if wrong.size else -1)


def project(s7: pa.Table) -> pa.Table:
    """Pure S8: the egress projection in writer sort."""
    return sort_by_key(s7.select(list(EGRESS_COLUMNS)))


def _check_tokens(path: Path, ids, want: dict[str, str], forbid: tuple[str, ...], code: str) -> None:
    toks = dictionary.parse_tokens(path)
    bad = {k: toks.get(k) for k, v in want.items() if toks.get(k) != v}
    bad.update({k: toks[k] for k in forbid if k in toks})
    if bad:
        raise InputError(code, "partition path does not carry this run's identity tokens", path=path,
                         detail={"expected": want, "forbidden": list(forbid), "found": toks})


def run_with_report(ctx) -> dict:
    s7_path = Path(ctx.path("s7_site_synthesis"))
    out_path = Path(ctx.path("site_locations"))
    ids = ctx.ids
    _check_tokens(s7_path, ids, {"seed": str(ids.seed), "parameter_hash": ids.parameter_hash,
                                 "manifest_fingerprint": ids.manifest_fingerprint}, (), "E805_PARTITION_OR_IDENTITY")
    _check_tokens(out_path, ids, {"seed": str(ids.seed), "manifest_fingerprint": ids.manifest_fingerprint},
                  ("parameter_hash", "run_id"), "E805_PARTITION_OR_IDENTITY")
    s7_schema = ctx.schema_path("s7_site_synthesis")
    try:
        s7 = publish.read_parquet_dir(s7_path).combine_chunks()  # one chunk per column: numpy views, no copies
    except EngineError as exc:
        raise InputError("E801_ROW_MISSING", f"s7_site_synthesis not readable: {exc.message}", path=s7_path) from None
    problems = validate_table(s7, s7_schema)
    if problems:
        raise InputError("E804_SCHEMA_VIOLATION", "s7_site_synthesis does not match its schema", path=s7_path,
                         rows=problems)
    d = duplicate_keys(s7)
    if d.num_rows:
        raise InputError("E803_DUP_KEY", "s7_site_synthesis has duplicate site keys", path=s7_path,
                         rows=first_rows(d), detail={"count": d.num_rows})
    out = project(s7)
    egress_schema = ctx.schema_path("site_locations")
    problems = validate_table(out, egress_schema)
    if problems:
        raise EngineError("E804_SCHEMA_VIOLATION", "site_locations does not match its schema", rows=problems)
    ok, first = is_sorted(out)
    if not ok:  # pragma: no cover - project() sorts; kept as the spec's guard
        raise EngineError("E806_WRITER_SORT_VIOLATION", f"site_locations out of writer sort at row {first}")
    with publish.staged(out_path, PUBLISH_CODE) as tmp:
        publish.write_parquet(out, Path(tmp) / "part-00000.parquet", sort_by=writer_sort(out),
                              schema=arrow_schema(egress_schema))
    return {
        "identity": {"seed": int(ids.seed), "manifest_fingerprint": ids.manifest_fingerprint,
                     "parameter_hash_consumed": ids.parameter_hash},
        "sizes": {"rows_s7": s7.num_rows, "rows_s8": out.num_rows, "parity_ok": s7.num_rows == out.num_rows},
        "validation_counters": {"schema_fail_count": 0, "path_embed_mismatches": 0, "writer_sort_violations": 0,
                                "order_leak_indicators": 0},
        "by_country": _rows_by_country(out),
    }


def _rows_by_country(table: pa.Table) -> dict[str, int]:
    """Rows per ``legal_country_iso``, countries A-Z (one dictionary encoding and a bincount)."""
    if table.num_rows == 0:
        return {}
    col = table["legal_country_iso"]
    enc = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    names = enc.dictionary.to_pylist()
    codes = np.asarray(pc.fill_null(enc.indices, len(names)).to_numpy(zero_copy_only=False), np.int64)
    counts = np.bincount(codes, minlength=len(names) + 1)
    return dict(sorted((names[k], int(counts[k])) for k in range(len(names)) if counts[k]))


def run(ctx) -> None:
    summary = run_with_report(ctx)
    print("s8_run_summary " + json.dumps({k: summary[k] for k in ("identity", "sizes", "validation_counters")},
                                         sort_keys=True), file=sys.stderr)
