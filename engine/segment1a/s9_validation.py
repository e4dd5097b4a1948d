"""1A S9 — replay validation and the 1A PASS gate (1A-S5-S9 §6; 00-core §2.3, §3.6, §3.7, §5, §6.4).

S9 is read-only over everything S0..S8 published (datasets under ``data/``, RNG event/trace/audit logs
under ``logs/``). It draws no randomness and never modifies producer data. It then publishes the
fingerprint+seed scoped ``validation_bundle_1A`` (decision 25) and, **only on PASS**, ``_passed.flag``.
Any failure => FAIL (S9 is a gate, not a linter): the bundle is still published (without the flag, the
failures in ``s9_summary.json``), a failure record goes under ``validation_failures_1A`` and ``run`` raises
:class:`ValidationFailure` so the Snakemake job exits non-zero.

Public API
----------
* ``validate(ctx) -> Result(passed, failures, bundle_files)`` — reads only, never writes; ``failures`` is a list
  of ``{code, detail, rows (first 10), count, scope, dataset_id?}``, ``bundle_files`` maps every bundle file
  name except ``index.json`` / ``_passed.flag`` (written by ``bundle.write_bundle``) to its bytes.
* ``run(ctx)`` — validate, publish the bundle (+flag on PASS), on FAIL record + raise.
* ``verify_1a_gate(data_root, ids, config=None) -> Path`` — consumer gate (00-core §5.3, decision 27):
  verifies the bundle + flag with ``bundle.verify_bundle`` and re-hashes the ``outlet_catalogue`` files
  against ``egress_checksums.json``; returns the ``_passed.flag`` path. Raises :class:`GateError`.
* ``read_outlet_catalogue_gated(data_root, ids, config=None) -> pyarrow.Table`` — gate, then read the
  catalogue and re-check ``manifest_fingerprint`` / ``global_seed`` (00-core §5.3 step 5).
* Pure check helpers (``check_*``) used by ``validate`` and callable from tests on in-memory frames.

Everything written is byte-deterministic: canonical JSON (sorted keys, ASCII, compact), lists sorted,
no wall-clock time anywhere (decisions 5, 15).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from engine.core.errors import EngineError, GateError, ValidationFailure

SEGMENT = "1A"
STATE = "S9"
MODULE = "1A.s9_validation"
VERSION = "1A.validation.v1"
PUBLISH_CODE = "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL"  # decision 21
MAX_ROWS = 10  # first offending rows kept per failure
MAX_SEQ = 999999  # site_id is zfill6 (1A-S5-S9 §5.2)
U64_MAX = (1 << 64) - 1

# --------------------------------------------------------------------------------------------------
# Frozen literals (1A-S1-S4 §0.2, 00-core §3.3/§3.6, 1A-S5-S9 §6.2 budget table)
# --------------------------------------------------------------------------------------------------

FAMILIES = (
    "anchor",
    "hurdle_bernoulli",
    "gamma_component",
    "poisson_component",
    "nb_final",
    "ztp_rejection",
    "ztp_retry_exhausted",
    "ztp_final",
    "gumbel_key",
    "stream_jump",
    "dirichlet_gamma_vector",
    "normal_box_muller",
    "residual_rank",
    "sequence_finalize",
    "site_sequence_overflow",
)

# family -> registered (module, substream_label) pairs; anything else is a schema breach
REGISTERED: dict[str, set[tuple[str, str]]] = {
    "anchor": {("1A.s0", "s0.anchor")},
    "hurdle_bernoulli": {("1A.hurdle_sampler", "hurdle_bernoulli")},
    "gamma_component": {("1A.nb_and_dirichlet_sampler", "gamma_nb")},
    "poisson_component": {("1A.nb_poisson_component", "poisson_nb"), ("1A.ztp_sampler", "poisson_component")},
    "nb_final": {("1A.nb_sampler", "nb_final")},
    "ztp_rejection": {("1A.ztp_sampler", "poisson_component")},
    "ztp_retry_exhausted": {("1A.ztp_sampler", "poisson_component")},
    "ztp_final": {("1A.ztp_sampler", "poisson_component")},
    "gumbel_key": {("1A.foreign_country_selector", "gumbel_key")},
    "stream_jump": {("1A.foreign_country_selector", "stream_jump")},
    "dirichlet_gamma_vector": {("1A.dirichlet_allocator", "dirichlet_gamma_vector")},
    "normal_box_muller": {("1A.dirichlet_allocator", "normal_box_muller")},
    "residual_rank": {("1A.integerisation", "residual_rank")},
    "sequence_finalize": {("1A.site_id_allocator", "sequence_finalize")},
    "site_sequence_overflow": {("1A.site_id_allocator", "site_sequence_overflow")},
}

# non-consuming families: before == after, blocks 0, draws "0" (00-core §3.6)
NONCONSUMING = frozenset(
    {"anchor", "nb_final", "ztp_rejection", "ztp_retry_exhausted", "ztp_final", "residual_rank",
     "sequence_finalize", "site_sequence_overflow", "stream_jump"}
)

# keyed substreams whose ids are (merchant_u64, ISO) rather than (merchant_u64) (00-core §3.3, 1A-S5-S9 §3/§4/§5)
ISO_KEYED_LABELS = frozenset({"gumbel_key", "residual_rank", "sequence_finalize", "site_sequence_overflow"})

# S1..S7 families exist only for hurdle is_multi == true merchants (1A-S1-S4 §0; decision 19: a single-site
# merchant has no S2 to S7 events). The S8 families follow the catalogue blocks, and single-site merchants
# have a catalogue block (decision 6), so S8 writes their sequence_finalize too: not gated here.
GATED_FAMILIES = tuple(f for f in FAMILIES if f not in ("anchor", "hurdle_bernoulli", "sequence_finalize",
                                                        "site_sequence_overflow"))
# S4 families additionally require crossborder eligibility (and S6 a ztp_final)
S4_FAMILIES = ("ztp_rejection", "ztp_retry_exhausted", "ztp_final")

S2_GAMMA = ("1A.nb_and_dirichlet_sampler", "gamma_nb")
S2_POISSON = ("1A.nb_poisson_component", "poisson_nb")
S4_POISSON = ("1A.ztp_sampler", "poisson_component")

# every 1A dataset S9 looks at (dictionary ids fixed by the lead); JSON ones are receipts
PARQUET_DATASETS = (
    "hurdle_design_matrix",
    "hurdle_pi_probs",
    "crossborder_eligibility_flags",
    "crossborder_features",
    "merchant_abort_log",
    "s3_candidate_set",
    "s3_base_weight_priors",
    "s3_integerised_counts",
    "s3_site_sequence",
    "ccy_country_weights_cache",
    "merchant_currency",
    "sparse_flag",
    "s6_membership",
    "s7_integer_allocation",
    "outlet_catalogue",
)
JSON_DATASETS = ("sealed_inputs_1A", "s0_gate_receipt_1A", "s6_receipt")
ALWAYS_REQUIRED = ("hurdle_design_matrix", "crossborder_eligibility_flags", "s3_candidate_set", "outlet_catalogue")
OPTION_REQUIRED = {"s3_priors": "s3_base_weight_priors", "s3_integerisation": "s3_integerised_counts",
                   "s3_sequencing": "s3_site_sequence"}

# which path token an embedded column must equal (00-core §2.3); produced_by_fingerprint is never compared
EMBED_COLUMNS = {
    "seed": ("seed", "global_seed"),
    "parameter_hash": ("parameter_hash",),
    "manifest_fingerprint": ("manifest_fingerprint",),
    "run_id": ("run_id",),
}

# bundle file -> index kind (00-core §5.1 kinds: plot|table|diff|text|summary)
BUNDLE_KINDS = {
    "MANIFEST.json": "summary",
    "parameter_hash_resolved.json": "summary",
    "manifest_fingerprint_resolved.json": "summary",
    "param_digest_log.jsonl": "table",
    "fingerprint_artifacts.jsonl": "table",
    "numeric_policy_attest.json": "summary",
    "rng_accounting.json": "table",
    "s9_summary.json": "summary",
    "egress_checksums.json": "table",
}

# check groups reported in s9_summary.checks
CHECK_OF_CODE = {
    "E_SCHEMA_INVALID": "schema_pk_fk",
    "E_DUP_PK": "schema_pk_fk",
    "E_FK_ISO_INVALID": "schema_pk_fk",
    "E_PARTITION_MISPLACED": "path_embed_equality",
    "E_PATH_EMBED_MISMATCH": "path_embed_equality",
    "E_LINEAGE_RECOMPUTE_MISMATCH": "lineage",
    "E_WRITER_SORT_BROKEN": "egress_writer_sort",
    "E_RNG_COUNTER_MISMATCH": "rng_envelope",
    "E_RNG_BUDGET_VIOLATION": "rng_envelope",
    "E_NONCONSUMING_CHANGED_COUNTERS": "rng_envelope",
    "E_TRACE_COVERAGE_MISSING": "rng_trace_coverage",
    "E_TRACE_TOTALS_MISMATCH": "rng_trace_coverage",
}
CHECK_NAMES = ("schema_pk_fk", "path_embed_equality", "lineage", "rng_envelope", "rng_trace_coverage",
               "s1_replay", "s2_replay", "s3_replay", "s4_replay", "s6_replay", "s7_replay", "s8_replay",
               "s2_corridors", "egress_writer_sort")


def _check_of(code: str) -> str:
    if code in CHECK_OF_CODE:
        return CHECK_OF_CODE[code]
    for s in ("S1", "S2", "S3", "S4", "S6", "S7", "S8"):
        if code.startswith(f"E_{s}_"):
            return f"{s.lower()}_replay"
    if code == "corridor_breach":
        return "s2_corridors"
    if code in ("E_SUM_MISMATCH", "E_SITE_ID_OVERFLOW", "E_OVERFLOW_POLICY_BREACH", "E_ORDER_AUTHORITY_DRIFT"):
        return "s8_replay"
    if code in ("E_S4_SEQUENCE_INVALID", "E_FINALISER_CARDINALITY"):
        return "s4_replay"
    return "rng_envelope" if code.startswith("E_RNG") else "schema_pk_fk"


# --------------------------------------------------------------------------------------------------
# Result + failure collector
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    passed: bool
    failures: list[dict]
    bundle_files: dict[str, bytes]


def _jsonable(x: Any) -> Any:
    """Convert numpy/pandas scalars and containers into plain JSON values (u64 stay exact ints)."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else repr(f)  # NaN/Inf never reach canonical JSON as numbers
    if isinstance(x, bytes):
        return x.hex()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return x.as_posix()
    try:
        if pd.isna(x):
            return None
    except (TypeError, ValueError):
        pass
    return str(x)


class Failures:
    """Collects failures in a deterministic order (the order the checks run in)."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.merchants: set[int] = set()

    def add(self, code: str, detail: str, rows: Iterable[Any] = (), *, count: int | None = None,
            dataset_id: str | None = None, merchants: Iterable[Any] | None = None) -> None:
        rows = list(rows)
        rec = {
            "code": code,
            "detail": detail,
            "rows": _jsonable(rows[:MAX_ROWS]),
            "count": int(count if count is not None else len(rows)),
            "scope": "MERCHANT" if merchants is not None else "RUN",
        }
        if dataset_id is not None:
            rec["dataset_id"] = dataset_id
        if merchants is not None:
            self.merchants.update(int(m) for m in merchants)
        self.items.append(rec)

    def frame(self, code: str, detail: str, df: pd.DataFrame, *, dataset_id: str | None = None,
              merchant_col: str | None = "merchant_id") -> None:
        """Record a failure whose offending rows are the rows of ``df`` (first MAX_ROWS kept)."""
        if len(df) == 0:
            return
        rows = df.head(MAX_ROWS).to_dict(orient="records")
        merchants = None
        if merchant_col and merchant_col in df.columns:
            merchants = df[merchant_col].to_numpy()
        self.add(code, detail, rows, count=len(df), dataset_id=dataset_id, merchants=merchants)

    def extend(self, other: "Failures") -> None:
        """Append another collector's failures (after this one's)."""
        self.items.extend(other.items)
        self.merchants.update(other.merchants)

    def codes(self) -> list[str]:
        seen: list[str] = []
        for f in self.items:
            if f["code"] not in seen:
                seen.append(f["code"])
        return seen


# --------------------------------------------------------------------------------------------------
# Small vectorised helpers
# --------------------------------------------------------------------------------------------------


def _frame(table: pa.Table | None, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """pyarrow -> pandas keeping u64 exact: integer columns without nulls keep their numpy dtype;
    draws (decimal strings) are parsed to uint64 under ``draws_u64`` when present."""
    if table is None:
        return pd.DataFrame()
    # ts_utc (logs only) is never read by a validator (decision 5): not converted
    cols = [c for c in (columns if columns is not None else table.column_names) if c in table.column_names
            and c != "ts_utc"]
    out: dict[str, Any] = {}
    for c in cols:
        col = table.column(c)
        t = col.type
        if pa.types.is_integer(t) and col.null_count == 0:
            out[c] = col.to_numpy()
        elif pa.types.is_integer(t):
            out[c] = pd.array(col.to_pylist(), dtype="UInt64" if pa.types.is_unsigned_integer(t) else "Int64")
        elif pa.types.is_floating(t):
            out[c] = col.to_numpy(zero_copy_only=False)
        elif pa.types.is_boolean(t) and col.null_count == 0:
            out[c] = col.to_numpy(zero_copy_only=False).astype(bool)
        elif (pa.types.is_string(t) or pa.types.is_large_string(t)) and col.null_count < len(col):
            # pandas' Arrow-backed str dtype directly: the dtype and values pandas infers from the object array
            # below, without one Python str per row (seconds and GBs at 10^6 merchants)
            out[c] = col.to_pandas()
        elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t):
            out[c] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            # Arrow-backed (zero copy): an element still reads as a Python list (None when null); one Python
            # list per row cost ~17 s and ~1.5 GB for s3_candidate_set's two list columns at 10^6 merchants
            out[c] = col.to_pandas(types_mapper=pd.ArrowDtype)
        else:  # other nested values stay one Python object per row
            out[c] = pd.Series(col.to_pylist(), dtype=object, index=pd.RangeIndex(table.num_rows))
    df = pd.DataFrame(out, index=pd.RangeIndex(table.num_rows))
    if "draws" in df.columns:
        df["draws_u64"] = _parse_u64(df["draws"].to_numpy())
    return df


def _parse_u64(values: np.ndarray) -> np.ndarray:
    """Decimal strings (or ints) -> uint64; unparsable/out-of-range -> U64_MAX sentinel (always a mismatch)."""
    if values.dtype.kind == "u":
        return values.astype(np.uint64)
    if values.dtype.kind == "i":
        return values.astype(np.uint64)
    try:
        import pyarrow.compute as pc

        return pc.cast(pa.array([None if v is None else str(v) for v in values], pa.string()),
                       pa.uint64()).fill_null(U64_MAX).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out = np.empty(len(values), dtype=np.uint64)
        for i, v in enumerate(values):  # rare fallback on malformed logs only
            try:
                iv = int(str(v))
                out[i] = iv if 0 <= iv <= U64_MAX and str(v).isdigit() else U64_MAX
            except (TypeError, ValueError):
                out[i] = U64_MAX
        return out


def _u128_delta_is(after_hi, after_lo, before_hi, before_lo, blocks) -> np.ndarray:
    """True where u128(after) - u128(before) == blocks (exact, wrap-aware)."""
    after_hi = np.asarray(after_hi, dtype=np.uint64)
    after_lo = np.asarray(after_lo, dtype=np.uint64)
    before_hi = np.asarray(before_hi, dtype=np.uint64)
    before_lo = np.asarray(before_lo, dtype=np.uint64)
    lo = after_lo - before_lo
    borrow = (after_lo < before_lo).astype(np.uint64)
    hi = after_hi - before_hi - borrow
    return (hi == 0) & (lo == np.asarray(blocks, dtype=np.uint64))


def _zfill6(values: np.ndarray) -> np.ndarray:
    return np.char.zfill(np.asarray(values).astype(np.int64).astype(str), 6)


def _iso_arr(values) -> np.ndarray:
    return np.asarray([("" if v is None else str(v)) for v in values], dtype=object)


def _is_null_series(s: pd.Series) -> np.ndarray:
    return np.asarray(pd.isna(s), dtype=bool)


# Sorted-array set operations. numpy 2.x np.unique (and so setdiff1d / intersect1d / isin) hashes integer
# arrays, ~0.7 s per 10^6 uint64 against ~0.05 s for a sort; at 10^6 merchants S9 spent ~18 s there.
# Same results as the numpy functions (sorted unique values / boolean masks); any other dtype mix goes to
# numpy itself.


def _int1d(*arrays) -> bool:
    return all(a.ndim == 1 and a.dtype.kind in "ui" and a.dtype == arrays[0].dtype for a in arrays)


def _uniq(a) -> np.ndarray:
    a = np.asarray(a)
    if not _int1d(a):
        return np.unique(a)
    s = np.sort(a)
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _isin(a, b) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    if not _int1d(a, b):
        return np.isin(a, b)
    if len(b) == 0:
        return np.zeros(len(a), dtype=bool)
    s = np.sort(b)
    idx = np.searchsorted(s, a)
    idx[idx == len(s)] = 0
    return s[idx] == a


def _setdiff(a, b) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    if not _int1d(a, b):
        return np.setdiff1d(a, b)
    u = _uniq(a)
    return u[~_isin(u, b)]


def _intersect(a, b) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    if not _int1d(a, b):
        return np.intersect1d(a, b)
    u = _uniq(a)
    return u[_isin(u, b)]


def _union(a, b) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    if not _int1d(a, b):
        return np.union1d(a, b)
    return _uniq(np.concatenate([a, b]))


def _setxor(a, b) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    if not _int1d(a, b):
        return np.setxor1d(a, b)
    c = np.sort(np.concatenate([_uniq(a), _uniq(b)]))
    if len(c) == 0:
        return c
    once = np.ones(len(c), dtype=bool)
    same = c[1:] == c[:-1]
    once[1:] &= ~same
    once[:-1] &= ~same
    return c[once]


def _restrict(right: pd.DataFrame, *lefts: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``right`` whose merchant_id occurs in one of ``lefts``: a left/inner merge of any of them
    with ``right`` on keys that include merchant_id gives the same rows, in the same order, either way, and
    factorising the 10^6-merchant candidate set for a 10^5-row left side cost seconds. ``right`` itself when
    merchant ids are not plain integers or no row would remain."""
    rm = right["merchant_id"].to_numpy()
    lms = [x["merchant_id"].to_numpy() for x in lefts]
    if rm.dtype.kind not in "ui" or any(x.dtype != rm.dtype for x in lms):
        return right
    keep = _isin(rm, np.concatenate(lms) if len(lms) > 1 else lms[0])
    return right[keep] if keep.any() else right


def _order_key(s: pd.Series) -> np.ndarray | None:
    """Integer/float array ordering like ``s`` does under sort_values, or None when that cannot be shown
    cheaply (missing values, mixed objects): the caller then lets pandas sort."""
    v = s.to_numpy() if s.dtype.kind in "uifb" else None
    if v is not None and v.dtype.kind in "uib":
        return v.astype(np.uint8) if v.dtype.kind == "b" else v
    if v is not None and v.dtype.kind == "f":
        return None if np.isnan(v).any() else v
    try:
        codes, _ = pd.factorize(s, sort=True)  # codes follow the sorted order of the distinct values
    except TypeError:
        return None
    return None if (codes < 0).any() else codes


def _descending(k: np.ndarray) -> np.ndarray | None:
    if k.dtype.kind == "u":
        return ~k if k.dtype == np.uint64 else -(k.astype(np.int64))
    if k.dtype.kind == "i":
        return None if len(k) and k.min() == np.iinfo(k.dtype).min else -k
    return -k  # float without NaN


def _sorted_frame(df: pd.DataFrame, by: list[str], ascending: bool | list[bool] = True) -> pd.DataFrame:
    """``df.sort_values(by, ascending, kind="stable")`` (index labels kept): an input already in that order
    is returned as is, otherwise a stable np.lexsort over the same orderings, else pandas itself."""
    asc = [ascending] * len(by) if isinstance(ascending, bool) else list(ascending)
    keys = []
    for c, a in zip(by, asc):
        k = _order_key(df[c])
        if k is not None and not a:
            k = _descending(k)
        if k is None:
            return df.sort_values(by, ascending=ascending, kind="stable")
        keys.append(k)
    if len(df) < 2:
        return df
    ok = np.zeros(len(df) - 1, dtype=bool)
    eq = np.ones(len(df) - 1, dtype=bool)
    for k in keys:
        x, y = k[:-1], k[1:]
        ok |= eq & (x < y)
        eq &= x == y
    if (ok | eq).all():
        return df
    return df.take(np.lexsort(keys[::-1]))


def _cumcount_sorted(keys: list[np.ndarray]) -> np.ndarray:
    """groupby(keys, sort=False).cumcount() for rows whose groups are contiguous (a sorted frame)."""
    n = len(keys[0])
    start = np.ones(n, dtype=bool)
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for k in keys:
            same &= k[1:] == k[:-1]
        start[1:] = ~same
    first = np.flatnonzero(start)
    size = np.diff(np.append(first, n))
    return np.arange(n, dtype=np.int64) - np.repeat(first, size)


# --------------------------------------------------------------------------------------------------
# Canonical JSON (bundle bytes)
# --------------------------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Canonical encoding (1A-S5-S9 §0): sorted keys, ASCII, compact separators, floats via repr."""
    return json.dumps(_jsonable(obj), sort_keys=True, ensure_ascii=True, separators=(",", ":"),
                      allow_nan=False).encode("ascii") + b"\n"


def canonical_jsonl(rows: Iterable[Any]) -> bytes:
    return b"".join(canonical_json(r) for r in rows)


# ==================================================================================================
# Pure checks
# ==================================================================================================


def family_table(families: dict | None) -> tuple[dict[str, set[tuple[str, str]]], frozenset]:
    """(family -> registered (module, label) pairs, non-consuming families) from the dictionary's RNG family
    table (1A-S1-S4 §0: validators derive these from the dictionary); the frozen literals when absent."""
    if not families:
        return REGISTERED, NONCONSUMING
    pairs = {f: {(str(x["module"]), str(x["substream_label"])) for x in (spec.get("streams") or [])}
             for f, spec in families.items()}
    nonc = frozenset(f for f, spec in families.items() if spec.get("consuming") is False)
    return pairs, nonc


def _envelope_tokens(ids) -> dict[str, str]:
    return {"seed": str(ids.seed), "parameter_hash": ids.parameter_hash, "run_id": ids.run_id,
            "manifest_fingerprint": ids.manifest_fingerprint}


def check_rng_envelopes(events: dict[str, pd.DataFrame], ids, fails: Failures, families: dict | None = None) -> None:
    """Per-event envelope law over every family (00-core §3.6, 1A-S5-S9 §6.2 RNG group):
    path<->embed equality, registered module/label, blocks == after - before, non-consuming rows,
    fixed budgets and duplicate event identities."""
    tok = _envelope_tokens(ids)
    registered, nonconsuming = family_table(families)
    for fam in sorted(events):
        _envelope_family(fam, events[fam], tok, registered, nonconsuming, fails)
    for fam in sorted(events):
        _duplicate_events(fam, events[fam], fails)


def _envelope_family(fam: str, df: pd.DataFrame, tok: dict[str, str], registered: dict, nonconsuming: frozenset,
                     fails: Failures, *, tokens: bool = True) -> None:
    """check_rng_envelopes for one family. ``tokens=False``: the embedded tokens were already shown equal to
    the run's on every row (Arrow, before conversion), so their columns may be absent from ``df``."""
    if len(df) == 0:
        return
    # --- path <-> embed (00-core §2.3: seed, parameter_hash, run_id = tokens; fingerprint = run's)
    for name, want in (tok.items() if tokens else ()):
        if name not in df.columns:
            fails.add("E_SCHEMA_INVALID", f"rng_event {fam}: envelope field {name} missing", [fam])
            continue
        vals = df[name].to_numpy()
        if isinstance(df[name].dtype, pd.StringDtype) and want != "nan":  # vectorised: missing != want
            badm = (df[name] != want).to_numpy(dtype=bool)
        else:
            badm = (vals.astype(np.uint64).astype(str) if vals.dtype.kind in "ui" else vals.astype(str)) != want
        if badm.any():
            fails.frame("E_PATH_EMBED_MISMATCH", f"rng_event {fam}: embedded {name} != {want}",
                        _envelope_rows(df[badm], extra=[name]), dataset_id=f"rng_event_{fam}")
    # --- registered module / label pairs
    pairs = registered.get(fam, set())
    if all(isinstance(df[c].dtype, pd.StringDtype) for c in ("module", "substream_label")):
        combo = (df["module"] + "|" + df["substream_label"]).reset_index(drop=True)  # missing stays missing
    else:
        combo = pd.Series(df["module"].to_numpy().astype(str).astype(object) + "|" +
                          df["substream_label"].to_numpy().astype(str).astype(object))
    badmask = ~combo.isin([f"{m}|{lab}" for m, lab in sorted(pairs)]).to_numpy(dtype=bool)
    fails.frame("E_SCHEMA_INVALID", f"rng_event {fam}: unregistered (module, substream_label); "
                f"registered: {sorted(pairs)}", _envelope_rows(df[badmask]), dataset_id=f"rng_event_{fam}")
    # --- counters: blocks == u128(after) - u128(before)
    ok = _u128_delta_is(df["rng_counter_after_hi"], df["rng_counter_after_lo"], df["rng_counter_before_hi"],
                        df["rng_counter_before_lo"], df["blocks"])
    fails.frame("E_RNG_COUNTER_MISMATCH", f"rng_event {fam}: blocks != u128(after) - u128(before)",
                _envelope_rows(df[~ok]), dataset_id=f"rng_event_{fam}")
    blocks = df["blocks"].to_numpy().astype(np.uint64)
    draws = df["draws_u64"].to_numpy()
    # --- non-consuming families
    if fam in nonconsuming:
        same = (df["rng_counter_after_hi"].to_numpy() == df["rng_counter_before_hi"].to_numpy()) & (
            df["rng_counter_after_lo"].to_numpy() == df["rng_counter_before_lo"].to_numpy())
        if isinstance(df["draws"].dtype, pd.StringDtype):
            strd = (df["draws"] == "0").to_numpy(dtype=bool)  # missing -> False, as str(nan) == "0" is
        else:
            strd = np.asarray([str(v) == "0" for v in df["draws"].to_numpy()], dtype=bool)
        bad = ~(same & (blocks == 0) & strd)
        fails.frame("E_NONCONSUMING_CHANGED_COUNTERS",
                    f"rng_event {fam}: non-consuming event must have before == after, blocks 0, draws \"0\"",
                    _envelope_rows(df[bad]), dataset_id=f"rng_event_{fam}")
        return
    # --- fixed / structural budgets (draws = uniforms actually used)
    bad = np.zeros(len(df), dtype=bool)
    if fam == "hurdle_bernoulli":
        bad = ~(((blocks == 0) & (draws == 0)) | ((blocks == 1) & (draws == 1)))
    elif fam == "gumbel_key":
        bad = ~((blocks == 1) & (draws == 1))
    elif fam == "normal_box_muller":
        bad = ~((blocks == 1) & (draws == 2))
    elif fam == "gamma_component":
        # draws = 2J + A (+1), blocks = J + A (+1), 1 <= A <= J (1A-S1-S4 §0.2) => J = draws - blocks >= 1
        j = draws.astype(np.float64) - blocks.astype(np.float64)
        boost = np.zeros(len(df))
        if "alpha" in df.columns:
            boost = (df["alpha"].to_numpy(dtype=np.float64) < 1.0).astype(np.float64)
        a = blocks.astype(np.float64) - j - boost
        bad = ~((j >= 1) & (a >= 1) & (a <= j))
    elif fam == "poisson_component" and "lambda" in df.columns and "k" in df.columns:
        lam = df["lambda"].to_numpy(dtype=np.float64)
        k = df["k"].to_numpy().astype(np.float64)
        inv = lam < 10.0  # regime threshold lambda* = 10 (00-core §3.5, decision 7)
        bad_inv = inv & ~((blocks.astype(np.float64) == k + 1) & (draws == blocks))
        bad_ptrs = ~inv & ~((blocks >= 1) & (draws == 2 * blocks))
        bad = bad_inv | bad_ptrs
    elif fam == "dirichlet_gamma_vector":
        bad = ~(draws >= blocks)
    fails.frame("E_RNG_BUDGET_VIOLATION", f"rng_event {fam}: draws/blocks outside the family budget",
                _envelope_rows(df[bad], extra=[c for c in ("lambda", "k", "alpha") if c in df.columns]),
                dataset_id=f"rng_event_{fam}")


def _duplicate_events(fam: str, df: pd.DataFrame, fails: Failures) -> None:
    """Duplicate event identities (same family, stream and counter twice)."""
    if len(df) == 0 or fam in ("hurdle_bernoulli", "nb_final", "ztp_final", "sequence_finalize"):
        return  # those four are reported with their own cardinality codes
    key = [c for c in ("module", "substream_label", "merchant_id", "country_iso", "rng_counter_before_hi",
                       "rng_counter_before_lo", "rng_counter_after_hi", "rng_counter_after_lo") if c in df.columns]
    dup = df[df.duplicated(subset=key, keep=False)]
    fails.frame("E_DUP_PK", f"rng_event {fam}: duplicate event identity", _envelope_rows(dup),
                dataset_id=f"rng_event_{fam}")


def _envelope_rows(df: pd.DataFrame, extra: Iterable[str] = ()) -> pd.DataFrame:
    cols = [c for c in ("merchant_id", "country_iso", "module", "substream_label", "rng_counter_before_hi",
                        "rng_counter_before_lo", "rng_counter_after_hi", "rng_counter_after_lo", "blocks", "draws",
                        *extra) if c in df.columns]
    return df[cols]


def trace_frame_from_table(t: pa.Table) -> pd.DataFrame:
    """rng_trace_log as read by ``rnglog.read_trace`` (u64 columns exact) -> the frame ``check_trace`` uses."""
    if t.num_rows == 0:
        return trace_frame([])
    cols = ["module", "substream_label", "seed", "run_id", "events_total", "draws_total", "blocks_total",
            "rng_counter_after_hi", "rng_counter_after_lo"]
    df = _frame(t, cols)
    for c in ("seed", "run_id", "module", "substream_label"):
        if c == "seed":
            v = df[c].to_numpy()  # str(v) per row; vectorised for plain integer arrays (same decimal text)
            df[c] = (v.astype(str).astype(object) if v.dtype.kind in "ui"
                     else np.asarray([str(x) for x in v], dtype=object))
    for c in ("events_total", "draws_total", "blocks_total", "rng_counter_after_hi", "rng_counter_after_lo"):
        v = df[c]
        df[c] = v.to_numpy().astype(np.uint64) if v.dtype.kind in "ui" else _parse_u64(
            np.asarray([None if pd.isna(x) else str(x) for x in v], dtype=object))
    return df


def trace_frame(rows: list[dict]) -> pd.DataFrame:
    """rng_trace_log rows -> frame with exact u64 columns (json ints may exceed int64; pandas would lose them)."""
    cols = {"module": [], "substream_label": [], "seed": [], "run_id": [], "events_total": [], "draws_total": [],
            "blocks_total": [], "rng_counter_after_hi": [], "rng_counter_after_lo": []}
    for r in rows:
        for c in cols:
            cols[c].append(r.get(c))
    out = pd.DataFrame({
        "module": np.asarray([str(v) for v in cols["module"]], dtype=object),
        "substream_label": np.asarray([str(v) for v in cols["substream_label"]], dtype=object),
        "seed": np.asarray([str(v) for v in cols["seed"]], dtype=object),
        "run_id": np.asarray([str(v) for v in cols["run_id"]], dtype=object),
    })
    for c in ("events_total", "draws_total", "blocks_total", "rng_counter_after_hi", "rng_counter_after_lo"):
        out[c] = _parse_u64(np.asarray([None if v is None else str(v) for v in cols[c]], dtype=object))
    return out


def check_trace(events: dict[str, pd.DataFrame], trace: pd.DataFrame, audit: list[dict], ids,
                fails: Failures) -> dict:
    """Trace duty and totals (00-core §3.7, 1A-S5-S9 §6.2): one cumulative trace row after every event
    (E_TRACE_COVERAGE_MISSING), the final row per (module, label) — max events_total, then max after
    counter; ``ts_utc`` is never used (decision 5: validators never depend on it) — equals the event sums
    (E_TRACE_TOTALS_MISMATCH), totals never decrease, and an audit row exists for the run. Returns the
    per-key accounting for rng_accounting.json."""
    sums: dict[tuple[str, str], dict] = {}
    for fam in sorted(events):
        _trace_sums(fam, events[fam], sums)
    return _trace_accounting(sums, _trace_finals(trace, ids, fails), audit, ids, fails)


def _trace_sums(fam: str, df: pd.DataFrame, sums: dict) -> None:
    """Add one family's events to the per-(module, substream_label) sums of :func:`check_trace`."""
    if len(df) == 0:
        return
    for (mod, lab), sub in df.groupby(["module", "substream_label"], sort=True):
        s = sums.setdefault((str(mod), str(lab)), {"events": 0, "draws": 0, "blocks": 0, "families": set()})
        s["events"] += int(len(sub))
        s["draws"] += _u128_sum(sub["draws_u64"].to_numpy())
        s["blocks"] += _u128_sum(sub["blocks"].to_numpy())
        s["families"].add(fam)


def _trace_finals(trace: pd.DataFrame, ids, fails: Failures) -> tuple[dict, dict]:
    """Trace rows of check_trace: embedded seed/run_id, non-decreasing totals; returns (final row totals,
    row count) per (module, substream_label)."""
    finals: dict[tuple[str, str], dict] = {}
    rows_per_key: dict[tuple[str, str], int] = {}
    if len(trace):
        for name, want in (("seed", str(ids.seed)), ("run_id", ids.run_id)):
            bad = trace[trace[name].to_numpy() != want]
            fails.frame("E_PATH_EMBED_MISMATCH", f"rng_trace_log: embedded {name} != path token {want}",
                        bad[["module", "substream_label", name]], dataset_id="rng_trace_log", merchant_col=None)
        t = trace.sort_values(["module", "substream_label", "events_total", "rng_counter_after_hi",
                               "rng_counter_after_lo"], kind="stable").reset_index(drop=True)
        key_mod = t["module"].to_numpy()
        key_lab = t["substream_label"].to_numpy()
        last = np.ones(len(t), dtype=bool)
        last[:-1] = (key_mod[1:] != key_mod[:-1]) | (key_lab[1:] != key_lab[:-1])
        first = np.ones(len(t), dtype=bool)
        first[1:] = last[:-1]
        # cumulative totals never decrease as events_total grows (00-core §3.7)
        for c in ("draws_total", "blocks_total"):
            v = t[c].to_numpy()
            dec = np.zeros(len(t), dtype=bool)
            dec[1:] = ~first[1:] & (v[1:] < v[:-1])
            fails.frame("E_TRACE_TOTALS_MISMATCH", f"rng_trace_log: {c} decreases while events_total grows",
                        t.loc[dec, ["module", "substream_label", "events_total", c]], dataset_id="rng_trace_log",
                        merchant_col=None)
        for (mod, lab), n in t.groupby(["module", "substream_label"], sort=True).size().items():
            rows_per_key[(str(mod), str(lab))] = int(n)
        for i in np.flatnonzero(last):
            finals[(str(key_mod[i]), str(key_lab[i]))] = {"events_total": int(t["events_total"].iloc[i]),
                                                           "draws_total": int(t["draws_total"].iloc[i]),
                                                           "blocks_total": int(t["blocks_total"].iloc[i])}
    return finals, rows_per_key


def _trace_accounting(sums: dict, finals_rows: tuple[dict, dict], audit: list[dict], ids, fails: Failures) -> dict:
    """Coverage and totals per (module, substream_label), the audit row; the rng_accounting.json keys."""
    finals, rows_per_key = finals_rows
    accounting: dict[str, dict] = {}
    for key in sorted(set(sums) | set(finals)):
        s = sums.get(key, {"events": 0, "draws": 0, "blocks": 0, "families": set()})
        f = finals.get(key)
        nrows = rows_per_key.get(key, 0)
        coverage_ok = f is not None and nrows == s["events"]
        if f is None:
            fails.add("E_TRACE_COVERAGE_MISSING", f"no rng_trace_log rows for ({key[0]}, {key[1]}) although "
                      f"{s['events']} events exist", [list(key)], dataset_id="rng_trace_log")
        elif nrows != s["events"]:
            fails.add("E_TRACE_COVERAGE_MISSING", f"rng_trace_log ({key[0]}, {key[1]}): {nrows} trace rows for "
                      f"{s['events']} events (one cumulative trace row after every event)", [list(key)],
                      dataset_id="rng_trace_log")
        totals_ok = f is not None and (f["events_total"], f["draws_total"], f["blocks_total"]) == (
            s["events"], s["draws"], s["blocks"])
        if f is not None and not totals_ok:
            fails.add("E_TRACE_TOTALS_MISMATCH", f"rng_trace_log ({key[0]}, {key[1]}): final row totals != event sums",
                      [{"module": key[0], "substream_label": key[1], "trace": f,
                        "events": {"events_total": s["events"], "draws_total": s["draws"],
                                   "blocks_total": s["blocks"]}}], dataset_id="rng_trace_log")
        accounting[f"{key[0]}|{key[1]}"] = {
            "module": key[0],
            "substream_label": key[1],
            "families": sorted(s["families"]),
            "events_total": s["events"],
            "draws_total_u128_dec": str(s["draws"]),
            "blocks_total_u64": s["blocks"],
            "trace_rows_total": nrows,
            "trace_totals": None if f is None else {"events_total": f["events_total"],
                                                    "draws_total_u128_dec": str(f["draws_total"]),
                                                    "blocks_total_u64": f["blocks_total"]},
            "coverage_ok": bool(coverage_ok),
            "totals_ok": bool(totals_ok),
        }
    # audit row for the run (00-core §3.7: one row per run before any event)
    want = (str(ids.seed), ids.parameter_hash, ids.run_id)
    has = [r for r in audit if (str(r.get("seed")), str(r.get("parameter_hash")), str(r.get("run_id"))) == want]
    if sums and not has:
        fails.add("E_TRACE_COVERAGE_MISSING", "rng_audit_log has no row for this run (seed, parameter_hash, run_id)",
                  [list(want)], dataset_id="rng_audit_log")
    for r in has:
        if str(r.get("manifest_fingerprint")) != ids.manifest_fingerprint:
            fails.add("E_PATH_EMBED_MISMATCH", "rng_audit_log: manifest_fingerprint != run fingerprint",
                      [{"manifest_fingerprint": r.get("manifest_fingerprint")}], dataset_id="rng_audit_log")
        if r.get("algorithm") != "philox2x64-10":
            fails.add("E_SCHEMA_INVALID", "rng_audit_log: algorithm must be philox2x64-10",
                      [{"algorithm": r.get("algorithm")}], dataset_id="rng_audit_log")
    return {"keys": accounting, "audit_present": bool(has)}


def _u128_sum(values: np.ndarray) -> int:
    """Exact sum of u64 values (python int; no wrap): split into 32-bit halves summed in uint64."""
    v = np.asarray(values, dtype=np.uint64)
    lo = int((v & np.uint64(0xFFFFFFFF)).sum(dtype=np.uint64))
    hi = int((v >> np.uint64(32)).sum(dtype=np.uint64))
    return (hi << 32) + lo


# ---------------------------------------------------------------------------- S1


def check_s1(hurdle: pd.DataFrame, universe: np.ndarray, fails: Failures, *, pi_probs: pd.DataFrame | None = None,
             replay: dict | None = None) -> pd.DataFrame:
    """S1 replay (1A-S1-S4 §1.4, §1.6): one hurdle event per merchant, u strictly inside (0,1), the
    deterministic-branch equivalence chain, and — when ``replay`` holds the re-derived base counters and
    uniforms — before == base counter and u / is_multi bit-for-bit. Returns merchant_id -> is_multi."""
    uni = pd.DataFrame({"merchant_id": np.asarray(universe, dtype=np.uint64)})
    if len(hurdle) == 0:
        fails.add("E_S1_CARDINALITY", "no hurdle_bernoulli events", [], count=len(uni))
        return pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "is_multi": np.zeros(0, bool)})
    h = hurdle
    dup = h[h.duplicated(subset=["merchant_id"], keep=False)]
    fails.frame("E_S1_CARDINALITY", "more than one hurdle_bernoulli event for a merchant", _envelope_rows(dup))
    hm = h["merchant_id"].to_numpy().astype(np.uint64)
    missing = _setdiff(uni["merchant_id"].to_numpy(), hm)
    if len(missing):
        fails.add("E_S1_CARDINALITY", "merchants without a hurdle_bernoulli event",
                  [{"merchant_id": m} for m in missing[:MAX_ROWS]], count=len(missing), merchants=missing)
    extra = _setdiff(hm, uni["merchant_id"].to_numpy())
    if len(extra):
        fails.add("E_S1_CARDINALITY", "hurdle_bernoulli events for merchants outside the merchant universe",
                  [{"merchant_id": m} for m in extra[:MAX_ROWS]], count=len(extra), merchants=extra)
    pi = h["pi"].to_numpy(dtype=np.float64)
    unull = _is_null_series(h["u"])
    u = np.where(unull, np.nan, pd.to_numeric(h["u"], errors="coerce").to_numpy(dtype=np.float64))
    det = h["deterministic"].to_numpy().astype(bool)
    is_multi = h["is_multi"].to_numpy().astype(bool)
    draws = h["draws_u64"].to_numpy()
    # u strictly inside (0,1) whenever present / non-deterministic
    oob = (~det) & (unull | ~(u > 0.0) | ~(u < 1.0))
    fails.frame("E_S1_U_OUT_OF_RANGE", "hurdle u must lie strictly inside (0,1) on the stochastic branch",
                h.loc[oob, [c for c in ("merchant_id", "pi", "u", "deterministic") if c in h.columns]])
    # pi in [0,1] finite
    badpi = ~np.isfinite(pi) | (pi < 0.0) | (pi > 1.0)
    fails.frame("E_S1_REPLAY_MISMATCH", "hurdle pi not finite in [0,1]", h.loc[badpi, ["merchant_id", "pi"]])
    # equivalence chain: pi in {0,1} <=> deterministic <=> draws "0" <=> u null <=> is_multi == (pi == 1)
    piext = (pi == 0.0) | (pi == 1.0)
    chain_bad = (piext != det) | (det != (draws == 0)) | (det != unull) | (det & (is_multi != (pi == 1.0)))
    # stochastic branch: is_multi == (u < pi)
    with np.errstate(invalid="ignore"):
        chain_bad |= (~det) & ~unull & (is_multi != (u < pi))
    fails.frame("E_S1_REPLAY_MISMATCH", "hurdle equivalence chain broken (pi in {0,1} <=> deterministic <=> "
                "draws 0 <=> u null; is_multi == (u < pi))",
                h.loc[chain_bad, [c for c in ("merchant_id", "pi", "u", "deterministic", "is_multi", "draws")
                                  if c in h.columns]])
    # pi agrees with S0's diagnostic hurdle_pi_probs (00-core §7.4: "if produced MUST match"); that table
    # stores pi as float32, so the event's binary64 pi narrowed by RNE must give the same float32 bits
    if pi_probs is not None and len(pi_probs) and "pi" in pi_probs.columns:
        j = h[["merchant_id", "pi"]].merge(pi_probs[["merchant_id", "pi"]], on="merchant_id", how="inner",
                                           suffixes=("", "_s0"))
        a = j["pi"].to_numpy(dtype=np.float64).astype(np.float32)
        b = j["pi_s0"].to_numpy().astype(np.float32)
        bad = a.view(np.uint32) != b.view(np.uint32)
        fails.frame("E_S1_REPLAY_MISMATCH", "hurdle pi differs from hurdle_pi_probs (float32 bits)", j[bad])
    # replay of the Philox draw from the re-derived base counter
    if replay is not None:
        bh, bl, x_u = replay["before_hi"], replay["before_lo"], replay["u"]
        cnt = (h["rng_counter_before_hi"].to_numpy().astype(np.uint64) != bh) | (
            h["rng_counter_before_lo"].to_numpy().astype(np.uint64) != bl)
        fails.frame("E_RNG_COUNTER_MISMATCH", "hurdle_bernoulli: before counter != re-derived base counter of "
                    "the merchant's hurdle_bernoulli substream", _envelope_rows(h[cnt]))
        stoch = (~det) & ~unull
        ubits = np.where(stoch, u, 0.0).view(np.uint64)
        rbits = np.where(stoch, x_u, 0.0).view(np.uint64)
        with np.errstate(invalid="ignore"):
            bad = stoch & ((ubits != rbits) | (is_multi != (x_u < pi)))
        rows = h.loc[bad, ["merchant_id", "pi", "u", "is_multi"]].copy()
        rows["u_replayed"] = x_u[bad]
        fails.frame("E_S1_REPLAY_MISMATCH", "hurdle u / is_multi do not replay bit-for-bit from Philox2x64-10", rows)
    out = h.drop_duplicates(subset=["merchant_id"], keep="first")[["merchant_id", "is_multi"]].copy()
    out["merchant_id"] = out["merchant_id"].astype(np.uint64)
    out["is_multi"] = out["is_multi"].astype(bool)
    return out


def check_gating(events: dict[str, pd.DataFrame], multi: pd.DataFrame, eligible: np.ndarray | None,
                 fails: Failures) -> None:
    """Gated families exist only for is_multi merchants (E_S1_GATING_VIOLATION); S4 families only for
    cross-border-eligible ones (dictionary gating ``also_requires``)."""
    multi_ids = multi.loc[multi["is_multi"].to_numpy().astype(bool), "merchant_id"].to_numpy().astype(np.uint64)
    for fam in GATED_FAMILIES:
        df = events.get(fam)
        if df is None or len(df) == 0 or "merchant_id" not in df.columns:
            continue
        m = df["merchant_id"].to_numpy().astype(np.uint64)
        bad = ~_isin(m, multi_ids)
        fails.frame("E_S1_GATING_VIOLATION", f"rng_event {fam} for a merchant whose hurdle is not is_multi",
                    _envelope_rows(df[bad]))
        if eligible is not None and (fam in S4_FAMILIES or fam == "gumbel_key" or (
                fam == "poisson_component" and "module" in df.columns)):
            sel = np.ones(len(df), dtype=bool)
            if fam == "poisson_component":
                sel = df["module"].to_numpy() == S4_POISSON[0]
            badel = sel & ~bad & ~_isin(m, eligible)
            fails.frame("E_S1_GATING_VIOLATION", f"rng_event {fam} for a cross-border-ineligible merchant",
                        _envelope_rows(df[badel]))


# ---------------------------------------------------------------------------- S2


def check_s2(nb_final: pd.DataFrame, gamma: pd.DataFrame, poisson: pd.DataFrame, multi_ids: np.ndarray,
             fails: Failures) -> pd.DataFrame:
    """S2 reconstruction (1A-S1-S4 §2.7): one nb_final per multi-site merchant with N >= 2; attempts
    paired by counter order (t-th gamma with t-th poisson); rejected attempts have k in {0,1}, the last
    has k == n_outlets and index == nb_rejections; gamma alpha == dispersion_k and
    lambda == (mu/phi)*gamma_value in binary64. Returns merchant_id -> N for the valid finals."""
    multi_ids = np.asarray(multi_ids, dtype=np.uint64)
    nb = nb_final if len(nb_final) else pd.DataFrame({"merchant_id": np.zeros(0, np.uint64),
                                                      "n_outlets": np.zeros(0, np.int64)})
    dup = nb[nb.duplicated(subset=["merchant_id"], keep=False)]
    fails.frame("E_S2_FINAL_MISSING_OR_DUP", "more than one nb_final for a merchant", _envelope_rows(dup, ["n_outlets"]))
    have = nb["merchant_id"].to_numpy().astype(np.uint64)
    missing = _setdiff(multi_ids, have)
    if len(missing):
        fails.add("E_S2_FINAL_MISSING_OR_DUP", "multi-site merchants without an nb_final event",
                  [{"merchant_id": m} for m in missing[:MAX_ROWS]], count=len(missing), merchants=missing)
    n = nb["n_outlets"].to_numpy().astype(np.int64)
    fails.frame("E_S2_N_LT_2", "nb_final.n_outlets < 2", nb.loc[n < 2, ["merchant_id", "n_outlets"]])
    nb1 = nb.drop_duplicates(subset=["merchant_id"], keep=False)
    # --- component reconstruction
    if len(nb1) and {"mu", "dispersion_k", "nb_rejections"} <= set(nb1.columns):
        g = _attempt_index(gamma)
        p = _attempt_index(poisson)
        gc = g.groupby("merchant_id").size() if len(g) else pd.Series(dtype=np.int64)
        pcnt = p.groupby("merchant_id").size() if len(p) else pd.Series(dtype=np.int64)
        f = nb1[["merchant_id", "mu", "dispersion_k", "n_outlets", "nb_rejections"]].copy()
        f["n_gamma"] = f["merchant_id"].map(gc).fillna(0).astype(np.int64).to_numpy()
        f["n_poisson"] = f["merchant_id"].map(pcnt).fillna(0).astype(np.int64).to_numpy()
        want = f["nb_rejections"].to_numpy().astype(np.int64) + 1
        bad = (f["n_gamma"].to_numpy() != want) | (f["n_poisson"].to_numpy() != want)
        fails.frame("E_S2_COMPONENT_ORDER", "S2 attempts != nb_rejections + 1 (one gamma_component and one "
                    "poisson_component per attempt)", f[bad])
        # orphan components (merchant without nb_final)
        for name, t in (("gamma_component", g), ("poisson_component", p)):
            if len(t):
                orphan = t[~_isin(t["merchant_id"].to_numpy().astype(np.uint64), have)]
                fails.frame("E_S2_FINAL_MISSING_OR_DUP", f"S2 {name} events for a merchant without nb_final",
                            _envelope_rows(orphan))
        if len(g) and len(p):
            gp = g[["merchant_id", "_t", *[c for c in ("alpha", "gamma_value") if c in g.columns]]].merge(
                p[["merchant_id", "_t", *[c for c in ("lambda", "k") if c in p.columns]]],
                on=["merchant_id", "_t"], how="inner").merge(f[["merchant_id", "mu", "dispersion_k", "n_outlets",
                                                                "nb_rejections"]], on="merchant_id", how="inner")
            t = gp["_t"].to_numpy().astype(np.int64)
            r = gp["nb_rejections"].to_numpy().astype(np.int64)
            k = gp["k"].to_numpy().astype(np.int64)
            last = t == r
            bad = (t < r) & ~((k == 0) | (k == 1))
            bad |= last & (k != gp["n_outlets"].to_numpy().astype(np.int64))
            bad |= (t > r)
            fails.frame("E_S2_COMPONENT_ORDER", "S2 attempt sequence: rejected attempts need k in {0,1}; the "
                        "accepting attempt index == nb_rejections with k == n_outlets", gp[bad])
            mu = gp["mu"].to_numpy(dtype=np.float64)
            phi = gp["dispersion_k"].to_numpy(dtype=np.float64)
            if "alpha" in gp.columns and "gamma_value" in gp.columns and "lambda" in gp.columns:
                lam = (mu / phi) * gp["gamma_value"].to_numpy(dtype=np.float64)
                comp = (gp["alpha"].to_numpy(dtype=np.float64).view(np.uint64) != phi.view(np.uint64)) | (
                    lam.view(np.uint64) != gp["lambda"].to_numpy(dtype=np.float64).view(np.uint64))
                fails.frame("E_S2_COMPONENT_ORDER", "S2 composition: alpha == dispersion_k and lambda == "
                            "(mu/dispersion_k)*gamma_value must hold bit-for-bit", gp[comp])
    out = nb1[["merchant_id", "n_outlets"]].copy()
    out["merchant_id"] = out["merchant_id"].astype(np.uint64)
    out["n_outlets"] = out["n_outlets"].astype(np.int64)
    return out


def _attempt_index(df: pd.DataFrame) -> pd.DataFrame:
    """Order a label's events per merchant by before counter; _t = 0-based attempt index."""
    if df is None or len(df) == 0:
        return pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "_t": np.zeros(0, np.int64)})
    d = _sorted_frame(df, ["merchant_id", "rng_counter_before_hi", "rng_counter_before_lo"]).reset_index(drop=True)
    mid = d["merchant_id"].to_numpy()
    d["_t"] = (_cumcount_sorted([mid]) if mid.dtype.kind in "ui" else
               d.groupby("merchant_id", sort=False).cumcount().to_numpy().astype(np.int64))
    return d


def check_counter_chains(events: dict[str, pd.DataFrame], fails: Failures, bases: dict | None = None) -> None:
    """Per-stream counter chains (1A-S1-S4 §0): within one (label, merchant[, ISO]) substream the consuming
    events are contiguous — event e+1 before == event e after — and the first starts at the re-derived base
    counter (``bases[(label)]`` = DataFrame merchant_id[, country_iso], base_hi, base_lo) when given.
    Non-consuming keyed finalisers (nb_final, residual_rank, sequence_finalize, site_sequence_overflow) sit
    exactly at their own substream's base counter."""
    consuming = [("gamma_component", S2_GAMMA), ("poisson_component", S2_POISSON), ("poisson_component", S4_POISSON),
                 ("dirichlet_gamma_vector", ("1A.dirichlet_allocator", "dirichlet_gamma_vector")),
                 ("hurdle_bernoulli", ("1A.hurdle_sampler", "hurdle_bernoulli")),
                 ("gumbel_key", ("1A.foreign_country_selector", "gumbel_key"))]
    for fam, (mod, lab) in consuming:
        df = events.get(fam)
        if df is None or len(df) == 0:
            continue
        sel = (df["module"].to_numpy() == mod) & (df["substream_label"].to_numpy() == lab)
        d = df[sel]
        if len(d) == 0:
            continue
        if fam == "hurdle_bernoulli":
            d = d[d["blocks"].to_numpy().astype(np.uint64) > 0]
        keys = ["merchant_id", "country_iso"] if lab in ISO_KEYED_LABELS else ["merchant_id"]
        d = _sorted_frame(d, [*keys, "rng_counter_before_hi", "rng_counter_before_lo"]).reset_index(drop=True)
        same = np.ones(len(d), dtype=bool)
        for k in keys:
            kv = d[k].to_numpy()
            same[1:] &= kv[1:] == kv[:-1]
        same[0] = False
        bh = d["rng_counter_before_hi"].to_numpy().astype(np.uint64)
        bl = d["rng_counter_before_lo"].to_numpy().astype(np.uint64)
        ah = d["rng_counter_after_hi"].to_numpy().astype(np.uint64)
        al = d["rng_counter_after_lo"].to_numpy().astype(np.uint64)
        gap = np.zeros(len(d), dtype=bool)
        gap[1:] = same[1:] & ((bh[1:] != ah[:-1]) | (bl[1:] != al[:-1]))
        fails.frame("E_RNG_COUNTER_MISMATCH", f"({mod}, {lab}): consecutive events of one substream must chain "
                    "(before == previous after)", _envelope_rows(d[gap]))
        if bases is not None and lab in bases:
            first = d[~same]
            _compare_base(first, bases[lab], keys, f"({mod}, {lab}): first event does not start at the "
                          "substream's base counter", fails)
    for fam, lab in (("nb_final", "nb_final"), ("residual_rank", "residual_rank"),
                     ("sequence_finalize", "sequence_finalize"), ("site_sequence_overflow", "site_sequence_overflow")):
        df = events.get(fam)
        if df is None or len(df) == 0 or bases is None or lab not in bases:
            continue
        keys = ["merchant_id", "country_iso"] if lab in ISO_KEYED_LABELS else ["merchant_id"]
        _compare_base(df, bases[lab], keys, f"{fam}: counters != base counter of its keyed substream", fails)


def _compare_base(df: pd.DataFrame, base: pd.DataFrame, keys: list[str], detail: str, fails: Failures) -> None:
    if len(df) == 0:
        return
    j = df[[*keys, "rng_counter_before_hi", "rng_counter_before_lo"]]
    if _aligned(j, base, keys):
        j = j.reset_index(drop=True)
        for c in base.columns:
            if c not in keys:
                j[c] = base[c].to_numpy()
    else:
        j = j.merge(base, on=keys, how="left")
    bad = (j["base_hi"].isna().to_numpy()) | (
        j["rng_counter_before_hi"].to_numpy().astype(np.uint64) != j["base_hi"].fillna(0).to_numpy().astype(np.uint64)
    ) | (j["rng_counter_before_lo"].to_numpy().astype(np.uint64) != j["base_lo"].fillna(0).to_numpy().astype(np.uint64))
    fails.frame("E_RNG_COUNTER_MISMATCH", detail, j[bad])


# ---------------------------------------------------------------------------- S2 corridors


def s2_corridor_metrics(mu: np.ndarray, phi: np.ndarray, r: np.ndarray, policy: dict) -> dict:
    """Run-level S2 corridors (1A-S1-S4 §2.6) over merchants in ascending merchant_id order.

    ``policy``: ``{"rho_reject_max", "p99_max", "cusum": {"reference_k", "threshold_h", "alpha_cap"?}}``.
    Returns ``{rho_hat, p99, s_max, M, R, A, breaches: [rho|p99|cusum], alpha_invalid: [indices]}``.
    Scalar math on the decision path (numeric policy: math.* libm, evaluation order as written)."""
    k = float(policy["cusum"]["reference_k"])
    h = float(policy["cusum"]["threshold_h"])
    cap = float(policy["cusum"].get("alpha_cap", 1.0))
    rho_max = float(policy.get("rho_reject_max", 0.06))
    p99_max = float(policy.get("p99_max", 3))
    alphas: list[float] = []
    keep: list[int] = []
    invalid: list[int] = []
    for i, (m_, f_) in enumerate(zip(mu.tolist(), phi.tolist())):
        p = f_ / (m_ + f_)
        p0 = math.exp(f_ * math.log(p)) if p > 0 else 0.0
        p1 = p0 * f_ * (1.0 - p)
        a = 1.0 - p0 - p1
        if not math.isfinite(a) or not (0.0 < a <= 1.0):
            invalid.append(i)
            continue
        alphas.append(min(a, cap))
        keep.append(i)
    rr = [int(r[i]) for i in keep]
    m = len(rr)
    out: dict[str, Any] = {"M": m, "alpha_invalid": invalid, "breaches": [],
                           "policy": {"rho_reject_max": rho_max, "p99_max": p99_max, "reference_k": k,
                                      "threshold_h": h, "alpha_cap": cap}}
    if m == 0:
        out.update({"rho_hat": None, "p99": None, "s_max": None, "R": 0, "A": 0})
        return out
    big_r = sum(rr)
    big_a = sum(x + 1 for x in rr)
    rho = big_r / big_a
    srt = sorted(rr)
    q = srt[max(1, math.ceil(0.99 * m)) - 1]
    s = 0.0
    smax = 0.0
    for a, x in zip(alphas, rr):
        e = (1.0 - a) / a
        v = (1.0 - a) / (a * a)
        z = 0.0 if v == 0.0 else (x - e) / math.sqrt(v)  # alpha~ == 1 => V = 0: z := 0 (§2.6 decision)
        s = max(0.0, s + z - k)
        smax = max(smax, s)
    out.update({"rho_hat": rho, "p99": q, "s_max": smax, "R": big_r, "A": big_a})
    if rho > rho_max:
        out["breaches"].append("rho")
    if q > p99_max:
        out["breaches"].append("p99")
    if not smax < h:
        out["breaches"].append("cusum")
    return out


def normalise_s2_policy(doc: dict) -> dict:
    """Accept the runbook-era (`corridors{rho_reject_max,p99_max}`, `cusum{reference_k,threshold_h}`) and
    HEAD (`cusum{reference_k,threshold_h,alpha_cap}`) shapes (1A-S1-S4 §2.2, §6 C5); spec constants
    rho <= 0.06 and p99 <= 3 apply unless `corridors` overrides them."""
    doc = doc or {}
    cor = doc.get("corridors") or {}
    cus = doc.get("cusum") or {}
    if "reference_k" not in cus or "threshold_h" not in cus:
        raise EngineError("ERR_S2_CORRIDOR_POLICY_MISSING", "s2_validation_policy lacks cusum.reference_k / threshold_h")
    out = {"rho_reject_max": float(cor.get("rho_reject_max", 0.06)), "p99_max": float(cor.get("p99_max", 3)),
           "cusum": {"reference_k": float(cus["reference_k"]), "threshold_h": float(cus["threshold_h"])}}
    if "alpha_cap" in cus:
        out["cusum"]["alpha_cap"] = float(cus["alpha_cap"])
    return out


def check_s2_corridors(nb_final: pd.DataFrame, policy: dict, fails: Failures, corridor_fn=None) -> dict | None:
    """Corridor gate over the coverage-clean nb_final population; breach => ``corridor_breach``."""
    if len(nb_final) == 0 or not {"mu", "dispersion_k", "nb_rejections"} <= set(nb_final.columns):
        fails.add("corridor_breach", "ERR_S2_CORRIDOR_EMPTY: no nb_final population for the S2 corridors", [])
        return None
    nb = _sorted_frame(nb_final.drop_duplicates(subset=["merchant_id"], keep=False), ["merchant_id"])
    mu = nb["mu"].to_numpy(dtype=np.float64)
    phi = nb["dispersion_k"].to_numpy(dtype=np.float64)
    r = nb["nb_rejections"].to_numpy().astype(np.int64)
    fn = corridor_fn or s2_corridor_metrics
    met = fn(mu, phi, r, policy)
    for i in met.get("alpha_invalid", []):
        fails.add("corridor_breach", "ERR_S2_CORRIDOR_ALPHA_INVALID: acceptance alpha not finite in (0,1]",
                  [{"merchant_id": nb["merchant_id"].iloc[i], "mu": mu[i], "dispersion_k": phi[i]}],
                  merchants=[nb["merchant_id"].iloc[i]])
    if met.get("M", 0) == 0:
        fails.add("corridor_breach", "ERR_S2_CORRIDOR_EMPTY: no merchant with a valid acceptance alpha", [])
    for b in met.get("breaches", []):
        fails.add("corridor_breach", f"corridor_breach:{b}", [{k: met.get(k) for k in
                                                              ("rho_hat", "p99", "s_max", "M", "R", "A", "policy")}])
    return met


# ---------------------------------------------------------------------------- S3


def check_s3(cand: pd.DataFrame, n_by_merchant: pd.DataFrame, home_by_merchant: pd.DataFrame | None,
             fails: Failures, counts: pd.DataFrame | None = None, seq: pd.DataFrame | None = None,
             universe: np.ndarray | None = None) -> None:
    """S3 (1A-S1-S4 §3.6): per merchant ranks contiguous 0..|C|-1 (E_S3_RANK_GAPS), exactly one home row at
    rank 0 equal to the merchant's home country (E_S3_HOME_NOT_ZERO); a candidate set for every merchant with
    an nb_final; optional integerised counts sum to N and site sequences are contiguous."""
    if len(cand) == 0:
        if len(n_by_merchant):
            fails.add("E_S3_HOME_NOT_ZERO", "s3_candidate_set is empty but multi-site merchants exist", [],
                      count=len(n_by_merchant))
        return
    c = _sorted_frame(cand, ["merchant_id", "candidate_rank", "country_iso"]).reset_index(drop=True)
    mid = c["merchant_id"].to_numpy()
    c["_pos"] = (_cumcount_sorted([mid]) if mid.dtype.kind in "ui" else
                 c.groupby("merchant_id", sort=False).cumcount().to_numpy())
    bad = c["candidate_rank"].to_numpy().astype(np.int64) != c["_pos"].to_numpy()
    fails.frame("E_S3_RANK_GAPS", "s3_candidate_set: candidate_rank not contiguous 0..|C|-1 per merchant",
                c.loc[bad, ["merchant_id", "country_iso", "candidate_rank"]], dataset_id="s3_candidate_set")
    is_home = c["is_home"].to_numpy().astype(bool)
    homes = c[is_home]
    nh = homes.groupby("merchant_id").size()
    per = pd.DataFrame({"merchant_id": _uniq(c["merchant_id"].to_numpy().astype(np.uint64))})
    per["n_home"] = per["merchant_id"].map(nh).fillna(0).astype(np.int64).to_numpy()
    fails.frame("E_S3_HOME_NOT_ZERO", "s3_candidate_set: merchant needs exactly one is_home row",
                per[per["n_home"].to_numpy() != 1], dataset_id="s3_candidate_set")
    badrank = homes[homes["candidate_rank"].to_numpy().astype(np.int64) != 0]
    fails.frame("E_S3_HOME_NOT_ZERO", "s3_candidate_set: home row must have candidate_rank 0",
                badrank[["merchant_id", "country_iso", "candidate_rank"]], dataset_id="s3_candidate_set")
    if home_by_merchant is not None and len(home_by_merchant):
        j = homes[["merchant_id", "country_iso"]].merge(home_by_merchant, on="merchant_id", how="inner")
        bad = j["country_iso"].astype(str).to_numpy() != j["home_country_iso"].astype(str).to_numpy()
        fails.frame("E_S3_HOME_NOT_ZERO", "s3_candidate_set: home row country != merchant home_country_iso", j[bad],
                    dataset_id="s3_candidate_set")
    need = n_by_merchant["merchant_id"].to_numpy().astype(np.uint64)
    missing = _setdiff(need, per["merchant_id"].to_numpy())
    if len(missing):
        fails.add("E_S3_HOME_NOT_ZERO", "merchants with nb_final but no s3_candidate_set rows",
                  [{"merchant_id": m} for m in missing[:MAX_ROWS]], count=len(missing), dataset_id="s3_candidate_set",
                  merchants=missing)
    # S3 here does not depend on N (its rule runs beside S1/S2), so single-site merchants may carry a candidate
    # set too (unused downstream: S4-S8 are scoped by hurdle/nb_final); merchants outside the run's universe may not
    if universe is not None:
        extra = _setdiff(per["merchant_id"].to_numpy(), np.asarray(universe, dtype=np.uint64))
        if len(extra):
            fails.add("E_S3_HOME_NOT_ZERO", "s3_candidate_set rows for merchants outside the run's merchant universe",
                      [{"merchant_id": m} for m in extra[:MAX_ROWS]], count=len(extra), dataset_id="s3_candidate_set",
                      merchants=extra)
    if counts is not None and len(counts):
        s = counts.groupby("merchant_id", sort=True)["count"].sum()
        j = n_by_merchant.copy()
        j["sum_count"] = j["merchant_id"].map(s)
        j = j[~j["sum_count"].isna()]
        bad = j["sum_count"].to_numpy().astype(np.int64) != j["n_outlets"].to_numpy()
        fails.frame("E_SUM_MISMATCH", "s3_integerised_counts: sum of count != N", j[bad], dataset_id="s3_integerised_counts")
        k = counts[["merchant_id", "country_iso"]].merge(c[["merchant_id", "country_iso"]], how="left", indicator=True)
        fails.frame("E_S3_RANK_GAPS", "s3_integerised_counts: country outside the candidate set",
                    k[k["_merge"].to_numpy() == "left_only"].drop(columns="_merge"), dataset_id="s3_integerised_counts")
    if seq is not None and len(seq):
        sq = _sorted_frame(seq, ["merchant_id", "country_iso", "site_order"]).reset_index(drop=True)
        pos = sq.groupby(["merchant_id", "country_iso"], sort=False).cumcount().to_numpy() + 1
        bad = sq["site_order"].to_numpy().astype(np.int64) != pos
        fails.frame("E_S8_SEQUENCE_GAP", "s3_site_sequence: site_order not contiguous 1..n",
                    sq.loc[bad, ["merchant_id", "country_iso", "site_order"]], dataset_id="s3_site_sequence")


# ---------------------------------------------------------------------------- S4


def check_s4(ztp_poisson: pd.DataFrame, rejections: pd.DataFrame, exhausted: pd.DataFrame, finals: pd.DataFrame,
             in_scope: np.ndarray, fails: Failures, *, max_attempts: int | None = None,
             exhaustion_policy: str | None = None) -> pd.DataFrame:
    """S4 (1A-S1-S4 §4.3-4.5, decision 18): exactly one ztp_final per in-scope (multi-site, nb_final,
    eligible) merchant unless aborted under policy ``abort``; attempts contiguous 1..a and counter-ordered;
    rejections exactly at the k == 0 attempts; the final's attempts / K_target agree with the attempts;
    A == 0 short-circuit has no attempts; exhaustion consistent with the policy; lambda_extra and regime
    constant. Returns merchant_id -> K_target."""
    in_scope = np.asarray(in_scope, dtype=np.uint64)
    fin = finals if len(finals) else pd.DataFrame({"merchant_id": np.zeros(0, np.uint64),
                                                   "K_target": np.zeros(0, np.int64)})
    exh = exhausted if len(exhausted) else pd.DataFrame({"merchant_id": np.zeros(0, np.uint64)})
    dup = fin[fin.duplicated(subset=["merchant_id"], keep=False)]
    fails.frame("E_S4_FINAL_CARDINALITY", "more than one ztp_final for a merchant", _envelope_rows(dup, ["K_target"]))
    have = _uniq(fin["merchant_id"].to_numpy().astype(np.uint64))
    aborted = _uniq(exh["merchant_id"].to_numpy().astype(np.uint64)) if len(exh) else np.zeros(0, np.uint64)
    missing = _setdiff(_setdiff(in_scope, have), aborted if exhaustion_policy == "abort" else np.zeros(0, np.uint64))
    if len(missing):
        fails.add("E_S4_FINAL_CARDINALITY", "in-scope (multi-site, eligible) merchants without a ztp_final",
                  [{"merchant_id": m} for m in missing[:MAX_ROWS]], count=len(missing), merchants=missing)
    extra = _setdiff(have, in_scope)
    if len(extra):
        fails.add("E_S4_FINAL_CARDINALITY", "ztp_final for a merchant outside S4 scope",
                  [{"merchant_id": m} for m in extra[:MAX_ROWS]], count=len(extra), merchants=extra)
    both = _intersect(have, aborted)
    f1 = fin.drop_duplicates(subset=["merchant_id"], keep=False)
    p = _attempt_index(ztp_poisson)
    if len(p):
        p["_a"] = p["_t"] + 1
        if "attempt" in p.columns:
            bad = p["attempt"].to_numpy().astype(np.int64) != p["_a"].to_numpy()
            fails.frame("E_S4_SEQUENCE_INVALID", "S4 poisson_component attempts not contiguous 1..a in counter order",
                        p.loc[bad, ["merchant_id", "attempt", "_a", "k"]])
    np_ = p.groupby("merchant_id").size() if len(p) else pd.Series(dtype=np.int64)
    last_k = p.groupby("merchant_id")["k"].last() if len(p) else pd.Series(dtype=np.int64)
    zeros_before_last = (p[p["_a"] < p.groupby("merchant_id")["_a"].transform("max")].assign(nz=lambda d: d["k"] != 0)
                         .groupby("merchant_id")["nz"].sum()) if len(p) else pd.Series(dtype=np.int64)
    f = f1.copy()
    if len(f):
        f["n_att"] = f["merchant_id"].map(np_).fillna(0).astype(np.int64).to_numpy()
        f["last_k"] = f["merchant_id"].map(last_k).fillna(-1).astype(np.int64).to_numpy()
        f["nz_before"] = f["merchant_id"].map(zeros_before_last).fillna(0).astype(np.int64).to_numpy()
        kt = f["K_target"].to_numpy().astype(np.int64)
        att = f["attempts"].to_numpy().astype(np.int64) if "attempts" in f.columns else f["n_att"].to_numpy()
        exhausted_flag = f["exhausted"].fillna(False).to_numpy().astype(bool) if "exhausted" in f.columns else \
            np.zeros(len(f), bool)
        bad = att != f["n_att"].to_numpy()
        bad |= f["nz_before"].to_numpy() != 0
        acc = (~exhausted_flag) & (att > 0)
        bad |= acc & ((f["last_k"].to_numpy() < 1) | (kt != f["last_k"].to_numpy()))
        bad |= (att == 0) & (kt != 0)
        bad |= exhausted_flag & ((kt != 0) | (f["last_k"].to_numpy() != 0))
        fails.frame("E_S4_SEQUENCE_INVALID", "ztp_final inconsistent with its attempts (attempts == #poisson, zeros "
                    "before the last attempt, K_target == last k >= 1, A == 0 => K_target 0)",
                    f.loc[bad, [c for c in ("merchant_id", "K_target", "attempts", "n_att", "last_k", "exhausted")
                                if c in f.columns]])
        if max_attempts is not None:
            pol = exhausted_flag & ((att != max_attempts) | (exhaustion_policy not in (None, "downgrade_domestic")))
            fails.frame("E_S4_POLICY_VIOLATION", f"ztp_final exhausted=true needs attempts == MAX_ZTP_ZERO_ATTEMPTS "
                        f"({max_attempts}) and policy downgrade_domestic", f[pol][["merchant_id", "attempts"]])
        if "regime" in f.columns and "lambda_extra" in f.columns:
            lam = f["lambda_extra"].to_numpy(dtype=np.float64)
            want = np.where(lam < 10.0, "inversion", "ptrs")
            bad = f["regime"].astype(str).to_numpy() != want
            fails.frame("E_S4_POLICY_VIOLATION", "ztp_final regime != (lambda_extra < 10 ? inversion : ptrs)",
                        f.loc[bad, ["merchant_id", "lambda_extra", "regime"]])
        # lambda constant on every S4 row of a merchant
        if len(p) and "lambda" in p.columns and "lambda_extra" in f.columns:
            j = p[["merchant_id", "lambda"]].merge(f[["merchant_id", "lambda_extra"]], on="merchant_id")
            bad = j["lambda"].to_numpy(dtype=np.float64).view(np.uint64) != j["lambda_extra"].to_numpy(
                dtype=np.float64).view(np.uint64)
            fails.frame("E_S4_SEQUENCE_INVALID", "S4 poisson_component lambda != ztp_final lambda_extra", j[bad])
    # ztp_rejection rows correspond 1:1 to the k == 0 attempts
    if len(p):
        zero_att = p.loc[p["k"].to_numpy() == 0, ["merchant_id", "_a"]].rename(columns={"_a": "attempt"})
    else:
        zero_att = pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "attempt": np.zeros(0, np.int64)})
    rj = rejections[["merchant_id", "attempt"]].copy() if len(rejections) else zero_att.iloc[0:0]
    if len(rj) or len(zero_att):
        rj["attempt"] = rj["attempt"].astype(np.int64)
        zero_att["attempt"] = zero_att["attempt"].astype(np.int64)
        m = rj.merge(zero_att, how="outer", on=["merchant_id", "attempt"], indicator=True)
        fails.frame("E_S4_SEQUENCE_INVALID", "ztp_rejection rows must match the k == 0 poisson attempts 1:1",
                    m[m["_merge"].to_numpy() != "both"].rename(columns={"_merge": "side"}).astype({"side": str}))
    # exhausted marker (decision 18: always written when the cap is hit) <=> all MAX attempts were zero
    if max_attempts is not None and len(p):
        allzero = p.assign(_nz=(p["k"].to_numpy() != 0).astype(np.int64)).groupby("merchant_id").agg(
            n=("k", "size"), nz=("_nz", "sum"))
        capped = allzero[(allzero["n"] == max_attempts) & (allzero["nz"] == 0)].index.to_numpy().astype(np.uint64)
        mism = _setxor(capped, aborted)
        if len(mism):
            fails.add("E_S4_POLICY_VIOLATION", "ztp_retry_exhausted must be written exactly when MAX_ZTP_ZERO_ATTEMPTS "
                      "zeros occurred (decision 18)", [{"merchant_id": m} for m in mism[:MAX_ROWS]], count=len(mism),
                      merchants=mism)
    if exhaustion_policy == "abort" and len(both):
        fails.add("E_S4_POLICY_VIOLATION", "policy abort: an exhausted merchant must have no ztp_final",
                  [{"merchant_id": m} for m in both[:MAX_ROWS]], count=len(both), merchants=both)
    out = f1[["merchant_id", "K_target"]].copy()
    out["merchant_id"] = out["merchant_id"].astype(np.uint64)
    out["K_target"] = out["K_target"].astype(np.int64)
    return out


# ---------------------------------------------------------------------------- S6


def check_s6(gumbel: pd.DataFrame, k_target: pd.DataFrame, cand: pd.DataFrame, fails: Failures, *,
             membership: pd.DataFrame | None = None, log_all_candidates: bool = True,
             replay: dict | None = None) -> pd.DataFrame:
    """S6 (1A-S5-S9 §3.4, §6.2): gumbel events only for merchants with K_target > 0; one per (merchant, ISO);
    candidates are S3 foreigns; zero weight never selected (key null iff weight 0); #selected ==
    min(K_target, #eligible) when every candidate is logged (else <= K_target); selection_order 1..K in key
    order; the membership surface (if any) equals the selected events. Returns the membership frame
    (merchant_id, country_iso) derived from the authority in use."""
    g = gumbel if len(gumbel) else pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "country_iso": np.zeros(0, object),
                                                 "selected": np.zeros(0, bool), "weight": np.zeros(0)})
    kt = k_target.set_index("merchant_id")["K_target"] if len(k_target) else pd.Series(dtype=np.int64)
    if len(g):
        gm = g["merchant_id"].to_numpy().astype(np.uint64)
        kk = g["merchant_id"].map(kt)
        bad = kk.isna().to_numpy() | (kk.fillna(0).to_numpy() <= 0)
        fails.frame("E_S6_MEMBERSHIP_MISMATCH", "gumbel_key for a merchant without ztp_final K_target > 0",
                    _envelope_rows(g[bad]))
        dup = g[g.duplicated(subset=["merchant_id", "country_iso"], keep=False)]
        fails.frame("E_DUP_PK", "gumbel_key: more than one event per (merchant, country)", _envelope_rows(dup),
                    dataset_id="rng_event_gumbel_key")
        cand = _restrict(cand, g, *(() if membership is None else (membership,)))
        foreign = cand.loc[~cand["is_home"].to_numpy().astype(bool), ["merchant_id", "country_iso"]]
        j = g[["merchant_id", "country_iso"]].merge(foreign, how="left", indicator=True)
        fails.frame("E_S6_MEMBERSHIP_MISMATCH", "gumbel_key candidate is not an S3 foreign candidate of the merchant",
                    j[j["_merge"].to_numpy() == "left_only"].drop(columns="_merge"))
        sel = g["selected"].to_numpy().astype(bool)
        w = g["weight"].to_numpy(dtype=np.float64) if "weight" in g.columns else np.ones(len(g))
        keynull = _is_null_series(g["key"]) if "key" in g.columns else np.zeros(len(g), bool)
        fails.frame("E_S6_ZERO_WEIGHT_SELECTED", "a zero-weight candidate was selected",
                    g.loc[sel & (w == 0.0), ["merchant_id", "country_iso", "weight", "selected"]])
        fails.frame("E_S6_MEMBERSHIP_MISMATCH", "gumbel_key: key must be null iff weight == 0",
                    g.loc[keynull != (w == 0.0), [c for c in ("merchant_id", "country_iso", "weight", "key")
                                                   if c in g.columns]])
        # selection_order present iff selected, contiguous 1..K in (key desc, candidate_rank asc, ISO asc) order
        so = g["selection_order"] if "selection_order" in g.columns else pd.Series([None] * len(g))
        son = _is_null_series(so)
        fails.frame("E_S6_MEMBERSHIP_MISMATCH", "gumbel_key: selection_order present iff selected",
                    g.loc[son == sel, ["merchant_id", "country_iso", "selected"]])
        gg = g.copy()
        gg["_w"] = w
        gg["_key"] = np.where(keynull, -np.inf, pd.to_numeric(g["key"], errors="coerce").to_numpy(dtype=np.float64)) \
            if "key" in g.columns else 0.0
        gg = gg.merge(cand[["merchant_id", "country_iso", "candidate_rank"]], how="left", on=["merchant_id", "country_iso"])
        gg["_rank"] = gg["candidate_rank"].fillna(1 << 30).astype(np.int64)
        gg["_elig"] = gg["_w"].to_numpy() > 0.0
        gg = _sorted_frame(gg, ["merchant_id", "_elig", "_key", "_rank", "country_iso"],
                           [True, False, False, True, True]).reset_index(drop=True)
        gg["_pos"] = gg.groupby("merchant_id", sort=False).cumcount().to_numpy() + 1
        per = gg.groupby("merchant_id", sort=True).agg(n_sel=("selected", "sum"), n_elig=("_elig", "sum"))
        per["K_target"] = per.index.map(kt).fillna(0).astype(np.int64)
        want = np.minimum(per["K_target"].to_numpy(), per["n_elig"].to_numpy())
        bad = (per["n_sel"].to_numpy() != want) if log_all_candidates else (per["n_sel"].to_numpy() > per["K_target"].to_numpy())
        fails.frame("E_S6_MEMBERSHIP_MISMATCH", "#selected != min(K_target, #eligible)" if log_all_candidates
                    else "#selected > K_target", per[bad].reset_index())
        if log_all_candidates:
            s = gg["selected"].to_numpy().astype(bool)
            kq = gg["merchant_id"].map(per["n_sel"]).to_numpy().astype(np.int64)
            bad = s != (gg["_pos"].to_numpy() <= kq)
            if "selection_order" in gg.columns:
                sov = pd.to_numeric(gg["selection_order"], errors="coerce").fillna(0).to_numpy().astype(np.int64)
                bad |= s & (sov != gg["_pos"].to_numpy())
            fails.frame("E_S6_MEMBERSHIP_MISMATCH", "selected set / selection_order != top-K by (key desc, "
                        "candidate_rank asc, ISO asc)", gg.loc[bad, [c for c in ("merchant_id", "country_iso", "_key",
                                                                               "selected", "selection_order")
                                                                      if c in gg.columns]])
        if replay is not None:
            cnt = (g["rng_counter_before_hi"].to_numpy().astype(np.uint64) != replay["before_hi"]) | (
                g["rng_counter_before_lo"].to_numpy().astype(np.uint64) != replay["before_lo"])
            fails.frame("E_RNG_COUNTER_MISMATCH", "gumbel_key: before counter != base counter of the (merchant, ISO) "
                        "gumbel_key substream", _envelope_rows(g[cnt]))
            u = pd.to_numeric(g["u"], errors="coerce").to_numpy(dtype=np.float64)
            bad = u.view(np.uint64) != np.asarray(replay["u"], dtype=np.float64).view(np.uint64)
            rows = g.loc[bad, ["merchant_id", "country_iso", "u"]].copy()
            rows["u_replayed"] = np.asarray(replay["u"])[bad]
            fails.frame("E_S6_REPLAY_MISMATCH", "gumbel_key u does not replay bit-for-bit from Philox2x64-10", rows)
            oob = ~((u > 0.0) & (u < 1.0))
            fails.frame("E_S6_REPLAY_MISMATCH", "gumbel_key u outside (0,1)", g.loc[oob, ["merchant_id", "country_iso", "u"]])
    selected = g.loc[g["selected"].to_numpy().astype(bool), ["merchant_id", "country_iso"]].copy() if len(g) else \
        pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "country_iso": np.zeros(0, object)})
    if membership is not None:
        mem = membership[["merchant_id", "country_iso"]]
        j = mem.merge(selected, how="outer", indicator=True)
        fails.frame("E_S6_MEMBERSHIP_MISMATCH", "s6_membership != gumbel_key selected=true events",
                    j[j["_merge"].to_numpy() != "both"].rename(columns={"_merge": "side"}).astype({"side": str}),
                    dataset_id="s6_membership")
        foreign = _restrict(cand, mem)
        foreign = foreign.loc[~foreign["is_home"].to_numpy().astype(bool), ["merchant_id", "country_iso"]]
        k = mem.merge(foreign, how="left", indicator=True)
        fails.frame("E_S6_MEMBERSHIP_MISMATCH", "s6_membership country is not an S3 foreign candidate",
                    k[k["_merge"].to_numpy() == "left_only"].drop(columns="_merge"), dataset_id="s6_membership")
        return mem.copy()
    return selected


# ---------------------------------------------------------------------------- S7 / S8


def check_catalogue(cat: pd.DataFrame, fails: Failures) -> pd.DataFrame:
    """Egress structure (1A-S5-S9 §5.2, §6.2): writer sort strictly increasing (E_WRITER_SORT_BROKEN; equal
    keys E_DUP_PK) within and across files (rows are given in file order), per block site_order 1..n,
    site_id == zfill6(site_order), final_country_outlet_count == n (E_S8_SEQUENCE_GAP); per merchant
    raw_nb_outlet_draw, home_country_iso and single_vs_multi_flag constant. Returns the block frame
    (merchant_id, legal_country_iso, n, raw, home, flag)."""
    if len(cat) == 0:
        return pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "legal_country_iso": np.zeros(0, object), "n": np.zeros(0, np.int64)})
    m = cat["merchant_id"].to_numpy().astype(np.uint64)
    c = _iso_arr(cat["legal_country_iso"].to_numpy()).astype(str)
    s = cat["site_order"].to_numpy().astype(np.int64)
    if len(cat) > 1:
        lt = (m[:-1] < m[1:]) | ((m[:-1] == m[1:]) & ((c[:-1] < c[1:]) | ((c[:-1] == c[1:]) & (s[:-1] < s[1:]))))
        eq = (m[:-1] == m[1:]) & (c[:-1] == c[1:]) & (s[:-1] == s[1:])
        brk = np.flatnonzero(~lt & ~eq)
        if len(brk):
            fails.add("E_WRITER_SORT_BROKEN", "outlet_catalogue rows not in writer sort [merchant_id, "
                      "legal_country_iso, site_order] (within and across files)",
                      [{"row": int(i + 1), "prev": [m[i], c[i], s[i]], "this": [m[i + 1], c[i + 1], s[i + 1]]}
                       for i in brk[:MAX_ROWS]], count=len(brk), dataset_id="outlet_catalogue", merchants=m[brk + 1])
        dup = np.flatnonzero(eq)
        if len(dup):
            fails.add("E_DUP_PK", "outlet_catalogue duplicate (merchant_id, legal_country_iso, site_order)",
                      [[m[i], c[i], s[i]] for i in dup[:MAX_ROWS]], count=len(dup), dataset_id="outlet_catalogue",
                      merchants=m[dup])
    d = cat.copy()
    d["legal_country_iso"] = c
    d["merchant_id"] = m
    d = _sorted_frame(d, ["merchant_id", "legal_country_iso", "site_order"]).reset_index(drop=True)
    ck = _order_key(d["legal_country_iso"])
    if ck is not None:  # sorted: blocks are contiguous runs of (merchant_id, legal_country_iso)
        pos = _cumcount_sorted([d["merchant_id"].to_numpy(), ck])
        size = np.diff(np.append(np.flatnonzero(pos == 0), len(d)))
        d["_pos"] = pos + 1
        d["_n"] = np.repeat(size, size)
    else:
        grp = d.groupby(["merchant_id", "legal_country_iso"], sort=False)
        d["_pos"] = grp.cumcount().to_numpy() + 1
        d["_n"] = grp["site_order"].transform("size").to_numpy()
    so = d["site_order"].to_numpy().astype(np.int64)
    bad = so != d["_pos"].to_numpy()
    bad |= d["final_country_outlet_count"].to_numpy().astype(np.int64) != d["_n"].to_numpy()
    bad |= np.asarray(d["site_id"].astype(str).to_numpy(), dtype=str) != _zfill6(so)
    fails.frame("E_S8_SEQUENCE_GAP", "outlet_catalogue block: site_order must be 1..n, site_id zfill6(site_order), "
                "final_country_outlet_count == n", d.loc[bad, ["merchant_id", "legal_country_iso", "site_order",
                                                               "site_id", "final_country_outlet_count"]],
                dataset_id="outlet_catalogue")
    for col in ("raw_nb_outlet_draw", "home_country_iso", "single_vs_multi_flag"):
        nun = d.groupby("merchant_id", sort=True)[col].nunique()
        badm = nun[nun > 1]
        if len(badm):
            fails.add("E_SUM_MISMATCH" if col == "raw_nb_outlet_draw" else "E_ORDER_AUTHORITY_DRIFT",
                      f"outlet_catalogue: {col} not constant per merchant",
                      [{"merchant_id": i} for i in badm.index[:MAX_ROWS]], count=len(badm), dataset_id="outlet_catalogue",
                      merchants=badm.index.to_numpy())
    blocks = d.groupby(["merchant_id", "legal_country_iso"], sort=True).agg(
        n=("site_order", "size"), raw=("raw_nb_outlet_draw", "first"), home=("home_country_iso", "first"),
        flag=("single_vs_multi_flag", "first")).reset_index()
    blocks["merchant_id"] = blocks["merchant_id"].astype(np.uint64)
    over = blocks[blocks["n"].to_numpy() > MAX_SEQ]
    fails.frame("E_SITE_ID_OVERFLOW", f"outlet_catalogue block with more than {MAX_SEQ} sites", over,
                dataset_id="outlet_catalogue")
    return blocks


def check_conservation(blocks: pd.DataFrame, multi: pd.DataFrame, n_by_merchant: pd.DataFrame,
                       home_by_merchant: pd.DataFrame | None, cand: pd.DataFrame, fails: Failures, *,
                       tolerated_absent: np.ndarray | None = None) -> None:
    """Per merchant (1A-S5-S9 §6.2 S8 row, decisions 6 and 19): multi-site — catalogue counts sum to
    nb_final.n_outlets, raw_nb_outlet_draw == N, flag true, home == S3 rank 0, countries within S3;
    single-site — exactly one row in the home country, raw_nb_outlet_draw = 1, flag false."""
    per = blocks.groupby("merchant_id", sort=True).agg(total=("n", "sum"), raw=("raw", "first"), home=("home", "first"),
                                                       flag=("flag", "first"), nblocks=("n", "size")).reset_index()
    per["merchant_id"] = per["merchant_id"].astype(np.uint64)
    mm = multi[["merchant_id", "is_multi"]]
    j = per.merge(mm, on="merchant_id", how="left", indicator=True)
    unknown = j[j["_merge"].to_numpy() == "left_only"]
    fails.frame("E_SUM_MISMATCH", "outlet_catalogue merchant has no hurdle decision (outside the merchant universe)",
                unknown[["merchant_id", "total"]], dataset_id="outlet_catalogue")
    j = j[j["_merge"].to_numpy() == "both"].drop(columns="_merge")
    ism = j["is_multi"].to_numpy().astype(bool)
    flag = j["flag"].to_numpy().astype(bool)
    fails.frame("E_SUM_MISMATCH", "single_vs_multi_flag != hurdle is_multi", j.loc[flag != ism, ["merchant_id", "flag",
                                                                                                "is_multi"]],
                dataset_id="outlet_catalogue")
    # single-site (decision 19): exactly one row, raw 1, home country
    single = j[~ism]
    bad = (single["total"].to_numpy() != 1) | (single["raw"].to_numpy().astype(np.int64) != 1) | (
        single["nblocks"].to_numpy() != 1)
    fails.frame("E_SUM_MISMATCH", "single-site merchant must have exactly one catalogue row with "
                "raw_nb_outlet_draw = 1 (decision 19)", single[bad], dataset_id="outlet_catalogue")
    sb = blocks.merge(single[["merchant_id"]], on="merchant_id")
    badh = sb["legal_country_iso"].astype(str).to_numpy() != sb["home"].astype(str).to_numpy()
    fails.frame("E_ORDER_AUTHORITY_DRIFT", "single-site row must be in the home country", sb[badh],
                dataset_id="outlet_catalogue")
    if home_by_merchant is not None and len(home_by_merchant):
        k = per[["merchant_id", "home"]].merge(home_by_merchant, on="merchant_id", how="inner")
        bad = k["home"].astype(str).to_numpy() != k["home_country_iso"].astype(str).to_numpy()
        fails.frame("E_ORDER_AUTHORITY_DRIFT", "outlet_catalogue home_country_iso != merchant home country", k[bad],
                    dataset_id="outlet_catalogue")
    # single-site merchants without a row
    singles_all = multi.loc[~multi["is_multi"].to_numpy().astype(bool), "merchant_id"].to_numpy().astype(np.uint64)
    miss = _setdiff(singles_all, per["merchant_id"].to_numpy())
    if len(miss):
        fails.add("E_SUM_MISMATCH", "single-site merchants missing from outlet_catalogue (decision 6)",
                  [{"merchant_id": x} for x in miss[:MAX_ROWS]], count=len(miss), dataset_id="outlet_catalogue",
                  merchants=miss)
    # multi-site: sum == N == raw
    multi_rows = j[ism].merge(n_by_merchant, on="merchant_id", how="left")
    nn = multi_rows["n_outlets"]
    has_n = ~nn.isna().to_numpy()
    mr = multi_rows[has_n]
    bad = (mr["total"].to_numpy() != mr["n_outlets"].to_numpy().astype(np.int64)) | (
        mr["raw"].to_numpy().astype(np.int64) != mr["n_outlets"].to_numpy().astype(np.int64))
    fails.frame("E_SUM_MISMATCH", "multi-site merchant: sum of country counts and raw_nb_outlet_draw must equal "
                "nb_final.n_outlets", mr[bad][["merchant_id", "total", "raw", "n_outlets"]], dataset_id="outlet_catalogue")
    absent = _setdiff(n_by_merchant["merchant_id"].to_numpy().astype(np.uint64), per["merchant_id"].to_numpy())
    if tolerated_absent is not None:
        absent = _setdiff(absent, np.asarray(tolerated_absent, dtype=np.uint64))
    if len(absent):
        fails.add("E_SUM_MISMATCH", "multi-site merchants with nb_final missing from outlet_catalogue",
                  [{"merchant_id": x} for x in absent[:MAX_ROWS]], count=len(absent), dataset_id="outlet_catalogue",
                  merchants=absent)
    # home == S3 rank 0 and legal countries within the candidate set
    if len(cand):
        home0 = cand.loc[cand["is_home"].to_numpy().astype(bool), ["merchant_id", "country_iso"]].rename(
            columns={"country_iso": "s3_home"})
        k = per[["merchant_id", "home"]].merge(home0, on="merchant_id", how="inner")
        bad = k["home"].astype(str).to_numpy() != k["s3_home"].astype(str).to_numpy()
        fails.frame("E_ORDER_AUTHORITY_DRIFT", "outlet_catalogue home_country_iso != S3 candidate_rank 0 country", k[bad],
                    dataset_id="outlet_catalogue")
        mb = blocks.merge(j.loc[ism, ["merchant_id"]], on="merchant_id")
        x = mb[["merchant_id", "legal_country_iso"]].merge(
            _restrict(cand, mb)[["merchant_id", "country_iso"]].rename(columns={"country_iso": "legal_country_iso"}),
            how="left", indicator=True)
        fails.frame("E_S7_PARITY", "outlet_catalogue country outside the merchant's S3 candidate set",
                    x[x["_merge"].to_numpy() == "left_only"].drop(columns="_merge"), dataset_id="outlet_catalogue")


def check_s7(blocks: pd.DataFrame, n_by_merchant: pd.DataFrame, k_target: pd.DataFrame, membership: pd.DataFrame,
             cand: pd.DataFrame, residual: pd.DataFrame, fails: Failures, *, allocation: pd.DataFrame | None = None,
             aborted: np.ndarray | None = None) -> None:
    """S7 parity (1A-S5-S9 §4.2, §6.2): for merchants with ztp_final, D = home ∪ members; egress countries ⊆ D;
    one residual_rank per country of D, ranks 1..|D| in (residual desc, ISO asc) order; merchants without a
    ztp_final (ineligible) are {home: N}. The S7 hand-off (``allocation``), when present, agrees with the
    egress counts (zero counts have no rows)."""
    if len(cand) == 0:
        return
    home = cand.loc[cand["is_home"].to_numpy().astype(bool), ["merchant_id", "country_iso"]]
    multi_n = n_by_merchant[["merchant_id"]].copy()
    kt_ids = k_target["merchant_id"].to_numpy().astype(np.uint64) if len(k_target) else np.zeros(0, np.uint64)
    # domain D per merchant with a ztp_final
    mem = membership[["merchant_id", "country_iso"]] if len(membership) else home.iloc[0:0]
    dom = pd.concat([home[_isin(home["merchant_id"].to_numpy().astype(np.uint64), kt_ids)], mem], ignore_index=True)
    dom = dom.drop_duplicates().reset_index(drop=True)
    # egress blocks ⊆ D (eligible) or == {home} (ineligible)
    b = blocks[_isin(blocks["merchant_id"].to_numpy().astype(np.uint64),
                       multi_n["merchant_id"].to_numpy().astype(np.uint64))][["merchant_id", "legal_country_iso", "n"]]
    be = b[_isin(b["merchant_id"].to_numpy().astype(np.uint64), kt_ids)]
    x = be.rename(columns={"legal_country_iso": "country_iso"}).merge(dom, how="left", indicator=True)
    fails.frame("E_S7_PARITY", "egress country outside D = home ∪ S6 members", x[x["_merge"].to_numpy() == "left_only"]
                .drop(columns="_merge"), dataset_id="outlet_catalogue")
    bi = b[~_isin(b["merchant_id"].to_numpy().astype(np.uint64), kt_ids)]
    y = bi.rename(columns={"legal_country_iso": "country_iso"}).merge(home, how="left", indicator=True)
    fails.frame("E_S7_PARITY", "merchant without ztp_final (ineligible) must be domestic-only {home: N}",
                y[y["_merge"].to_numpy() == "left_only"].drop(columns="_merge"), dataset_id="outlet_catalogue")
    # residual_rank coverage == D, ranks 1..|D| in (residual desc, ISO asc)
    r = residual if len(residual) else pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "country_iso": np.zeros(0, object),
                                                      "residual": np.zeros(0), "residual_rank": np.zeros(0, np.int64)})
    dup = r[r.duplicated(subset=["merchant_id", "country_iso"], keep=False)]
    fails.frame("E_S7_PARITY", "more than one residual_rank per (merchant, country)", _envelope_rows(dup))
    rr = r.drop_duplicates(subset=["merchant_id", "country_iso"])[["merchant_id", "country_iso", "residual",
                                                                    "residual_rank"]]
    # merchants without ztp_final may carry a residual_rank for home only (S7 scope choice, ⚑18)
    rin = rr[_isin(rr["merchant_id"].to_numpy().astype(np.uint64), kt_ids)]
    rout = rr[~_isin(rr["merchant_id"].to_numpy().astype(np.uint64), kt_ids)]
    z = rout.merge(home, how="left", indicator=True)
    fails.frame("E_S7_PARITY", "residual_rank for a merchant without ztp_final outside {home}",
                z[z["_merge"].to_numpy() == "left_only"].drop(columns="_merge"))
    dd = dom[~_isin(dom["merchant_id"].to_numpy().astype(np.uint64),
                      np.asarray(aborted if aborted is not None else [], dtype=np.uint64))]
    w = dd.merge(rin, how="outer", on=["merchant_id", "country_iso"], indicator=True)
    fails.frame("E_S7_PARITY", "residual_rank events must cover exactly D = home ∪ members (one per country)",
                w[w["_merge"].to_numpy() != "both"][["merchant_id", "country_iso", "_merge"]].rename(
                    columns={"_merge": "side"}).astype({"side": str}))
    rk = pd.concat([rin, rout], ignore_index=True)
    if len(rk):
        rk = rk.copy()
        rk["_res"] = pd.to_numeric(rk["residual"], errors="coerce").to_numpy(dtype=np.float64)
        rk["country_iso"] = rk["country_iso"].astype(str)
        rk = _sorted_frame(rk, ["merchant_id", "_res", "country_iso"], [True, False, True]).reset_index(drop=True)
        rk["_pos"] = rk.groupby("merchant_id", sort=False).cumcount().to_numpy() + 1
        bad = rk["residual_rank"].to_numpy().astype(np.int64) != rk["_pos"].to_numpy()
        fails.frame("E_S7_PARITY", "residual_rank must be 1..|D| in (residual desc, ISO asc) order",
                    rk.loc[bad, ["merchant_id", "country_iso", "residual", "residual_rank", "_pos"]])
    if allocation is not None and len(allocation):
        a = allocation[["merchant_id", "country_iso", "count"]].copy()
        a["count"] = a["count"].astype(np.int64)
        pos = a[a["count"].to_numpy() > 0]
        bb = blocks[["merchant_id", "legal_country_iso", "n"]].rename(columns={"legal_country_iso": "country_iso"})
        bb = bb[_isin(bb["merchant_id"].to_numpy().astype(np.uint64), a["merchant_id"].to_numpy().astype(np.uint64))]
        m = pos.merge(bb, how="outer", on=["merchant_id", "country_iso"], indicator=True)
        bad = (m["_merge"].to_numpy() != "both") | (m["count"].fillna(-1).to_numpy() != m["n"].fillna(-2).to_numpy())
        fails.frame("E_S7_PARITY", "s7_integer_allocation counts != outlet_catalogue block sizes (count 0 => no rows)",
                    m[bad].rename(columns={"_merge": "side"}).astype({"side": str}), dataset_id="s7_integer_allocation")
        s = a.groupby("merchant_id", sort=True)["count"].sum()
        nn = n_by_merchant.copy()
        nn["sum_count"] = nn["merchant_id"].map(s)
        nn = nn[~nn["sum_count"].isna()]
        bad = nn["sum_count"].to_numpy().astype(np.int64) != nn["n_outlets"].to_numpy().astype(np.int64)
        fails.frame("E_SUM_MISMATCH", "s7_integer_allocation: sum of counts != N", nn[bad], dataset_id="s7_integer_allocation")
        if "residual_rank" in a.columns or "residual_rank" in allocation.columns:
            q = allocation[["merchant_id", "country_iso", "residual_rank"]].merge(
                rr[["merchant_id", "country_iso", "residual_rank"]], on=["merchant_id", "country_iso"], how="inner",
                suffixes=("", "_event"))
            bad = q["residual_rank"].to_numpy().astype(np.int64) != q["residual_rank_event"].to_numpy().astype(np.int64)
            fails.frame("E_S7_PARITY", "s7_integer_allocation residual_rank != residual_rank event", q[bad],
                        dataset_id="s7_integer_allocation")


def check_s8_events(blocks: pd.DataFrame, finalize: pd.DataFrame, overflow: pd.DataFrame, fails: Failures,
                    multi_ids: np.ndarray | None = None) -> np.ndarray:
    """S8 evidence (1A-S5-S9 §5.2, §6.2): exactly one sequence_finalize per egress block with site_count == n, start "000001", end zfill6(n) (E_S8_BLOCK_ATOMICITY); by default every block
    (single-site ones too: decisions 6, 19 exempt singles from S2..S7 events only), ``multi_ids`` restricts the
    rule to multi-site merchants. An overflow event means zero egress rows for that merchant
    (E_OVERFLOW_POLICY_BREACH). Returns the merchants with a handled overflow."""
    fz = finalize if len(finalize) else pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "country_iso": np.zeros(0, object),
                                                      "site_count": np.zeros(0, np.int64)})
    b = blocks[["merchant_id", "legal_country_iso", "n"]].rename(columns={"legal_country_iso": "country_iso"})
    if multi_ids is not None:
        b = b[_isin(b["merchant_id"].to_numpy().astype(np.uint64), np.asarray(multi_ids, dtype=np.uint64))]
    cnt = fz.groupby(["merchant_id", "country_iso"], sort=True).size().rename("n_fin").reset_index()
    m = b.merge(cnt, how="outer", on=["merchant_id", "country_iso"])
    bad = m["n_fin"].fillna(0).to_numpy() != 1
    bad |= m["n"].isna().to_numpy()
    fails.frame("E_S8_BLOCK_ATOMICITY", "exactly one sequence_finalize per outlet_catalogue block", m[bad])
    if len(fz):
        k = fz.merge(b, on=["merchant_id", "country_iso"], how="inner")
        sc = k["site_count"].to_numpy().astype(np.int64)
        bad = sc != k["n"].to_numpy().astype(np.int64)
        if "start_sequence" in k.columns:
            bad |= k["start_sequence"].astype(str).to_numpy() != "000001"
        if "end_sequence" in k.columns:
            bad |= k["end_sequence"].astype(str).to_numpy() != _zfill6(k["n"].to_numpy())
        fails.frame("E_S8_BLOCK_ATOMICITY", "sequence_finalize site_count / start / end != block",
                    k.loc[bad, [c for c in ("merchant_id", "country_iso", "site_count", "start_sequence", "end_sequence",
                                            "n") if c in k.columns]])
    if overflow is None or len(overflow) == 0:
        return np.zeros(0, np.uint64)
    ov = _uniq(overflow["merchant_id"].to_numpy().astype(np.uint64))
    rows = blocks[_isin(blocks["merchant_id"].to_numpy().astype(np.uint64), ov)]
    fails.frame("E_OVERFLOW_POLICY_BREACH", "site_sequence_overflow merchant still has outlet_catalogue rows", rows,
                dataset_id="outlet_catalogue")
    return ov


# ---------------------------------------------------------------------------- structural


def check_pk(df: pd.DataFrame, pk: list[str], dataset_id: str, fails: Failures) -> None:
    if len(df) == 0 or not pk or not set(pk) <= set(df.columns):
        return
    dup = df[df.duplicated(subset=pk, keep=False)]
    fails.frame("E_DUP_PK", f"{dataset_id}: duplicate primary key {pk}", dup[pk], dataset_id=dataset_id)


def check_fk_iso(df: pd.DataFrame, iso: set[str], dataset_id: str, fails: Failures) -> None:
    for col in ("country_iso", "legal_country_iso", "home_country_iso"):
        if col not in df.columns or len(df) == 0:
            continue
        nn = ~_is_null_series(df[col])
        vals = np.where(nn, df[col].to_numpy(), "").astype("U")  # fixed-width unicode: np.isin sorts fast
        bad = nn & ~_isin(vals, np.asarray(sorted(iso), dtype="U"))
        cols = [c for c in ("merchant_id", col) if c in df.columns]
        fails.frame("E_FK_ISO_INVALID", f"{dataset_id}.{col} not in the ISO table", df.loc[bad, cols], dataset_id=dataset_id)


def check_embed(df: pd.DataFrame, tokens: dict[str, str], dataset_id: str, fails: Failures) -> None:
    """Path<->embed equality (00-core §2.3): each token in the partition path equals its embedded column(s)."""
    for tok, want in tokens.items():
        for col in EMBED_COLUMNS.get(tok, ()):
            if col in df.columns and len(df):
                vals = df[col].to_numpy()
                if vals.dtype.kind in "ui":  # str(v) != want, vectorised (decimal text of each integer)
                    bad = vals.astype(str) != str(want)
                elif isinstance(df[col].dtype, pd.StringDtype) and str(want) != "nan":  # missing -> "nan" != want
                    bad = (df[col] != str(want)).to_numpy(dtype=bool)
                else:
                    bad = np.asarray([str(v) != str(want) for v in vals], dtype=bool)
                fails.frame("E_PATH_EMBED_MISMATCH", f"{dataset_id}: column {col} != path token {tok}={want}",
                            df.loc[bad, [c for c in ("merchant_id", col) if c in df.columns]], dataset_id=dataset_id)


# ==================================================================================================
# Loading (the only part that touches files) and orchestration
# ==================================================================================================


# ---------------------------------------------------------------------------- streaming load + structural
#
# At 10^6 merchants S9 held every dataset and event family twice (Arrow + pandas) plus the trace, and
# rnglog.reconcile then re-read every log: ~7.5 GB peak. Now each dataset is read once, checked structurally
# in Arrow and cut down to the columns the replay checks below read; each event family is read once, checked
# (schema, envelope, rnglog's per-event and chain checks) and cut down the same way; the trace is checked from
# Arrow arrays. The fast paths only ever conclude "clean": whatever they cannot show clean is re-done by the
# original pandas code on the full data, so failures (codes, details, rows, order) are those of the plain code.

# columns of each dataset's frame that the checks after the structural ones read (a dataset not listed keeps
# every column)
FRAME_COLUMNS: dict[str, tuple[str, ...]] = {
    "hurdle_design_matrix": ("merchant_id", "home_country_iso"),
    "hurdle_pi_probs": ("merchant_id", "pi"),
    "crossborder_eligibility_flags": ("merchant_id", "is_eligible"),
    "crossborder_features": (),
    "merchant_abort_log": (),
    "s3_candidate_set": ("merchant_id", "country_iso", "candidate_rank", "is_home"),
    "ccy_country_weights_cache": (),
    "merchant_currency": (),
    "sparse_flag": (),
    "s6_membership": ("merchant_id", "country_iso"),
    "s7_integer_allocation": ("merchant_id", "country_iso", "count", "residual_rank"),
    "outlet_catalogue": ("merchant_id", "site_id", "home_country_iso", "legal_country_iso", "single_vs_multi_flag",
                         "raw_nb_outlet_draw", "final_country_outlet_count", "site_order"),
}
FK_COLUMNS = ("country_iso", "legal_country_iso", "home_country_iso")
# envelope tokens of an event row: compared with the run's in Arrow, not carried into the kept frame
EVENT_TOKEN_COLUMNS = ("seed", "parameter_hash", "run_id", "manifest_fingerprint")
# event string columns with a handful of distinct values: dictionary-encoded for the schema check
EVENT_DICT_COLUMNS = ("module", "substream_label", "parameter_hash", "manifest_fingerprint", "run_id", "context")
# check groups advanced on the progress line (log only)
PROGRESS_STEPS = ("datasets", "rng_trace", "rng_events", "reconcile", "s1", "s2", "s3", "s4", "s6", "s7_s8",
                  "lineage", "bundle")


@dataclass
class _Loaded:
    files: dict[str, list[Path]] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)
    docs: dict[str, Any] = field(default_factory=dict)
    events: dict[str, pd.DataFrame] = field(default_factory=dict)
    audit: list[dict] = field(default_factory=list)


def _dictionary(config):
    from engine.core import dictionary

    return dictionary.load(SEGMENT, config)


def _part_files(d: Path, allowed: Iterable[str] = ()) -> tuple[list[Path], list[Path]]:
    """(parquet part files in name order, stray files) of a partition dir. Names starting with '_' / '.'
    are ignored (00-core 2.2); the dictionary's fixed ``files`` (e.g. the S5 receipt) are allowed."""
    parts, stray = [], []
    if not d.is_dir():
        return parts, stray
    allowed = set(allowed)
    for p in sorted(d.iterdir(), key=lambda q: q.name.encode()):
        if p.name.startswith(("_", ".")) or p.name in allowed and not p.name.endswith(".parquet"):
            continue
        if p.is_file() and p.name.startswith("part-") and p.name.endswith(".parquet"):
            parts.append(p)
        else:
            stray.append(p)
    return parts, stray


def _read_parts(parts: list[Path]) -> pa.Table:
    import pyarrow.parquet as pq

    tables = [pq.ParquetFile(p).read() for p in parts]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _read_parts_dict(parts: list[Path], keep: set[str]) -> pa.Table:
    """``_read_parts`` with every string / list<string> column outside ``keep`` read dictionary-encoded: the
    64-hex lineage columns of s3_candidate_set alone are ~1 GB (and 2 s of regex) as plain strings at 10^6
    merchants; as dictionaries they are one value per row group."""
    import pyarrow.parquet as pq

    tables = []
    for p in parts:
        pf = pq.ParquetFile(p)
        leaves = [pf.schema.column(i) for i in range(len(pf.schema))]
        paths, nested = [], False
        for f in pf.schema_arrow:
            if f.name in keep:
                continue
            if _is_str(f.type) and any(c.path == f.name for c in leaves):
                paths.append(f.name)
            elif _is_list(f.type) and _is_str(f.type.value_type):
                sub = [c.path for c in leaves if c.path.startswith(f.name + ".")]
                if len(sub) == 1:
                    paths.append(sub[0])
                    nested = True
        if not paths:
            tables.append(pf.read())
            continue
        pf = pq.ParquetFile(p, read_dictionary=paths)
        if nested and pf.num_row_groups > 1:  # Arrow cannot return nested dictionaries as one chunked read
            tables.append(pa.concat_tables([pf.read_row_group(i) for i in range(pf.num_row_groups)]))
        else:
            tables.append(pf.read())
    if len(tables) > 1 and any(t.schema != tables[0].schema for t in tables[1:]):
        raise ValueError("parts differ in schema")  # the plain reader decides (promotion or failure)
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


class _Plain:
    """A dataset as the plain reader gives it (Arrow table, full pandas frame), built only when a fast
    structural check cannot show the dictionary-read table clean."""

    def __init__(self, parts: list[Path]):
        self.parts = parts
        self._t: pa.Table | None = None
        self._df: pd.DataFrame | None = None

    def table(self) -> pa.Table:
        if self._t is None:
            self._t = _read_parts(self.parts)
        return self._t

    def frame(self) -> pd.DataFrame:
        if self._df is None:
            self._df = _frame(self.table())
        return self._df


def _norm_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(t):
        return pa.string()
    if _is_list(t):
        return pa.list_(_norm_type(t.value_type))
    return t


def _dict_values(chunks: Iterable[pa.Array], value_type: pa.DataType) -> pa.Array:
    vals = [c.dictionary for c in chunks]
    return pa.concat_arrays(vals) if vals else pa.array([], value_type)


def _schema_clean(t: pa.Table, schema: dict) -> bool | None:
    """True when ``schema.validate_table`` certainly finds nothing in ``t`` once its dictionary columns are
    decoded: plain columns are validated as they are, a dictionary column through its distinct values (every
    value a row can hold). False: not shown clean (the caller validates the plain table). None: no
    dictionary column (validate ``t`` itself)."""
    from engine.core import schema as schema_mod

    names = t.column_names
    dcols = [c for c in names if pa.types.is_dictionary(t.schema.field(c).type) or (
        _is_list(t.schema.field(c).type) and pa.types.is_dictionary(t.schema.field(c).type.value_type))]
    if not dcols:
        return None
    props = schema.get("properties") or {}
    if len(set(names)) != len(names) or any(c not in props for c in dcols):
        return False
    sub = dict(schema)
    sub["properties"] = {k: v for k, v in props.items() if k not in dcols}
    sub["required"] = [r for r in schema.get("required") or [] if r not in dcols]
    if schema_mod.validate_table(t.drop_columns(dcols), sub):
        return False
    for c in dcols:
        col, prop = t[c], props[c]
        try:
            want = schema_mod.arrow_type(prop)
        except EngineError:
            return False
        if col.null_count:
            return False
        one = {"type": "object", "additionalProperties": False, "required": []}
        if pa.types.is_dictionary(col.type):
            if _norm_type(col.type.value_type) != _norm_type(want):
                return False
            vals = _dict_values(col.chunks, col.type.value_type)
            if schema_mod.validate_table(pa.table({c: vals}), {**one, "properties": {c: prop}}):
                return False
            continue
        # list<dictionary<string>>
        if not _is_list(want) or _norm_type(col.type.value_type.value_type) != _norm_type(want.value_type):
            return False
        if "enum" in prop or "const" in prop:
            return False
        lengths = pc.list_value_length(col)
        lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
        if lo is not None and (("minItems" in prop and lo < prop["minItems"]) or
                               ("maxItems" in prop and hi > prop["maxItems"])):
            return False
        items = prop.get("items") or {}
        if items:
            inner = [ch.values for ch in col.chunks]
            if any(x.null_count for x in inner):
                return False
            vals = _dict_values(inner, col.type.value_type.value_type)
            iprop = {**items, "x-arrow": "string"}  # the item type itself was compared just above
            if schema_mod.validate_table(pa.table({c: vals}), {**one, "properties": {c: iprop}}):
                return False
    return True


def _validate_dataset(t: pa.Table, sp: Path, plain: _Plain) -> list[str]:
    """schema.validate_table of the dataset as the plain reader gives it."""
    from engine.core import schema as schema_mod

    clean = _schema_clean(t, schema_mod.load_schema(sp))
    if clean:
        return []
    return schema_mod.validate_table(t if clean is None else plain.table(), sp)


def _all_equal(col: pa.ChunkedArray, want: str) -> bool:
    """Every row of ``col`` (no nulls) reads as the decimal / string ``want`` (check_embed's str(v) == want)."""
    if col.null_count:
        return False
    t = col.type
    if pa.types.is_dictionary(t):
        if not _is_str(t.value_type):
            return False
        return all(bool(pc.all(pc.equal(ch.dictionary, want)).as_py()) for ch in col.chunks if len(ch))
    if pa.types.is_integer(t):
        col = pc.cast(col, pa.string())
    elif not _is_str(t):
        return False
    return len(col) == 0 or bool(pc.all(pc.equal(col, want)).as_py())


def _embed_clean(t: pa.Table, tokens: dict[str, str]) -> bool:
    """check_embed would report nothing."""
    if t.num_rows == 0:
        return True
    return all(_all_equal(t[col], str(want)) for tok, want in tokens.items() for col in EMBED_COLUMNS.get(tok, ())
               if col in t.column_names)


def _key_array(col: pa.ChunkedArray) -> np.ndarray | None:
    """Integers whose equality is the column's value equality (no nulls), else None."""
    if col.null_count:
        return None
    if pa.types.is_integer(col.type):
        return np.asarray(col.to_numpy())
    if pa.types.is_boolean(col.type):
        return np.asarray(col.to_numpy(), dtype=np.uint8)
    if _is_str(col.type):
        return np.asarray(pc.dictionary_encode(col.combine_chunks()).indices.to_numpy())
    return None


def _pk_unique(t: pa.Table, pk: list[str]) -> bool:
    """No two rows share the primary key (check_pk would report nothing)."""
    n = t.num_rows
    if n < 2:
        return True
    keys = [_key_array(t[c]) for c in pk]
    if any(k is None for k in keys):
        return False
    first = keys[0]
    packed = None
    if len(keys) == 1 and first.dtype.kind in "ui":
        packed = first
    elif bool((first[1:] >= first[:-1]).all()):  # writer-sorted by its first key: pack (run, rest...) in int64
        packed = np.zeros(n, dtype=np.int64)
        packed[1:] = np.cumsum(first[1:] != first[:-1])
        cap = n
        for k in keys[1:]:
            if k.dtype == np.uint64 and len(k) and int(k.max()) >= 1 << 62:
                packed = None
                break
            k = k.astype(np.int64)
            lo, span = int(k.min()), int(k.max()) - int(k.min()) + 1
            if cap * span >= 1 << 62:
                packed = None
                break
            packed = packed * span + (k - lo)
            cap *= span
    if packed is not None:
        s = np.sort(packed, kind="stable")  # timsort: runs of a writer-sorted key are nearly sorted already
        return not bool((s[1:] == s[:-1]).any())
    order = np.lexsort(keys[::-1])
    same = np.ones(n - 1, dtype=bool)
    for k in keys:
        ks = k[order]
        same &= ks[1:] == ks[:-1]
    return not bool(same.any())


def _fk_clean(t: pa.Table, iso: set[str]) -> bool:
    """Every non-null ISO column value is in the ISO table (check_fk_iso would report nothing)."""
    if t.num_rows == 0:
        return True
    vs = pa.array(sorted(iso), pa.string())
    for col in FK_COLUMNS:
        if col not in t.column_names:
            continue
        c = t[col]
        if not _is_str(c.type):
            return False
        if bool(pc.any(pc.and_(pc.is_valid(c), pc.invert(pc.is_in(c, value_set=vs)))).as_py()):
            return False
    return True


def _datasets(ctx, L: _Loaded, fl: Failures, fs: Failures, iso: set[str] | None) -> dict[str, pd.DataFrame]:
    """Load (``fl``: what the loader reports) and structural checks (``fs``: schema, path<->embed, partition
    tokens, PK, ISO FK; 1A-S5-S9 §6.2) of every parquet dataset, one at a time; returns the kept frames."""
    from engine.core import dictionary as dict_mod
    from engine.core import schema as schema_mod

    ids = ctx.ids
    D = _dictionary(ctx.config)
    opts = _options(ctx)
    required = set(ALWAYS_REQUIRED) | {ds for opt, ds in OPTION_REQUIRED.items() if opts.get(opt)}
    tok = {"seed": str(ids.seed), "parameter_hash": ids.parameter_hash, "manifest_fingerprint": ids.manifest_fingerprint,
           "run_id": ids.run_id}
    frames: dict[str, pd.DataFrame] = {}
    for ds in PARQUET_DATASETS:
        if ds not in D:
            if ds in required:
                fl.add("E_PARTITION_MISPLACED", f"{ds}: not in the 1A dataset dictionary", [ds], dataset_id=ds)
            continue
        d = ctx.path(ds)
        L.dirs[ds] = d
        entry = D.entry(ds)
        parts, stray = _part_files(d, entry.files)
        if stray:
            fl.add("E_PARTITION_MISPLACED", f"{ds}: unexpected files in the partition (only part-NNNNN.parquet "
                   "and the dictionary's fixed files)", [p.name for p in stray], dataset_id=ds)
        if not parts:
            if ds in required:
                fl.add("E_PARTITION_MISPLACED", f"{ds}: required partition missing or empty at its dictionary "
                       "path", [_rel(ctx, d)], dataset_id=ds)
            continue
        try:
            sp = D.schema_path(ds)
        except EngineError:
            sp = None
        if sp is not None and not sp.is_file():
            sp = None
        cols = FRAME_COLUMNS.get(ds)
        plain = _Plain(parts)
        try:
            if cols is None:
                t = plain.table()
            else:
                try:  # primary-key columns stay plain too (a broken schema file is reported below, not here)
                    pk = list(schema_mod.load_schema(sp).get("x-primary-key") or []) if sp is not None else []
                    t = _read_parts_dict(parts, set(cols) | set(pk) | set(FK_COLUMNS) | {"merchant_id"})
                except Exception:  # noqa: BLE001 - the plain reader reads it or reports why not
                    t = plain.table()
            L.files[ds] = parts
        except Exception as e:  # noqa: BLE001 - unreadable parquet is a schema failure, not a crash
            fl.add("E_SCHEMA_INVALID", f"{ds}: unreadable parquet ({type(e).__name__}: {e})",
                   [_rel(ctx, p) for p in parts], dataset_id=ds)
            continue
        # ---- structural checks
        pk = []
        if sp is not None:
            probs = _validate_dataset(t, sp, plain)
            if probs:
                fs.add("E_SCHEMA_INVALID", f"{ds}: rows/columns violate {sp.name}", probs, dataset_id=ds)
            pk = list(schema_mod.load_schema(sp).get("x-primary-key") or [])
        else:
            fs.add("E_SCHEMA_INVALID", f"{ds}: schema file missing ({entry.schema_ref})", [str(entry.schema_ref)],
                   dataset_id=ds)
        # tokens carried by the actual path must be this run's, and exactly the dictionary's partitioning
        ptok = dict_mod.parse_tokens(_rel(ctx, L.dirs[ds]))
        for k, v in ptok.items():
            if k in tok and str(v) != tok[k]:
                fs.add("E_PARTITION_MISPLACED", f"{ds}: path token {k}={v} is not this run's", [str(v)],
                       dataset_id=ds)
        if set(ptok) & set(tok) != set(entry.partitioning):
            fs.add("E_PARTITION_MISPLACED", f"{ds}: path tokens {sorted(ptok)} != dictionary partitioning "
                   f"{list(entry.partitioning)}", [_rel(ctx, L.dirs[ds])], dataset_id=ds)
        if ds == "outlet_catalogue" and set(entry.partitioning) != {"seed", "manifest_fingerprint"}:
            fs.add("E_PARTITION_MISPLACED", "outlet_catalogue must be partitioned by seed and fingerprint only "
                   "(run_id never on egress)", [list(entry.partitioning)], dataset_id=ds)
        embed = {k: v for k, v in ptok.items() if k in tok}
        if not _embed_clean(t, embed):
            check_embed(plain.frame(), embed, ds, fs)
        if pk and t.num_rows and set(pk) <= set(t.column_names) - {"ts_utc"} and not _pk_unique(t, pk):
            check_pk(plain.frame(), pk, ds, fs)
        if iso is not None and not _fk_clean(t, iso):
            check_fk_iso(plain.frame(), iso, ds, fs)
        frames[ds] = _frame(t, cols)
        del t, plain
    return frames


def _json_docs(ctx, L: _Loaded, fl: Failures, fs: Failures) -> None:
    """The JSON receipts: load (``fl``) and their schema / embedded identities (``fs``)."""
    from engine.core import schema as schema_mod

    ids = ctx.ids
    D = _dictionary(ctx.config)
    for ds in JSON_DATASETS:
        L.docs[ds] = None
        if ds not in D:
            continue
        e = D.entry(ds)
        folder = ctx.path(ds)
        L.dirs[ds] = folder
        main = folder / e.files[0] if e.is_dir and e.files else folder
        if not main.is_file():
            continue
        try:
            L.docs[ds] = json.loads(main.read_bytes())
        except (OSError, ValueError) as exc:
            fl.add("E_SCHEMA_INVALID", f"{ds}: unreadable JSON ({exc})", [_rel(ctx, main)], dataset_id=ds)
    for ds in JSON_DATASETS:
        doc = L.docs.get(ds)
        if doc is None:
            if ds != "s6_receipt":  # the S6 receipt is checked where the membership surface is used
                fs.add("E_PARTITION_MISPLACED", f"{ds}: missing at its dictionary path",
                       [_rel(ctx, L.dirs[ds]) if ds in L.dirs else ds], dataset_id=ds)
            continue
        try:
            sp = D.schema_path(ds)
        except EngineError:
            sp = None
        if sp is not None and sp.is_file():
            # the schema describes one record; a list document (sealed inputs) is a list of such records
            recs = doc if isinstance(doc, list) else [doc]
            probs = [f"[{i}] {p}" if isinstance(doc, list) else p
                     for i, r in enumerate(recs) for p in schema_mod.validate_record(r, sp)]
            if probs:
                fs.add("E_SCHEMA_INVALID", f"{ds}: record violates {sp.name}", probs, dataset_id=ds)
        if isinstance(doc, dict):
            for k, want in (("manifest_fingerprint", ids.manifest_fingerprint), ("parameter_hash", ids.parameter_hash),
                            ("seed", str(ids.seed)), ("run_id", ids.run_id)):
                if k in doc and str(doc[k]) != want:
                    fs.add("E_PATH_EMBED_MISMATCH", f"{ds}: {k} != {want}", [doc[k]], dataset_id=ds)


def _validate_event_fast(table: pa.Table, schema: dict) -> list[str]:
    """validate_event_table, with the constant envelope strings dictionary-encoded first (their per-row regex
    was ~1 s per 10^6 events); anything not shown clean is validated on the plain table."""
    enc = table
    for c in EVENT_DICT_COLUMNS:
        if c in enc.column_names and _is_str(enc.schema.field(c).type):
            enc = enc.set_column(enc.column_names.index(c), c, pc.dictionary_encode(enc[c]))
    if enc is not table and not validate_event_table(enc, schema, clean_only=True):
        return []
    return validate_event_table(table, schema)


def _tokens_clean(t: pa.Table, tok: dict[str, str]) -> bool:
    """The envelope-token part of check_rng_envelopes would report nothing for this family."""
    return all(name in t.column_names and _all_equal(t[name], want) for name, want in tok.items())


def _events(ctx, L: _Loaded, fl: Failures, fs_ev: dict, env: dict, dup: dict, sums: dict, rec: dict) -> list[str]:
    """Every RNG event family, one at a time: read once (``fl``), schema (``fs_ev``), envelope (``env``),
    duplicate identities (``dup``), trace sums (``sums``), rnglog.reconcile's per-family part (``rec``); keeps a
    frame without the envelope tokens in ``L.events``. Returns the families rnglog.reconcile covers."""
    from engine.core import rnglog
    from engine.core import schema as schema_mod

    ids = ctx.ids
    D = _dictionary(ctx.config)
    fams = D.families()
    registered, nonconsuming = family_table(fams)
    tok = _envelope_tokens(ids)
    wanted = rnglog.reconciled_families(fams, ids.segment)
    own = [f for f in FAMILIES if f in fams and fams[f].get("segment") == SEGMENT]
    for fam in own + [f for f in wanted if f not in own]:
        try:
            t = rnglog.read_events(ctx.data_root, ctx.ids, fam, config=ctx.config, with_source=True)
        except EngineError as e:  # lines that do not fit the family schema
            if fam in own:
                fl.add("E_SCHEMA_INVALID", f"rng_event {fam}: unreadable event log ({e.code}: {e.message})", e.rows,
                       dataset_id=f"rng_event_{fam}")
            rec[fam] = e
            continue
        if fam in wanted:
            rec[fam] = rnglog.summarise_events(t, fam, fams[fam], ids, chain=True)
        if fam not in own or t.num_rows == 0:
            continue
        t = t.drop_columns(["_part", "_line"])
        try:
            sp = D.schema_path("rng_event", family=fam)
        except EngineError:
            sp = None
        if sp is not None and sp.is_file():
            probs = _validate_event_fast(t, schema_mod.load_schema(sp))
            if probs:
                fs_ev.setdefault(fam, Failures()).add("E_SCHEMA_INVALID", f"rng_event {fam}: rows violate {sp.name}",
                                                      probs, dataset_id=f"rng_event_{fam}")
        clean = _tokens_clean(t, tok)
        df = _frame(t, [c for c in t.column_names if c not in EVENT_TOKEN_COLUMNS] if clean else None)
        del t
        _envelope_family(fam, df, tok, registered, nonconsuming, env.setdefault(fam, Failures()), tokens=not clean)
        _duplicate_events(fam, df, dup.setdefault(fam, Failures()))
        _trace_sums(fam, df, sums)
        L.events[fam] = df if clean else df.drop(columns=[c for c in EVENT_TOKEN_COLUMNS if c in df.columns])
    return wanted


def _trace_finals_fast(t: pa.Table, ids) -> tuple[dict, dict] | None:
    """_trace_finals on the Arrow trace without building its frame: None unless it would report nothing
    (then the caller runs _trace_finals on the frame)."""
    if t.num_rows == 0:
        return {}, {}
    cols = ("module", "substream_label", "seed", "run_id", "events_total", "draws_total", "blocks_total",
            "rng_counter_after_hi", "rng_counter_after_lo")
    if any(c not in t.column_names or t[c].null_count for c in cols):
        return None
    for c in cols[4:]:
        if not pa.types.is_integer(t[c].type):
            return None
    if not (_all_equal(t["seed"], str(ids.seed)) and _all_equal(t["run_id"], ids.run_id)):
        return None
    mod = pc.dictionary_encode(t["module"].combine_chunks())
    lab = pc.dictionary_encode(t["substream_label"].combine_chunks())
    if not (_is_str(mod.dictionary.type) and _is_str(lab.dictionary.type)):
        return None
    mods, labs = mod.dictionary.to_pylist(), lab.dictionary.to_pylist()
    code = np.asarray(mod.indices.to_numpy(), dtype=np.int64) * len(labs) + np.asarray(lab.indices.to_numpy())
    u64 = {c: np.asarray(t[c].to_numpy()).astype(np.uint64) for c in cols[4:]}
    et, ah, al = u64["events_total"], u64["rng_counter_after_hi"], u64["rng_counter_after_lo"]
    order = np.argsort(code, kind="stable")
    cs = code[order]
    starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
    ends = np.r_[starts[1:], len(cs)]
    finals: dict[tuple[str, str], dict] = {}
    rows_per_key: dict[tuple[str, str], int] = {}
    for a, b in zip(starts.tolist(), ends.tolist()):
        idx = order[a:b]  # the key's rows in file order
        e, h, lo = et[idx], ah[idx], al[idx]
        if len(idx) > 1:
            up = (e[1:] > e[:-1]) | ((e[1:] == e[:-1]) & ((h[1:] > h[:-1]) | ((h[1:] == h[:-1]) & (lo[1:] >= lo[:-1]))))
            if not up.all():  # the stable sort by (events_total, after counter) moves rows
                idx = idx[np.lexsort((lo, h, e))]
            for c in ("draws_total", "blocks_total"):
                v = u64[c][idx]
                if (v[1:] < v[:-1]).any():
                    return None
        k = int(cs[a])
        key = (str(mods[k // len(labs)]), str(labs[k % len(labs)]))
        last = int(idx[-1])
        finals[key] = {"events_total": int(et[last]), "draws_total": int(u64["draws_total"][last]),
                       "blocks_total": int(u64["blocks_total"][last])}
        rows_per_key[key] = int(b - a)
    return finals, rows_per_key


def _reconcile_findings(ids, fams: dict, wanted: list[str], rec: dict, audit_raw: list[dict],
                        trace_error: EngineError | None, tsum, audit_file: Path | None = None) -> list[dict]:
    """rnglog.reconcile(chain=True)'s failures from what S9 already read, by rnglog's own parts: the audit rows,
    the per-family ``rnglog.summarise_events`` results (or read errors) in ``rec``, taken in ``wanted`` order,
    and the ``rnglog.summarise_trace`` result ``tsum`` (or the trace's read error)."""
    from engine.core import rnglog

    trace = trace_error if trace_error is not None else tsum
    return rnglog.reconcile_summaries(ids, fams, {f: rec[f] for f in wanted}, trace, audit_raw, audit_file)


def _read_jsonl(path: Path) -> list[dict]:
    out: list[dict] = []
    if not path.is_file():
        return out
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _options(ctx) -> dict:
    return dict(((ctx.config.get("segment1a") or {}).get("options") or {}))


def _param_path(ctx, name: str) -> Path | None:
    p = ((ctx.config.get("segment1a") or {}).get("parameters") or {}).get(name)
    return Path(p) if p else None


def _input_path(ctx, name: str) -> Path | None:
    p = ((ctx.config.get("segment1a") or {}).get("inputs") or {}).get(name)
    return Path(p) if p else None


def _rel(ctx, p: Path) -> str:
    try:
        return Path(p).resolve().relative_to(Path(ctx.data_root).resolve()).as_posix()
    except ValueError:
        return Path(p).as_posix()


def _iso_set(ctx) -> set[str] | None:
    """ISO-3166 alpha-2 codes of the sealed ISO table (FK target), via the S0 loader."""
    p = _input_path(ctx, "iso_table")
    if p is None:
        return None
    from engine.segment1a import inputs as inp

    return set(str(c) for c in inp.iso_codes(inp.load_iso_table(p)))


def _merchant_homes(ctx) -> pd.DataFrame | None:
    """merchant_id -> home_country_iso from the sealed merchant table (normalised by the S0 loader)."""
    p = _input_path(ctx, "merchant_table")
    if p is None:
        return None
    from engine.segment1a import inputs as inp

    return _frame(inp.load_merchant_table(p), ["merchant_id", "home_country_iso"])


def _s4_policy(ctx) -> tuple[int | None, str | None]:
    """MAX_ZTP_ZERO_ATTEMPTS and the exhaustion policy (both layouts, normalised by the S0 loader)."""
    p = _param_path(ctx, "crossborder_hyperparams.yaml")
    if p is None:
        return None, None
    from engine.segment1a import inputs as inp

    z = inp.load_crossborder_hyperparams(p).ztp
    return int(z["max_zero_attempts"]), str(z["exhaustion_policy"])


def _s2_policy(ctx) -> dict | None:
    p = _param_path(ctx, "s2_validation_policy.yaml")
    if p is None:
        return None
    from engine.segment1a import inputs as inp

    d = inp.load_s2_validation_policy(p)
    return {"rho_reject_max": float(d["rho_reject_max"]), "p99_max": float(d["p99_max"]),
            "cusum": {"reference_k": float(d["cusum_k"]), "threshold_h": float(d["cusum_h"]),
                      "alpha_cap": float(d["alpha_cap"])}}


def _s6_log_all(ctx) -> bool:
    import yaml

    p = _param_path(ctx, "s6_selection_policy.yaml")
    if p is None or not p.is_file():
        return True
    doc = yaml.safe_load(p.read_bytes()) or {}
    d = doc.get("defaults") if isinstance(doc.get("defaults"), dict) else doc
    return bool(d.get("log_all_candidates", True))


def _verify_s6_receipt(d: Path | None) -> str | None:
    """The S6 receipt flag (1A-S5-S9 §3.3): None when it verifies, else the reason."""
    if d is None or not d.is_dir():
        return "S6 receipt folder missing"
    from engine.segment1a import s5_currency_weights as s5
    from engine.segment1a import s6_foreign_selection as s6

    try:
        s5.verify_receipt(d, list(s6.RECEIPT_MEMBERS), "S6")
    except EngineError as e:
        return f"{e.code}: {e.message}"
    return None


class _MerchantU64:
    """merchant_u64 (one SHA-256 per id) computed once per distinct merchant of the run and shared by every
    substream re-derivation (hurdle, NB, ZTP, Gumbel, S7, S8 all key on it)."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, np.uint64)
        self.mu = np.zeros(0, np.uint64)

    def prime(self, merchant_ids: np.ndarray) -> None:
        from engine.core import rng

        self.ids = _uniq(np.asarray(merchant_ids, dtype=np.uint64))
        self.mu = np.asarray(rng.merchant_u64_vec(self.ids), dtype=np.uint64)

    def __call__(self, merchant_ids: np.ndarray) -> np.ndarray:
        from engine.core import rng

        ids = np.asarray(merchant_ids, dtype=np.uint64)
        if len(self.ids) == 0 or len(ids) == 0:
            return rng.merchant_u64_vec(ids)
        idx = np.searchsorted(self.ids, ids)
        idx[idx == len(self.ids)] = 0
        hit = self.ids[idx] == ids
        out = np.empty(len(ids), dtype=np.uint64)
        out[hit] = self.mu[idx[hit]]
        if not hit.all():
            out[~hit] = rng.merchant_u64_vec(ids[~hit])
        return out


def _bases(ctx, label: str, df: pd.DataFrame, mu: _MerchantU64 | None = None) -> pd.DataFrame:
    """Re-derived keyed substreams (00-core §3.3) for the distinct ids of ``df``: columns merchant_id
    [, country_iso], stream_key, base_hi, base_lo."""
    from engine.core import rng

    keys = ["merchant_id", "country_iso"] if label in ISO_KEYED_LABELS else ["merchant_id"]
    u = df[keys].drop_duplicates().reset_index(drop=True)
    u["merchant_id"] = u["merchant_id"].to_numpy().astype(np.uint64)
    M = rng.master_material(SEGMENT, ctx.ids.fingerprint_bytes, ctx.ids.seed)
    m64 = (mu or rng.merchant_u64_vec)(u["merchant_id"].to_numpy())
    if "country_iso" in keys:
        # str() of each code, as a numpy str array (a Python list of 10^6 str costs seconds)
        iso = np.asarray(u["country_iso"].to_numpy(), dtype=object).astype(str)
        k, hi, lo = rng.substreams_vec(M, SEGMENT, label, m64, iso=iso)
    else:
        k, hi, lo = rng.substreams_vec(M, SEGMENT, label, m64)
    u["stream_key"] = np.asarray(k, np.uint64)
    u["base_hi"] = np.asarray(hi, np.uint64)
    u["base_lo"] = np.asarray(lo, np.uint64)
    return u


def _aligned(df: pd.DataFrame, base: pd.DataFrame, keys: list[str]) -> bool:
    """``base`` (from :func:`_bases`) lists exactly ``df``'s key rows in ``df``'s order (no repeated key):
    a left merge on ``keys`` is then a column-wise join."""
    if len(base) != len(df):
        return False
    for k in keys:
        a, b = df[k], base[k]
        if a.dtype != b.dtype:
            return False
        if not bool((np.asarray(a.to_numpy(), dtype=object if a.dtype.kind == "O" else None) ==
                     np.asarray(b.to_numpy(), dtype=object if b.dtype.kind == "O" else None)).all()):
            return False
    return True


def _with_keys(df: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("merchant_id", "country_iso") if c in base.columns]
    out = df.copy()
    out["merchant_id"] = out["merchant_id"].to_numpy().astype(np.uint64)
    if _aligned(out, base, keys):
        out = out.reset_index(drop=True)
        for c in base.columns:
            if c not in keys:
                out[c] = base[c].to_numpy()
        return out
    return out.merge(base, on=keys, how="left", sort=False)


def replay_uniform(df: pd.DataFrame, base: pd.DataFrame) -> dict:
    """Low-lane uniform of the first block of each event's substream (S1 hurdle, S6 gumbel; 00-core §3.4)."""
    from engine.core import samplers

    j = _with_keys(df, base)
    u, _ha, _la = samplers.uniform1_vec(j["stream_key"].to_numpy(), j["base_hi"].to_numpy(), j["base_lo"].to_numpy())
    return {"before_hi": j["base_hi"].to_numpy().astype(np.uint64), "before_lo": j["base_lo"].to_numpy().astype(np.uint64),
            "u": np.asarray(u, np.float64)}


def check_sampler_replay(df: pd.DataFrame, base: pd.DataFrame, kind: str, code: str, fails: Failures,
                         what: str) -> None:
    """Re-run the sampler of every consuming event from its logged before counter (gamma: alpha; Poisson:
    lambda) and require value, after counter, blocks and draws bit-for-bit (00-core §3.5, 1A-S1-S4 §2.7).
    Value mismatch -> ``code``; counters -> E_RNG_COUNTER_MISMATCH; blocks/draws -> E_RNG_BUDGET_VIOLATION."""
    from engine.core import samplers

    if len(df) == 0:
        return
    j = _with_keys(df, base)
    par = j["alpha" if kind == "gamma" else "lambda"].to_numpy(dtype=np.float64)
    ok = np.isfinite(par) & (par > 0.0)
    if kind == "poisson":
        ok &= par <= samplers.POISSON_LAMBDA_MAX
    bad_par = j[~ok]
    fails.frame(code, f"{what}: parameter not finite and > 0 (cannot replay)",
                bad_par[[c for c in ("merchant_id", "alpha", "lambda") if c in bad_par.columns]])
    j = j[ok].reset_index(drop=True)
    if len(j) == 0:
        return
    bh = j["rng_counter_before_hi"].to_numpy().astype(np.uint64)
    bl = j["rng_counter_before_lo"].to_numpy().astype(np.uint64)
    try:
        if kind == "gamma":
            val, ha, la, blocks, draws = samplers.gamma_vec(j["stream_key"].to_numpy(), bh, bl, par[ok])
            logged = j["gamma_value"].to_numpy(dtype=np.float64)
            vbad = np.asarray(val, np.float64).view(np.uint64) != logged.view(np.uint64)
        else:
            val, ha, la, blocks, draws = samplers.poisson_vec(j["stream_key"].to_numpy(), bh, bl, par[ok])
            vbad = np.asarray(val, np.int64) != j["k"].to_numpy().astype(np.int64)
    except EngineError as e:
        fails.add(code, f"{what}: the sampler refused to replay ({e.code}: {e.message})", e.rows)
        return
    cbad = (np.asarray(ha, np.uint64) != j["rng_counter_after_hi"].to_numpy().astype(np.uint64)) | (
        np.asarray(la, np.uint64) != j["rng_counter_after_lo"].to_numpy().astype(np.uint64))
    bbad = (np.asarray(blocks, np.uint64) != j["blocks"].to_numpy().astype(np.uint64)) | (
        np.asarray(draws, np.uint64) != j["draws_u64"].to_numpy())
    cols = [c for c in ("merchant_id", "alpha", "gamma_value", "lambda", "k", "blocks", "draws") if c in j.columns]
    rows = j.loc[vbad, cols].copy()
    rows["replayed"] = np.asarray(val)[vbad]
    fails.frame(code, f"{what}: value does not replay bit-for-bit from its before counter", rows)
    fails.frame("E_RNG_COUNTER_MISMATCH", f"{what}: after counter != replayed sampler's", _envelope_rows(j[cbad]))
    r2 = _envelope_rows(j[bbad]).copy()
    r2["blocks_replayed"] = np.asarray(blocks)[bbad]
    r2["draws_replayed"] = np.asarray(draws)[bbad]
    fails.frame("E_RNG_BUDGET_VIOLATION", f"{what}: blocks/draws != uniforms the sampler actually consumed", r2)


def check_gumbel_keys(g: pd.DataFrame, u_replayed: np.ndarray, fails: Failures) -> None:
    """Recompute each logged key from the logged weight and the replayed u with S6's own kernel and require
    the logged key bit-for-bit (1A-S5-S9 §3.4 re-derivation)."""
    if len(g) == 0 or "key" not in g.columns or "weight" not in g.columns:
        return
    from engine.segment1a import s6_foreign_selection as s6

    w = g["weight"].to_numpy(dtype=np.float64)
    k = s6.gumbel_keys(w, np.asarray(u_replayed, np.float64))
    logged = pd.to_numeric(g["key"], errors="coerce").to_numpy(dtype=np.float64)
    both_nan = np.isnan(k) & np.isnan(logged)
    bad = ~both_nan & (np.nan_to_num(k).view(np.uint64) != np.nan_to_num(logged).view(np.uint64) |
                       (np.isnan(k) != np.isnan(logged)))
    rows = g.loc[bad, ["merchant_id", "country_iso", "weight", "u", "key"]].copy()
    rows["key_replayed"] = k[bad]
    fails.frame("E_S6_REPLAY_MISMATCH", "gumbel_key key != ln(weight) - ln(-ln u) recomputed from the replayed u",
                rows)


def validate_event_table(table: pa.Table, schema: dict, *, clean_only: bool = False) -> list[str]:
    """An event family table (as read by ``rnglog.read_events``) against its schema. The writer omits an
    optional field whose value is null, so the reader shows it as null: for a property outside ``required``
    null means "absent" and only the present values are checked (00-core §3.6 closed payloads).

    ``clean_only``: ``table`` may hold dictionary-encoded columns; returns [] only when the decoded table is
    certainly clean, else a non-empty list (not the problems: validate the plain table for those)."""
    from engine.core import schema as schema_mod

    def check(t: pa.Table, sch: dict) -> list[str]:
        if not clean_only:
            return schema_mod.validate_table(t, sch)
        clean = _schema_clean(t, sch)
        if clean is None:
            return schema_mod.validate_table(t, sch)
        return [] if clean else ["not shown clean"]

    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    optional = [c for c in table.column_names if c in props and c not in required]
    base = dict(schema)
    base["properties"] = {k: v for k, v in props.items() if k not in optional}
    base["required"] = [r for r in schema.get("required") or [] if r not in optional]
    base["additionalProperties"] = schema.get("additionalProperties", False)
    probs = check(table.drop_columns(optional), base)
    for c in optional:
        col = table.column(c)
        present = col.filter(col.is_valid())
        if len(present):
            sub = {"type": "object", "additionalProperties": False, "required": [],
                   "properties": {c: props[c]}}
            probs += check(pa.table({c: present}), sub)
    return probs


def _lineage(ctx, fails: Failures, L: _Loaded):
    """Recompute parameter_hash / manifest_fingerprint (and run_id) from the configured files and the code
    (00-core §1.3-1.5, decision 3) and compare with the run's path tokens and S0's lineage evidence."""
    from engine.core import identities

    try:
        res = identities.resolve_1a(ctx.config, Path(ctx.repo_root))
    except EngineError as e:
        fails.add("E_LINEAGE_RECOMPUTE_MISMATCH", f"identities cannot be recomputed: {e.code}: {e.message}", e.rows)
        return None
    ids = ctx.ids
    got = {"parameter_hash": res.parameter_hash, "manifest_fingerprint": res.manifest_fingerprint, "run_id": res.run_id}
    want = {"parameter_hash": ids.parameter_hash, "manifest_fingerprint": ids.manifest_fingerprint,
            "run_id": ids.run_id}
    bad = [{"identity": k, "path": want[k], "recomputed": got[k]} for k in sorted(got) if got[k] != want[k]]
    if bad:
        fails.add("E_LINEAGE_RECOMPUTE_MISMATCH", "recomputed identities differ from the run's path tokens", bad)
    rec = L.docs.get("s0_gate_receipt_1A")
    if isinstance(rec, dict) and rec.get("code_digest") not in (None, res.code_digest_hex):
        fails.add("E_LINEAGE_RECOMPUTE_MISMATCH", "S0 receipt code_digest != the code now validating",
                  [{"s0": rec.get("code_digest"), "now": res.code_digest_hex}], dataset_id="s0_gate_receipt_1A")
    d = L.dirs.get("s0_gate_receipt_1A")
    if d is not None:
        plog = _read_jsonl(d / "param_digest_log.jsonl")
        if plog:
            s0 = sorted((str(r.get("filename")), str(r.get("sha256_hex"))) for r in plog)
            now = sorted((e["name"], e["sha256"]) for e in res.param_entries)
            if s0 != now:
                fails.add("E_LINEAGE_RECOMPUTE_MISMATCH", "S0 param_digest_log != recomputed parameter digests",
                          sorted(set(s0) ^ set(now)), dataset_id="s0_gate_receipt_1A")
    return res


def validate(ctx) -> Result:
    """Run every S9 check over the published 1A outputs of ``ctx.ids`` and build the bundle's bytes.

    Reads only; nothing is written (``run`` publishes). Datasets and event families are processed one at a
    time and only the columns later checks need are kept (see "streaming load"); failures are recorded in
    per-phase collectors and joined in the order the checks are listed in the spec (loading, structure, RNG
    envelope, trace, reconciliation, S1..S8, lineage)."""
    from engine.core import progress, rnglog

    ids = ctx.ids
    prog = progress.Progress("1A.S9", total=len(PROGRESS_STEPS), unit="checks")
    fails = Failures()
    L = _Loaded()
    D = _dictionary(ctx.config)
    prefetch = getattr(rnglog, "prefetch_digests", None)
    if prefetch is not None:  # hash the logs' mirrors in the background while the datasets are checked
        try:
            prefetch(ctx.data_root, ids, [f for f in FAMILIES if f in D.families()], config=ctx.config)
        except (TypeError, OSError, EngineError):
            pass
    iso = _iso_set(ctx)
    load_ds, load_json, load_ev, load_tr = Failures(), Failures(), Failures(), Failures()
    st_ds, st_json = Failures(), Failures()
    frames = _datasets(ctx, L, load_ds, st_ds, iso)
    _json_docs(ctx, L, load_json, st_json)
    prog.advance()
    st_ev: dict[str, Failures] = {}
    env: dict[str, Failures] = {}
    dup: dict[str, Failures] = {}
    sums: dict[tuple[str, str], dict] = {}
    rec: dict[str, Any] = {}
    # the trace first (the largest log, ~4 rows per merchant): checked and summarised while little else is held
    trace_error, st_tr = None, Failures()
    try:
        tt = rnglog.read_trace(ctx.data_root, ctx.ids, ctx.config)
    except EngineError as e:
        load_tr.add("E_SCHEMA_INVALID", f"rng_trace_log unreadable ({e.code}: {e.message})", e.rows,
                    dataset_id="rng_trace_log")
        trace_error, tt = e, None
    tfin = _trace_finals_fast(tt, ids) if tt is not None else ({}, {})
    if tfin is None:
        tfin = _trace_finals(trace_frame_from_table(tt), ids, st_tr)
    tsum = rnglog.summarise_trace(tt, ids) if tt is not None else None
    del tt
    prog.advance()
    wanted = _events(ctx, L, load_ev, st_ev, env, dup, sums, rec)
    prog.advance()
    audit_raw = rnglog.read_audit(ctx.data_root, ctx.ids, ctx.config)
    L.audit = [r for r in audit_raw if "_invalid" not in r]
    for part in (load_ds, load_json, load_ev, load_tr, st_ds, st_json, *(st_ev[f] for f in sorted(st_ev)),
                 *(env[f] for f in sorted(env)), *(dup[f] for f in sorted(dup)), st_tr):
        fails.extend(part)
    # ---- trace and audit (00-core §3.7), then rnglog's own reconciliation from the same reads
    acct = _trace_accounting(sums, tfin, L.audit, ids, fails)
    findings = _reconcile_findings(ids, D.families(), wanted, rec, audit_raw, trace_error, tsum,
                                   rnglog.audit_path(ctx.data_root, ids, ctx.config))
    del rec
    _reconcile(ctx, fails, findings)
    prog.advance()
    empty = pd.DataFrame()
    E = L.events
    mu = _MerchantU64()
    # ---- S1: cardinality, equivalence chain, Philox replay of every stochastic hurdle draw
    dm = frames.get("hurdle_design_matrix")
    universe = _uniq(dm["merchant_id"].to_numpy().astype(np.uint64)) if dm is not None and len(dm) else \
        np.zeros(0, np.uint64)
    mu.prime(universe)
    hur = E.get("hurdle_bernoulli", empty)
    replay = replay_uniform(hur, _bases(ctx, "hurdle_bernoulli", hur, mu)) if len(hur) else None
    multi = check_s1(hur, universe, fails, pi_probs=frames.get("hurdle_pi_probs"), replay=replay)
    del replay
    multi_ids = multi.loc[multi["is_multi"].to_numpy(), "merchant_id"].to_numpy().astype(np.uint64)
    elig = frames.get("crossborder_eligibility_flags")
    eligible = None
    if elig is not None and len(elig):
        eligible = elig.loc[elig["is_eligible"].to_numpy().astype(bool), "merchant_id"].to_numpy().astype(np.uint64)
    check_gating(E, multi, eligible, fails)
    prog.advance()
    # ---- S2: finals, attempt reconstruction, sampler replay, corridors
    pois = E.get("poisson_component", empty)
    gam = E.get("gamma_component", empty)
    s2p = pois[pois["module"].to_numpy() == S2_POISSON[0]].reset_index(drop=True) if len(pois) else empty
    s4p = pois[pois["module"].to_numpy() == S4_POISSON[0]].reset_index(drop=True) if len(pois) else empty
    s2g = gam[gam["module"].to_numpy() == S2_GAMMA[0]].reset_index(drop=True) if len(gam) else empty
    nbf = E.get("nb_final", empty)
    n_by = check_s2(nbf, s2g, s2p, multi_ids, fails)
    bases: dict[str, pd.DataFrame] = {}
    for lab, src in (("gamma_nb", s2g), ("poisson_nb", s2p), ("poisson_component", s4p), ("nb_final", nbf),
                     ("residual_rank", E.get("residual_rank", empty)),
                     ("sequence_finalize", E.get("sequence_finalize", empty)),
                     ("site_sequence_overflow", E.get("site_sequence_overflow", empty)),
                     ("dirichlet_gamma_vector", E.get("dirichlet_gamma_vector", empty))):
        if len(src):
            bases[lab] = _bases(ctx, lab, src, mu)
    check_counter_chains(E, fails, {k: v.drop(columns=["stream_key"]) for k, v in bases.items()})
    if len(s2g):
        check_sampler_replay(s2g, bases["gamma_nb"], "gamma", "E_S2_REPLAY_MISMATCH", fails, "S2 gamma_component")
    if len(s2p):
        check_sampler_replay(s2p, bases["poisson_nb"], "poisson", "E_S2_REPLAY_MISMATCH", fails, "S2 poisson_component")
    if len(s4p):
        check_sampler_replay(s4p, bases["poisson_component"], "poisson", "E_S4_REPLAY_MISMATCH", fails,
                             "S4 poisson_component")
    del bases
    corridor = None
    try:
        policy = _s2_policy(ctx)
    except EngineError as e:
        policy = None
        fails.add("corridor_breach", f"{e.code}: {e.message}", e.rows)
    if policy is not None:
        corridor = check_s2_corridors(nbf, policy, fails, corridor_fn=_s2_corridor_fn())
    prog.advance()
    # ---- S3
    cand = frames.get("s3_candidate_set")
    if cand is None:
        cand = pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "country_iso": np.zeros(0, object),
                             "candidate_rank": np.zeros(0, np.int64), "is_home": np.zeros(0, bool)})
    homes = dm[["merchant_id", "home_country_iso"]].copy() if dm is not None and "home_country_iso" in dm.columns \
        else _merchant_homes(ctx)
    check_s3(cand, n_by, homes, fails, counts=frames.get("s3_integerised_counts"), seq=frames.get("s3_site_sequence"),
             universe=universe)
    prog.advance()
    # ---- S4
    mx, pol = _s4_policy(ctx)
    scope = n_by["merchant_id"].to_numpy().astype(np.uint64)
    if eligible is not None:
        scope = _intersect(scope, eligible)
    exh = E.get("ztp_retry_exhausted", empty)
    kt = check_s4(s4p, E.get("ztp_rejection", empty), exh, E.get("ztp_final", empty), scope, fails,
                  max_attempts=mx, exhaustion_policy=pol)
    aborted = _setdiff(_uniq(exh["merchant_id"].to_numpy().astype(np.uint64)) if len(exh) else
                       np.zeros(0, np.uint64), kt["merchant_id"].to_numpy().astype(np.uint64))
    prog.advance()
    # ---- S6 (membership authority: the surface after its flag, else the events)
    gum = E.get("gumbel_key", empty)
    mem_df = frames.get("s6_membership")
    membership_source = "gumbel_key"
    if mem_df is not None:
        membership_source = "s6_membership"
        why = _verify_s6_receipt(L.dirs.get("s6_receipt"))
        if why:
            fails.add("E_S6_PASS_MISSING", f"s6_membership used but the S6 receipt does not verify: {why}",
                      [_rel(ctx, L.dirs["s6_receipt"]) if "s6_receipt" in L.dirs else "s6_receipt"],
                      dataset_id="s6_receipt")
    g_replay = None
    if len(gum):
        g_replay = replay_uniform(gum, _bases(ctx, "gumbel_key", gum, mu))
    members = check_s6(gum, kt, cand, fails, membership=mem_df, log_all_candidates=_s6_log_all(ctx), replay=g_replay)
    if g_replay is not None:
        check_gumbel_keys(gum, g_replay["u"], fails)
    prog.advance()
    # ---- S8 structure, S7 parity, conservation
    cat = frames.get("outlet_catalogue", empty)
    if len(cat):
        blocks = check_catalogue(cat, fails)
    else:
        blocks = pd.DataFrame({"merchant_id": np.zeros(0, np.uint64), "legal_country_iso": np.zeros(0, object),
                               "n": np.zeros(0, np.int64), "raw": np.zeros(0, np.int64),
                               "home": np.zeros(0, object), "flag": np.zeros(0, bool)})
    frames.pop("outlet_catalogue", None)
    del cat
    ov = check_s8_events(blocks, E.get("sequence_finalize", empty), E.get("site_sequence_overflow", empty), fails)
    check_conservation(blocks, multi, n_by, homes, cand, fails,
                       tolerated_absent=_union(ov, aborted if pol == "abort" else np.zeros(0, np.uint64)))
    check_s7(blocks, n_by, kt, members, cand, E.get("residual_rank", empty), fails,
             allocation=frames.get("s7_integer_allocation"), aborted=aborted)
    prog.advance()
    # ---- lineage
    resolved = _lineage(ctx, fails, L)
    prog.advance()
    # ---- bundle bytes
    passed = not fails.items
    files = _bundle_files(ctx, L, fails, passed, acct, corridor, resolved, universe,
                          counts_source="s7_integer_allocation" if frames.get("s7_integer_allocation") is not None
                          else "residual_rank", membership_source=membership_source)
    prog.advance()
    prog.finish()
    return Result(passed=passed, failures=list(fails.items), bundle_files=files)


def _reconcile(ctx, fails: Failures, findings: list[dict] | None = None) -> None:
    """rnglog's own events-vs-trace-vs-audit reconciliation, mapped onto the S9 codes. ``findings``: its
    failure dicts computed from the tables S9 already read (:func:`_reconcile_findings`); None calls
    ``rnglog.reconcile`` (which reads every log again)."""
    from engine.core import rnglog

    if findings is None:
        fn = getattr(rnglog, "reconcile", None)
        if fn is None:
            return
        findings = fn(ctx.data_root, ctx.ids, chain=True, config=ctx.config) or []
    # S9's own checks above cover the same ground in more detail; a reconcile finding is added only when S9
    # has not already reported that code for that family (no double counting in failures_by_code)
    seen = {(f["code"], f.get("dataset_id")) for f in fails.items}
    seen_codes = {f["code"] for f in fails.items}
    for r in findings:
        r = dict(r)
        code = _map_reconcile_code(r)
        ds = f"rng_event_{r['family']}" if r.get("family") else "rng_trace_log"
        if (code, ds) in seen or (code in seen_codes and code.startswith("E_TRACE")):
            continue
        seen.add((code, ds))
        fails.add(code, "rnglog.reconcile: " + str(r.get("detail") or r.get("message") or r.get("code")),
                  r.get("rows") or [], count=r.get("count"), dataset_id=ds)


def _s2_corridor_fn():
    """S2's own pure corridor function when the S2 module provides one with this signature."""
    try:
        from engine.segment1a import s2_nb_outlets
    except ImportError:
        return None
    fn = getattr(s2_nb_outlets, "corridor_metrics", None)
    return fn if callable(fn) else None


_RECONCILE_CODES = {
    "E_RNG_COUNTER_MISMATCH", "E_RNG_BUDGET_VIOLATION", "E_NONCONSUMING_CHANGED_COUNTERS", "E_TRACE_TOTALS_MISMATCH",
    "E_TRACE_COVERAGE_MISSING", "E_PATH_EMBED_MISMATCH", "E_SCHEMA_INVALID", "E_DUP_PK",
}


def _map_reconcile_code(r: dict) -> str:
    """Map rnglog.reconcile failure dicts onto the S9 RNG codes (1A-S5-S9 §6.2)."""
    code = str(r.get("code", ""))
    if code in _RECONCILE_CODES:
        return code
    c = code.lower()
    if "nonconsuming" in c or "non_consuming" in c:
        return "E_NONCONSUMING_CHANGED_COUNTERS"
    if "budget" in c or "draws" in c:
        return "E_RNG_BUDGET_VIOLATION"
    if "total" in c:
        return "E_TRACE_TOTALS_MISMATCH"
    if "coverage" in c or "trace" in c or "audit" in c:
        return "E_TRACE_COVERAGE_MISSING"
    if "partition" in c or "embed" in c:
        return "E_PATH_EMBED_MISMATCH"
    return "E_RNG_COUNTER_MISMATCH"


# ---------------------------------------------------------------------------- bundle


def _bundle_files(ctx, L: _Loaded, fails: Failures, passed: bool, acct: dict, corridor: dict | None, resolved,
                  universe: np.ndarray, *, counts_source: str, membership_source: str) -> dict[str, bytes]:
    """Every bundle file except index.json / _passed.flag (1A-S5-S9 §6.3; decision 15: no timestamps)."""
    import hashlib

    ids = ctx.ids
    files: dict[str, bytes] = {}
    receipt = L.docs.get("s0_gate_receipt_1A") if isinstance(L.docs.get("s0_gate_receipt_1A"), dict) else {}
    pfiles = [] if resolved is None else sorted(resolved.param_entries, key=lambda e: e["name"].encode())
    afiles = [] if resolved is None else sorted(resolved.artifact_entries, key=lambda e: e["name"].encode())
    code_hex = resolved.code_digest_hex if resolved is not None else str(ctx.extra.get("code_digest") or "")
    # lineage evidence (00-core §1.3/§1.4 audit rows): names are the sealed role names / basenames, never
    # filesystem locations (decision 4); no mtime_ns (decision 15)
    files["param_digest_log.jsonl"] = canonical_jsonl(
        {"filename": e["name"], "sha256_hex": e["sha256"], "size_bytes": int(e["size_bytes"])} for e in pfiles)
    files["fingerprint_artifacts.jsonl"] = canonical_jsonl(
        {"path": e["name"], "sha256": e["sha256"], "size_bytes": int(e["size_bytes"])} for e in afiles)
    files["parameter_hash_resolved.json"] = canonical_json({
        "parameter_hash": ids.parameter_hash,
        "filenames_sorted": [e["name"] for e in pfiles],
        "artifact_count": len(pfiles),
        "files": [{"filename": e["name"], "size_bytes": int(e["size_bytes"]), "sha256_hex": e["sha256"]}
                  for e in pfiles],
    })
    files["manifest_fingerprint_resolved.json"] = canonical_json({
        "manifest_fingerprint": ids.manifest_fingerprint,
        "artifact_count": len(afiles),
        "git_commit_hex": code_hex,  # decision 3: the code digest
        "code_digest": code_hex,
        "parameter_hash": ids.parameter_hash,
        "files": [{"path": e["name"], "sha256": e["sha256"], "size_bytes": int(e["size_bytes"])} for e in afiles],
    })
    attest_bytes = None
    d0 = L.dirs.get("s0_gate_receipt_1A")
    if d0 is not None and (d0 / "numeric_policy_attest.json").is_file():
        attest_bytes = (d0 / "numeric_policy_attest.json").read_bytes()  # copied verbatim from S0 (00-core §5.1)
        files["numeric_policy_attest.json"] = attest_bytes
    try:
        attest = json.loads(attest_bytes) if attest_bytes else {}
    except ValueError:
        attest = {}
    # RNG accounting
    fam_tot = {}
    for fam in sorted(L.events):
        df = L.events[fam]
        fam_tot[fam] = {
            "events_total": int(len(df)),
            "draws_total_u128_dec": str(_u128_sum(df["draws_u64"].to_numpy())),
            "blocks_total_u64": _u128_sum(df["blocks"].to_numpy()),
            "nonconsuming_events": int(len(df)) if fam in NONCONSUMING else int(
                (df["blocks"].to_numpy().astype(np.uint64) == 0).sum()),
        }
    files["rng_accounting.json"] = canonical_json({
        "runs": [{"seed": ids.seed, "parameter_hash": ids.parameter_hash, "run_id": ids.run_id}],
        "audit_present": acct.get("audit_present", False),
        "families": fam_tot,
        "trace_keys": acct.get("keys", {}),
    })
    # egress checksums: sha256 of each outlet_catalogue part, composite over ASCII path order
    parts = sorted(L.files.get("outlet_catalogue", []), key=lambda p: _rel(ctx, p).encode())
    comp = hashlib.sha256()
    entries = []
    for p in parts:
        b = p.read_bytes()
        comp.update(b)
        entries.append({"path": _rel(ctx, p), "sha256_hex": hashlib.sha256(b).hexdigest(), "size_bytes": len(b)})
    files["egress_checksums.json"] = canonical_json({
        "dataset_id": "outlet_catalogue", "seed": ids.seed, "manifest_fingerprint": ids.manifest_fingerprint,
        "files": entries, "composite_sha256_hex": comp.hexdigest(),
    })
    # summary
    by_code: dict[str, int] = {}
    for f in fails.items:
        by_code[f["code"]] = by_code.get(f["code"], 0) + 1
    checks = {c: "PASS" for c in CHECK_NAMES}
    for f in fails.items:
        checks[_check_of(f["code"])] = "FAIL"
    files["s9_summary.json"] = canonical_json({
        "run": {"seed": ids.seed, "parameter_hash": ids.parameter_hash, "manifest_fingerprint": ids.manifest_fingerprint,
                "run_id": ids.run_id, "decision": "PASS" if passed else "FAIL"},
        "passed": passed,
        "merchants_total": int(len(universe)),
        "merchants_failed": int(len(fails.merchants)),
        "failures_by_code": by_code,
        "failure_codes": sorted(by_code),
        "failures": fails.items,
        "counts_source": counts_source,
        "membership_source": membership_source,
        "checks": checks,
        "s2_corridors": corridor,
    })
    # MANIFEST (decision 15: no created_utc_ns; decision 3: git_commit_hex = the code digest). The git commit
    # itself is NOT written: a commit that changes no engine file (docs, tests) keeps the fingerprint but would
    # change these bytes, breaking byte identity of data/ across re-runs (decision 5) and the write-once
    # bundle; it belongs in logs/ (the RNG audit row) as provenance.
    files["MANIFEST.json"] = canonical_json({
        "version": VERSION,
        "manifest_fingerprint": ids.manifest_fingerprint,
        "parameter_hash": ids.parameter_hash,
        "seed": ids.seed,
        "run_id": ids.run_id,
        "git_commit_hex": code_hex,
        "code_digest": code_hex,
        "artifact_count": len(files) + 2,  # + MANIFEST.json itself + index.json (which lists itself, ⚑12)
        "math_profile_id": attest.get("math_profile_id") or receipt.get("math_profile_id"),
        "compiler_flags": {"fma": False, "ftz": False, "rounding": "RNE", "fast_math": False, "blas": "none"},
    })
    return files


# ---------------------------------------------------------------------------- run + gate


def run(ctx) -> None:
    """Validate; publish the bundle (``_passed.flag`` only on PASS); on FAIL also publish the failure record
    and raise :class:`ValidationFailure` (non-zero exit) after the bundle is in place."""
    from engine.core import bundle

    res = validate(ctx)
    final = ctx.path("validation_bundle_1A")
    kinds = {name: BUNDLE_KINDS.get(name, "summary") for name in res.bundle_files}
    bundle.write_bundle(final, res.bundle_files, kinds, res.passed, PUBLISH_CODE)
    if res.passed:
        return
    codes: list[str] = []
    for f in res.failures:
        if f["code"] not in codes:
            codes.append(f["code"])
    _write_failure_record(ctx, res, codes)
    raise ValidationFailure(
        codes[0],
        f"1A S9 validation FAILED: {len(res.failures)} failure(s), codes {', '.join(codes)}; the bundle was "
        "published without _passed.flag (see its s9_summary.json)",
        path=final,
        rows=[f"{f['code']}: {f['detail']} ({f['count']} rows; first {f['rows'][:2]})" for f in res.failures],
        detail={"failure_codes": codes},
    )


def _write_failure_record(ctx, res: Result, codes: list[str]) -> None:
    """00-core §5.4 failure record (F8 validation; decision 15: no timestamps; first record kept)."""
    from engine.core import publish

    first = res.failures[0]
    publish.write_failure_record(
        ctx.path("validation_failures_1A"), ids=ctx.ids, failure_class="F8", failure_code=first["code"],
        state="S9", module=MODULE, dataset_id="validation_bundle_1A",
        detail=_jsonable({"failure_codes": codes,
                          "failures": [{"code": f["code"], "detail": f["detail"], "count": f["count"],
                                        "rows": f["rows"][:3]} for f in res.failures[:50]]}))


def _bundle_dir(data_root: Path, ids, config: dict | None = None) -> Path:
    return Path(data_root) / _dictionary(config).path("validation_bundle_1A", **ids.tokens())


def verify_1a_gate(data_root, ids, config: dict | None = None) -> Path:
    """Consumer gate "No PASS -> no read" (00-core §5.3, 1A-S5-S9 §6.5, decision 27).

    ``ids``: the 1A :class:`SegmentIds` (seed + fingerprint locate the bundle). Verifies the bundle with
    ``bundle.verify_bundle`` (folder, index, flag format, flag digest), then re-hashes every
    ``outlet_catalogue`` part file against ``egress_checksums.json`` (same file set, same sha256) so a
    catalogue edited after validation is refused. Returns the ``_passed.flag`` path. Raises
    :class:`GateError` whose message begins ``No PASS -> no read:`` and names the bundle path."""
    import hashlib

    from engine.core import bundle

    data_root = Path(data_root)
    bdir = _bundle_dir(data_root, ids, config)
    bundle.verify_bundle(bdir)
    ck = bdir / "egress_checksums.json"
    try:
        doc = json.loads(ck.read_bytes())
    except (OSError, ValueError) as e:
        raise GateError("E_INDEX_INVALID", f"bundle {bdir}: egress_checksums.json unreadable ({e})", path=bdir) from e
    if str(doc.get("manifest_fingerprint")) != ids.manifest_fingerprint or str(doc.get("seed")) != str(ids.seed):
        raise GateError("E_PATH_EMBED_MISMATCH", f"bundle {bdir}: egress_checksums.json is for seed {doc.get('seed')} "
                        f"fingerprint {doc.get('manifest_fingerprint')}, not seed {ids.seed} fingerprint "
                        f"{ids.manifest_fingerprint}", path=bdir)
    D = _dictionary(config)
    cat_dir = data_root / D.path("outlet_catalogue", **ids.tokens())
    parts, _stray = _part_files(cat_dir, D.entry("outlet_catalogue").files)
    have = {}
    for p in parts:
        try:
            rel = p.resolve().relative_to(data_root.resolve()).as_posix()
        except ValueError:
            rel = p.as_posix()
        have[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    want = {str(f.get("path")): str(f.get("sha256_hex")) for f in doc.get("files", [])}
    if not want or have != want:
        diff = [f"missing: {k}" for k in sorted(set(want) - set(have))] + \
               [f"not validated: {k}" for k in sorted(set(have) - set(want))] + \
               [f"changed: {k}" for k in sorted(set(have) & set(want)) if have[k] != want[k]]
        raise GateError("E_EGRESS_CHECKSUM_MISMATCH", f"bundle {bdir}: outlet_catalogue files at {cat_dir} do not "
                        "match egress_checksums.json (the catalogue changed after validation)", path=bdir,
                        rows=diff or ["no outlet_catalogue files validated"])
    return bdir / "_passed.flag"


def read_outlet_catalogue_gated(data_root, ids, config: dict | None = None) -> pa.Table:
    """Gate (:func:`verify_1a_gate`), then read ``outlet_catalogue`` and re-check its embedded
    ``manifest_fingerprint`` and ``global_seed`` (00-core §5.3 step 5)."""
    import pyarrow.compute as pc

    verify_1a_gate(data_root, ids, config)
    D = _dictionary(config)
    cat_dir = Path(data_root) / D.path("outlet_catalogue", **ids.tokens())
    parts, _ = _part_files(cat_dir, D.entry("outlet_catalogue").files)
    t = _read_parts(parts)
    bad_fp = int(pc.sum(pc.cast(pc.not_equal(t.column("manifest_fingerprint"), ids.manifest_fingerprint),
                                pa.int64())).as_py() or 0)
    bad_seed = int(pc.sum(pc.cast(pc.not_equal(t.column("global_seed"), pa.scalar(ids.seed, pa.uint64())),
                                  pa.int64())).as_py() or 0)
    if bad_fp or bad_seed:
        raise GateError("E_PATH_EMBED_MISMATCH", f"{cat_dir}: {bad_fp} rows carry another manifest_fingerprint and "
                        f"{bad_seed} rows another global_seed than the gate verified", path=cat_dir)
    return t
