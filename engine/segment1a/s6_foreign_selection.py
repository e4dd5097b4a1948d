"""1A S6 — foreign-country selection by Gumbel-top-k (1A-S5-S9 §3, §7; decisions 13, 17).

For each merchant with a ``ztp_final`` (K_target) the foreign S3 candidates are weighted by the S5
weights of the merchant's currency κ (restricted to the candidates and renormalised over the
positive-weight ones), each candidate draws one uniform on its own keyed substream
(label ``gumbel_key``, ids ``(merchant_u64, country_iso)``), ``key = ln w̃ − ln(−ln u)``, and the
top ``K_realized = min(K_target, |Eligible|)`` keys are selected — ties by lower ``candidate_rank``
then ISO A→Z (decision 17). Fewer positive-weight candidates than K_target is a *shortfall*
(recorded, not an error).

Everything is vectorised over one flat array of (merchant, candidate) rows: one substream
derivation and one uniform per row, then one ``lexsort`` for the top-K.

Outputs: ``gumbel_key`` events (payload §7), ``s6_membership`` (when the policy emits it) and the
S6 receipt ``s6_receipt`` (``S6_VALIDATION.json`` + ``_passed.flag``).

Also home of the small vectorised helpers S7/S8 share (ISO <-> integer codes, segment sums,
event-table readers).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from engine.core.errors import EngineError, InputError, ModelError
from engine.core.hashing import file_sha256_hex
from engine.segment1a.s5_currency_weights import (
    FLAG_NAME,
    flag_text,
    is_int,
    load_strict_yaml,
    receipt_digest,
    schema_path,
    verify_receipt,
    write_json_file,
)

MODULE = "1A.foreign_country_selector"
LABEL = "gumbel_key"
FAMILY = "gumbel_key"
RECEIPT_NAME = "S6_VALIDATION.json"
RECEIPT_MEMBERS = [RECEIPT_NAME]
REASONS = ("NO_CANDIDATES", "K_ZERO", "ZERO_WEIGHT_DOMAIN", "CAPPED_BY_MAX_CANDIDATES")
R_NONE, R_NO_CAND, R_K_ZERO, R_ZERO_W, R_CAPPED = 0, 1, 2, 3, 4
_CCY_RE = re.compile(r"^[A-Z]{3}$")


# --------------------------------------------------------------------------------------------
# shared vectorised helpers
# --------------------------------------------------------------------------------------------


def _as_array(col) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def iso_codes(col) -> np.ndarray:
    """Order-preserving int16 code of two-letter upper-case codes: ``(c0-'A')*26 + (c1-'A')``.

    Accepts a pyarrow string array/column or a sequence of str. Raises ValueError on anything that
    is not exactly two ASCII capitals (callers validate first and raise their own code).
    """
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        arr = _as_array(col)
        if arr.type == pa.large_string():
            arr = arr.cast(pa.string())
        if isinstance(arr, pa.DictionaryArray):
            arr = arr.dictionary_decode()
        n = len(arr)
        if n == 0:
            return np.empty(0, np.int16)
        if arr.null_count:
            raise ValueError("null ISO code")
        off = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + n + 1]
        if not np.all(np.diff(off) == 2):
            raise ValueError("ISO code not of length 2")
        data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[off[0]: off[0] + 2 * n].reshape(n, 2)
    else:
        vals = list(col)
        n = len(vals)
        if n == 0:
            return np.empty(0, np.int16)
        if any(len(v) != 2 for v in vals):
            raise ValueError("ISO code not of length 2")
        data = np.frombuffer("".join(vals).encode("ascii"), dtype=np.uint8).reshape(n, 2)
    if np.any((data < 65) | (data > 90)):
        raise ValueError("ISO code not upper-case A-Z")
    return ((data[:, 0].astype(np.int16) - 65) * 26 + (data[:, 1].astype(np.int16) - 65)).astype(np.int16)


def iso_strings(codes: np.ndarray) -> pa.Array:
    """Inverse of :func:`iso_codes` as a pyarrow string array (built from buffers, no Python loop)."""
    codes = np.asarray(codes, dtype=np.int64)
    n = codes.shape[0]
    data = np.empty((n, 2), dtype=np.uint8)
    data[:, 0] = 65 + codes // 26
    data[:, 1] = 65 + codes % 26
    offsets = np.arange(0, 2 * n + 1, 2, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data.tobytes()))


_ISO_WORDS = np.array([chr(65 + c // 26) + chr(65 + c % 26) for c in range(676)], dtype=object)


def iso_list(codes: np.ndarray) -> list[str]:
    """ISO strings of :func:`iso_codes` values as a Python list (what ``rng.substreams_vec`` takes)."""
    return _ISO_WORDS[np.asarray(codes, dtype=np.int64)].tolist()


def fixed_strings(values: np.ndarray, width: int) -> pa.Array:
    """Zero-padded decimal strings of non-negative ints (``site_id = zfill6``) from buffers."""
    v = np.asarray(values, dtype=np.int64)
    n = v.shape[0]
    data = np.empty((n, width), dtype=np.uint8)
    x = v.copy()
    for j in range(width - 1, -1, -1):
        data[:, j] = 48 + (x % 10)
        x //= 10
    if np.any(x != 0) or np.any(v < 0):
        raise ValueError(f"value does not fit in {width} digits")
    offsets = np.arange(0, width * n + 1, width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data.tobytes()))


def constant_strings(value: str, n: int) -> pa.Array:
    b = value.encode("utf-8")
    L = len(b)
    data = np.tile(np.frombuffer(b, np.uint8), n) if n else np.empty(0, np.uint8)
    offsets = np.arange(0, L * n + 1, L, dtype=np.int32) if L else np.zeros(n + 1, np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data.tobytes()))


def segment_starts(sorted_group: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array (plus the end)."""
    n = sorted_group.shape[0]
    if n == 0:
        return np.zeros(1, np.int64)
    brk = np.nonzero(sorted_group[1:] != sorted_group[:-1])[0] + 1
    return np.concatenate(([0], brk, [n])).astype(np.int64)


def position_in_group(group: np.ndarray) -> np.ndarray:
    """0-based position of each row within its run of equal ``group`` values (rows grouped)."""
    n = group.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    starts[1:] = group[1:] != group[:-1]
    idx = np.arange(n, dtype=np.int64)
    first = np.maximum.accumulate(np.where(starts, idx, 0))
    return idx - first


@njit(cache=True)
def _segment_neumaier(v, g, out_s, out_c):
    for i in range(v.shape[0]):
        j = g[i]
        x = v[i]
        s = out_s[j]
        t = s + x
        if abs(s) >= abs(x):
            out_c[j] += (s - t) + x
        else:
            out_c[j] += (x - t) + s
        out_s[j] = t


def segment_sum(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group Neumaier sum in row order (fixed-order reduction; numeric policy)."""
    s = np.zeros(n_groups, np.float64)
    c = np.zeros(n_groups, np.float64)
    _segment_neumaier(np.ascontiguousarray(values, dtype=np.float64), np.ascontiguousarray(group, dtype=np.int64), s, c)
    return s + c


def lookup(sorted_keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each query in ``sorted_keys`` and a found mask."""
    if sorted_keys.shape[0] == 0:
        return np.zeros(query.shape[0], np.int64), np.zeros(query.shape[0], bool)
    pos = np.searchsorted(sorted_keys, query)
    pos_c = np.minimum(pos, sorted_keys.shape[0] - 1)
    found = sorted_keys[pos_c] == query
    return pos_c.astype(np.int64), found


def merchant_u64_rows(merchant_ids: np.ndarray) -> np.ndarray:
    """``merchant_u64`` per row, hashing each distinct merchant once."""
    from engine.core import rng

    u, inv = np.unique(np.asarray(merchant_ids, dtype=np.uint64), return_inverse=True)
    return rng.merchant_u64_vec(u)[inv.ravel()]


def col_u64(tbl: pa.Table, name: str) -> np.ndarray:
    a = _as_array(tbl.column(name))
    if a.type != pa.uint64():
        if pa.types.is_integer(a.type):
            if a.null_count or (len(a) and pc.min(a).as_py() < 0):
                raise InputError("E_SCHEMA_INVALID", f"column {name} holds negative or null ids")
            a = a.cast(pa.uint64())
        else:
            raise InputError("E_SCHEMA_INVALID", f"column {name} is {a.type}, expected uint64")
    return a.to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)


def col_i64(tbl: pa.Table, name: str) -> np.ndarray:
    a = _as_array(tbl.column(name))
    if a.null_count:
        raise InputError("E_SCHEMA_INVALID", f"column {name} holds nulls")
    return a.to_numpy(zero_copy_only=False).astype(np.int64)


def col_bool(tbl: pa.Table, name: str) -> np.ndarray:
    a = _as_array(tbl.column(name))
    if a.null_count:
        raise InputError("E_SCHEMA_INVALID", f"column {name} holds nulls")
    return a.to_numpy(zero_copy_only=False).astype(bool)


def read_columns(directory, columns: list[str]) -> pa.Table:
    """Only ``columns`` of a partition's ``part-*.parquet`` files (same file rules as
    ``publish.read_parquet_dir``: part files in name order). Reading the few columns a state needs
    keeps list columns such as S3's ``reason_codes`` off the hot path."""
    import pyarrow.parquet as pq

    from engine.core import publish

    d = Path(directory)
    if not d.is_dir():
        return publish.read_parquet_dir(d)  # raises E_PARTITION_MISSING
    parts = sorted(p for p in d.iterdir() if p.name.startswith("part-") and p.name.endswith(".parquet"))
    if not parts:
        return publish.read_parquet_dir(d)
    try:
        tables = [pq.ParquetFile(p).read(columns=columns) for p in parts]
    except (KeyError, pa.ArrowInvalid) as e:
        raise InputError("E_SCHEMA_INVALID", f"columns {columns} not readable: {e}", path=d) from e
    missing = [c for c in columns if c not in tables[0].column_names]
    if missing:
        raise InputError("E_SCHEMA_INVALID", f"columns missing: {missing}", path=d)
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_merchant_homes(ctx) -> tuple[np.ndarray, np.ndarray]:
    """The run's merchant universe from S0's ``hurdle_design_matrix`` (after any decision-11 drop):
    (merchant_id ascending, home ISO code). Checks the embedded ``parameter_hash`` (read discipline)."""
    path = ctx.path("hurdle_design_matrix")
    t = read_columns(path, ["merchant_id", "home_country_iso", "parameter_hash"])
    if t.num_rows:
        ph = pc.unique(t.column("parameter_hash")).to_pylist()
        if ph != [ctx.ids.parameter_hash]:
            raise InputError("E_PARTITION_MISMATCH", "embedded parameter_hash differs from the path token", path=path,
                             rows=[str(x) for x in ph[:10]])
    mid = col_u64(t, "merchant_id")
    try:
        home = iso_codes(t.column("home_country_iso"))
    except ValueError as e:
        raise InputError("E_SCHEMA_INVALID", f"home_country_iso: {e}", path=path) from e
    o = np.argsort(mid, kind="stable")
    mid, home = mid[o], home[o]
    if mid.shape[0] > 1 and np.any(mid[1:] == mid[:-1]):
        raise InputError("E_DUP_PK", "duplicate merchant_id in hurdle_design_matrix", path=path,
                         rows=[int(x) for x in np.unique(mid[1:][mid[1:] == mid[:-1]])[:10]])
    return mid, home


def read_family(ctx, family: str, required: bool = True) -> pa.Table | None:
    """RNG events of one family of this run (``rnglog.read_events``); ``None`` when absent."""
    from engine.core import rnglog

    try:
        t = rnglog.read_events(ctx.data_root, ctx.ids, family)
    except (FileNotFoundError, EngineError):
        if required:
            raise
        return None
    return t


def unique_sorted_u64(ids: np.ndarray, what: str, code: str, path=None) -> np.ndarray:
    """Sort and require uniqueness (one finaliser per merchant)."""
    s = np.sort(ids, kind="stable")
    if s.shape[0] and np.any(s[1:] == s[:-1]):
        d = np.unique(s[1:][s[1:] == s[:-1]])
        raise InputError(code, f"duplicate {what}", path=path, rows=[int(x) for x in d[:10]])
    return s


def load_ztp_final(ctx) -> tuple[np.ndarray, np.ndarray]:
    """(merchant_id ascending, K_target) from ``ztp_final`` events; duplicates -> E_UPSTREAM_GATE."""
    t = read_family(ctx, "ztp_final", required=False)
    if t is None or t.num_rows == 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    mid = col_u64(t, "merchant_id")
    K = col_i64(t, "K_target")
    o = np.argsort(mid, kind="stable")
    mid, K = mid[o], K[o]
    unique_sorted_u64(mid, "ztp_final per merchant", "E_UPSTREAM_GATE")
    if np.any(K < 0):
        raise InputError("E_UPSTREAM_GATE", "ztp_final with K_target < 0", rows=[int(x) for x in mid[K < 0][:10]])
    return mid, K


def load_nb_final(ctx) -> tuple[np.ndarray, np.ndarray]:
    """(merchant_id ascending, N) from ``nb_final`` events (multi-site merchants)."""
    t = read_family(ctx, "nb_final", required=False)
    if t is None or t.num_rows == 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    mid = col_u64(t, "merchant_id")
    N = col_i64(t, "n_outlets")
    o = np.argsort(mid, kind="stable")
    mid, N = mid[o], N[o]
    unique_sorted_u64(mid, "nb_final per merchant", "E_UPSTREAM_GATE")
    return mid, N


def load_candidate_set(ctx):
    """``s3_candidate_set`` as arrays sorted by (merchant_id, candidate_rank).

    Returns (merchant_id u64, iso code int16, candidate_rank int64, is_home bool) and checks
    one home per merchant at rank 0 (E_UPSTREAM_GATE otherwise).
    """
    path = ctx.path("s3_candidate_set")
    t = read_columns(path, ["merchant_id", "country_iso", "candidate_rank", "is_home"])
    mid = col_u64(t, "merchant_id")
    try:
        iso = iso_codes(t.column("country_iso"))
    except ValueError as e:
        raise InputError("E_UPSTREAM_GATE", f"s3_candidate_set: {e}", path=path) from e
    rank = col_i64(t, "candidate_rank")
    home = col_bool(t, "is_home")
    o = np.lexsort((rank, mid))
    mid, iso, rank, home = mid[o], iso[o], rank[o], home[o]
    # per merchant: exactly one home, at rank 0, ranks contiguous from 0
    pos = position_in_group(mid)
    bad = (rank != pos) | (home != (rank == 0))
    if np.any(bad):
        raise InputError(
            "E_UPSTREAM_GATE",
            "s3_candidate_set: home must be rank 0 and ranks contiguous per merchant",
            path=path,
            rows=[int(x) for x in np.unique(mid[bad])[:10]],
        )
    return mid, iso, rank, home


def currency_codes(values: list[str]) -> tuple[list[str], dict[str, int]]:
    u = sorted(set(values))
    return u, {c: i for i, c in enumerate(u)}


# --------------------------------------------------------------------------------------------
# policy
# --------------------------------------------------------------------------------------------


@dataclass
class SelectionPolicy:
    path: str
    emit_membership_dataset: bool
    log_all_candidates: bool
    default_cap: int
    default_zero_rule: str
    per_currency: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cap(self, ccy: str) -> int:
        return int(self.per_currency.get(ccy, {}).get("max_candidates_cap", self.default_cap))

    def zero_rule(self, ccy: str) -> str:
        return str(self.per_currency.get(ccy, {}).get("zero_weight_rule", self.default_zero_rule))


def parse_selection_policy(doc: Any, path: str, currencies: set[str] | None = None) -> SelectionPolicy:
    """Validate ``s6_selection_policy.yaml`` (§3.1; ⚑10).

    Top level: ``defaults`` (required) and ``per_currency``. The runbook-era metadata keys
    ``policy_semver`` / ``policy_version`` are tolerated (strings; they never affect behaviour).
    Per-currency ``emit_membership_dataset`` must equal the default (the dataset is all or nothing,
    HEAD) -> ``E_POLICY_CONFLICT``. A per-currency block for a currency without weights can never
    apply -> ``E_POLICY_DOMAIN`` (decision 28).
    """
    if not isinstance(doc, dict):
        raise InputError("E_POLICY_SCHEMA", "S6 policy must be a mapping", path=path)
    errs: list[str] = []
    for k, v in doc.items():
        if k in ("policy_semver", "policy_version"):
            if not isinstance(v, str):
                errs.append(f"{k} must be a string")
        elif k not in ("defaults", "per_currency"):
            errs.append(f"unknown top-level key {k!r}")
    d = doc.get("defaults")
    if not isinstance(d, dict):
        errs.append("defaults block is required")
        d = {}
    req = ("emit_membership_dataset", "log_all_candidates", "max_candidates_cap", "zero_weight_rule")
    for k in req:
        if k not in d:
            errs.append(f"defaults.{k} is required")
    for k in d:
        if k not in req and k != "dp_score_print":
            errs.append(f"defaults: unknown key {k!r}")
    pc_ = doc.get("per_currency") or {}
    if not isinstance(pc_, dict):
        errs.append("per_currency must be a mapping")
        pc_ = {}
    for ccy, b in pc_.items():
        if not (isinstance(ccy, str) and _CCY_RE.match(ccy)):
            errs.append(f"per_currency: {ccy!r} is not an ISO 4217 code")
            continue
        if not isinstance(b, dict):
            errs.append(f"per_currency.{ccy} must be a mapping")
            continue
        for k in b:
            if k not in ("emit_membership_dataset", "max_candidates_cap", "zero_weight_rule"):
                errs.append(f"per_currency.{ccy}: key {k!r} not allowed")
    if errs:
        raise InputError("E_POLICY_SCHEMA", "S6 selection policy does not match its schema", path=path, rows=errs)

    dom: list[str] = []

    def chk(where: str, k: str, v: Any) -> None:
        if k in ("emit_membership_dataset", "log_all_candidates") and not isinstance(v, bool):
            dom.append(f"{where}.{k} must be a boolean, got {v!r}")
        if k == "max_candidates_cap" and not (is_int(v) and 0 <= v < 2**32):
            dom.append(f"{where}.{k} must be a uint32, got {v!r}")
        if k == "zero_weight_rule" and v not in ("exclude", "include"):
            dom.append(f"{where}.{k} must be 'exclude' or 'include', got {v!r}")
        if k == "dp_score_print" and not (is_int(v) and 0 <= v <= 18):
            dom.append(f"{where}.{k} must be an integer in 0..18, got {v!r}")

    for k, v in d.items():
        chk("defaults", k, v)
    for ccy, b in pc_.items():
        for k, v in b.items():
            chk(f"per_currency.{ccy}", k, v)
        if currencies is not None and ccy not in currencies:
            dom.append(f"per_currency.{ccy}: currency has no S5 weights, the rule can never apply")
    if dom:
        raise InputError("E_POLICY_DOMAIN", "S6 selection policy values out of domain", path=path, rows=dom)
    conflicts = [
        f"per_currency.{c}.emit_membership_dataset = {b['emit_membership_dataset']} != defaults"
        for c, b in pc_.items()
        if "emit_membership_dataset" in b and b["emit_membership_dataset"] != d["emit_membership_dataset"]
    ]
    if conflicts:
        raise InputError("E_POLICY_CONFLICT", "membership dataset is all-or-nothing", path=path, rows=conflicts)
    return SelectionPolicy(
        path=path,
        emit_membership_dataset=bool(d["emit_membership_dataset"]),
        log_all_candidates=bool(d["log_all_candidates"]),
        default_cap=int(d["max_candidates_cap"]),
        default_zero_rule=str(d["zero_weight_rule"]),
        per_currency={k: dict(v) for k, v in pc_.items()},
    )


def load_selection_policy(ctx, currencies: set[str] | None = None) -> SelectionPolicy:
    p = ctx.config["segment1a"]["parameters"]["s6_selection_policy.yaml"]
    return parse_selection_policy(load_strict_yaml(p, "E_POLICY_SCHEMA"), p, currencies)


# --------------------------------------------------------------------------------------------
# compute (pure)
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _gumbel_kernel(w, u, out):
    for i in range(w.shape[0]):
        if w[i] > 0.0:
            out[i] = math.log(w[i]) - math.log(-math.log(u[i]))
        else:
            out[i] = math.nan


def gumbel_keys(w_tilde: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``ln w̃ − ln(−ln u)`` in binary64, evaluated in that order with libm ``log`` (numba, no
    fastmath — the same maths as ``engine.core._kernels.gumbel_kernel``); NaN where w̃ == 0
    (key null: never selectable)."""
    w = np.ascontiguousarray(w_tilde, dtype=np.float64)
    uu = np.ascontiguousarray(u, dtype=np.float64)
    out = np.empty(w.shape[0], np.float64)
    _gumbel_kernel(w, uu, out)
    return out


def select_top_k(group: np.ndarray, keys: np.ndarray, cand_rank: np.ndarray, iso: np.ndarray, k_real: np.ndarray):
    """Top-K per group (decision 17): key descending, then lower candidate_rank, then ISO A→Z.

    ``group`` = dense group index per row, ``keys`` NaN for non-selectable rows (never chosen),
    ``k_real`` = number to select per group. Returns (selected bool, selection_order int64, 0 if not).
    """
    n = keys.shape[0]
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64)
    selectable = ~np.isnan(keys)
    neg = np.where(selectable, -keys, np.inf)  # selectable keys are finite: null keys sort last
    o = np.lexsort((iso, cand_rank, neg, group))
    g_sorted = group[o]
    pos = position_in_group(g_sorted)
    sel_sorted = (pos < k_real[g_sorted]) & selectable[o]
    selected = np.zeros(n, bool)
    selected[o] = sel_sorted
    order = np.zeros(n, np.int64)
    order[o] = np.where(sel_sorted, pos + 1, 0)
    return selected, order


@dataclass
class S6Frame:
    """Flat per-(merchant, considered candidate) rows and per-merchant summaries."""

    merchants: np.ndarray  # u64, ascending: every merchant with a ztp_final
    K_target: np.ndarray
    A: np.ndarray
    A_filtered: np.ndarray
    n_eligible: np.ndarray
    K_realized: np.ndarray
    reason: np.ndarray  # R_* codes
    cap_applied: np.ndarray
    # rows (only for merchants that draw), in (merchant, candidate_rank) order
    row_m: np.ndarray  # index into merchants
    row_iso: np.ndarray
    row_rank: np.ndarray
    row_w: np.ndarray  # cache weight
    row_wt: np.ndarray  # renormalised weight
    row_eligible: np.ndarray


def build_frame(
    merchants: np.ndarray,
    K_target: np.ndarray,
    kappa_idx: np.ndarray,
    cand_mid: np.ndarray,
    cand_iso: np.ndarray,
    cand_rank: np.ndarray,
    cand_home: np.ndarray,
    w_keys: np.ndarray,
    w_vals: np.ndarray,
    caps: np.ndarray,
    include_zero: np.ndarray,
) -> S6Frame:
    """§3.2 steps 1-6 vectorised.

    ``merchants`` ascending u64 with their K_target and κ index; candidate arrays sorted by
    (merchant, rank); ``w_keys`` = sorted ``κ_idx*676 + iso`` of the weights cache with ``w_vals``;
    ``caps`` / ``include_zero`` per κ index.
    """
    nm = merchants.shape[0]
    mi, found_m = lookup(merchants, cand_mid)
    keep = found_m & ~cand_home
    r_m = mi[keep]
    r_iso = cand_iso[keep].astype(np.int64)
    r_rank = cand_rank[keep]
    A = np.bincount(r_m, minlength=nm).astype(np.int64)
    # step 2: cap = rank prefix of the foreign list
    kap = kappa_idx[r_m]
    cap = caps[kap]
    pos = position_in_group(r_m)
    in_cap = (cap == 0) | (pos < cap)
    cap_applied = np.zeros(nm, bool)
    cap_applied[r_m[~in_cap]] = True
    # step 3: candidates with a cache row for κ; zero weights dropped unless include
    wi, has_w = lookup(w_keys, kap.astype(np.int64) * 676 + r_iso)
    w = np.where(has_w, w_vals[wi] if w_vals.shape[0] else 0.0, 0.0)
    considered = in_cap & has_w & ((w > 0) | include_zero[kap])
    eligible = considered & (w > 0)
    A_f = np.bincount(r_m[considered], minlength=nm).astype(np.int64)
    n_el = np.bincount(r_m[eligible], minlength=nm).astype(np.int64)
    # step 5: deterministic empties, reason precedence
    reason = np.full(nm, R_NONE, np.int8)
    reason[cap_applied] = R_CAPPED
    reason[n_el == 0] = R_ZERO_W
    reason[K_target == 0] = R_K_ZERO
    reason[A == 0] = R_NO_CAND
    active = (A > 0) & (K_target > 0) & (n_el > 0)
    K_real = np.where(active, np.minimum(K_target, n_el), 0)
    # rows that draw: considered candidates of active merchants
    take = considered & active[r_m]
    r_m, r_iso, r_rank, w, el = r_m[take], r_iso[take], r_rank[take], w[take], eligible[take]
    W = segment_sum(np.where(el, w, 0.0), r_m, nm)
    wt = np.where(el, w / np.where(W[r_m] > 0, W[r_m], 1.0), 0.0)
    return S6Frame(merchants, K_target, A, A_f, n_el, K_real, reason, cap_applied,
                   r_m, r_iso.astype(np.int16), r_rank, w, wt, el)


def draw_and_select(frame: S6Frame, M: bytes):
    """One keyed substream + one uniform per row; keys; top-K. Returns dict of row arrays."""
    from engine.core import rng, samplers

    mu = merchant_u64_rows(frame.merchants[frame.row_m])  # only merchants that draw
    key, hi, lo = rng.substreams_vec(M, "1A", LABEL, mu, iso=iso_list(frame.row_iso))
    # one block, low lane (blocks 1, draws 1); w̃ = 0 (include mode) still consumes its uniform
    g, u, hi_a, lo_a = samplers.gumbel_key_vec(key, hi, lo, frame.row_wt)
    g = np.where(frame.row_wt > 0, g, np.nan)  # key null: never selectable
    if np.any(frame.row_eligible & ~np.isfinite(g)):
        raise ModelError("E_NUMERIC_POLICY", "non-finite Gumbel key for a positive weight")
    sel, order = select_top_k(frame.row_m, g, frame.row_rank, frame.row_iso, frame.K_realized)
    return {"u": u, "key": g, "hi": hi, "lo": lo, "hi_a": hi_a, "lo_a": lo_a, "selected": sel, "order": order}


def rederive_ok(frame: S6Frame, d: dict) -> bool:
    """Independent invariant check of the selection (§3.4): cardinality = K_realized per merchant;
    zero weight never selected; every selected key >= every unselected eligible key of its merchant;
    selection orders 1..K_realized."""
    nm = frame.merchants.shape[0]
    sel = d["selected"]
    if np.any(sel & ~frame.row_eligible):
        return False
    cnt = np.bincount(frame.row_m[sel], minlength=nm)
    if not np.array_equal(cnt, frame.K_realized):
        return False
    g = d["key"]
    min_sel = np.full(nm, np.inf)
    np.minimum.at(min_sel, frame.row_m[sel], g[sel])
    unsel = frame.row_eligible & ~sel
    max_un = np.full(nm, -np.inf)
    np.maximum.at(max_un, frame.row_m[unsel], g[unsel])
    if np.any(max_un > min_sel):
        return False
    orders = d["order"][sel]
    ssum = np.bincount(frame.row_m[sel], weights=orders.astype(np.float64), minlength=nm)
    kk = frame.K_realized.astype(np.float64)
    return bool(np.all(ssum == kk * (kk + 1) / 2))


def histogram(k: np.ndarray) -> dict[str, int]:
    return {
        "b0": int(np.sum(k == 0)),
        "b1": int(np.sum(k == 1)),
        "b2": int(np.sum(k == 2)),
        "b3_5": int(np.sum((k >= 3) & (k <= 5))),
        "b6_10": int(np.sum((k >= 6) & (k <= 10))),
        "b11_plus": int(np.sum(k >= 11)),
    }


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def _weights_lookup(wt: pa.Table) -> tuple[list[str], dict[str, int], np.ndarray, np.ndarray]:
    cur = [str(x) for x in wt.column("currency").to_pylist()]
    curs, cidx = currency_codes(cur)
    ci = np.array([cidx[c] for c in cur], dtype=np.int64)
    iso = iso_codes(wt.column("country_iso")).astype(np.int64)
    keys = ci * 676 + iso
    vals = wt.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    o = np.argsort(keys, kind="stable")
    return curs, cidx, keys[o], vals[o]


def merchant_kappa(ctx, merchants: np.ndarray, cidx: dict[str, int]) -> np.ndarray:
    """κ index per merchant from ``merchant_currency`` (§3.1: missing -> E_UPSTREAM_GATE,
    κ without weights -> E_S5_CONTENT)."""
    path = ctx.path("merchant_currency")
    mc = read_columns(path, ["merchant_id", "kappa"])
    mid = col_u64(mc, "merchant_id")
    enc = _as_array(mc.column("kappa")).dictionary_encode()
    words = [str(x) for x in enc.dictionary.to_pylist()]
    code = np.array([cidx.get(w, -1) for w in words], dtype=np.int64)
    kidx = code[enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)] if len(words) else np.zeros(0, np.int64)
    o = np.argsort(mid, kind="stable")
    mid, kidx = mid[o], kidx[o]
    pos, found = lookup(mid, merchants)
    if not np.all(found):
        raise InputError("E_UPSTREAM_GATE", "merchants without a merchant_currency row", path=path,
                         rows=[int(x) for x in merchants[~found][:10]])
    k = kidx[pos] if pos.shape[0] else np.zeros(0, np.int64)
    if np.any(k < 0):
        bad = np.nonzero(k < 0)[0][:10]
        raise InputError("E_S5_CONTENT", "merchant currencies missing from the S5 weights cache", path=path,
                         rows=[int(merchants[i]) for i in bad],
                         detail={"currencies": sorted(w for w in words if w not in cidx)})
    return k


def run(ctx) -> None:
    from engine.core import publish, rng, rnglog
    from engine.core.schema import arrow_schema, validate_table
    from engine.segment1a.s5_currency_weights import read_weights

    wt = read_weights(ctx)  # verifies the S5 flag first
    curs, cidx, w_keys, w_vals = _weights_lookup(wt)
    policy = load_selection_policy(ctx, set(curs))

    z_mid, z_K = load_ztp_final(ctx)
    c_mid, c_iso, c_rank, c_home = load_candidate_set(ctx)

    # gates (§3.1)
    el = read_columns(ctx.path("crossborder_eligibility_flags"), ["merchant_id", "is_eligible"])
    e_mid = col_u64(el, "merchant_id")
    e_ok = col_bool(el, "is_eligible")
    o = np.argsort(e_mid, kind="stable")
    e_mid, e_ok = e_mid[o], e_ok[o]
    s3_merchants = np.unique(c_mid)
    _, has_flag = lookup(e_mid, s3_merchants)
    if not np.all(has_flag):
        raise InputError("E_UPSTREAM_GATE", "s3_candidate_set merchants without an eligibility flag row",
                         rows=[int(x) for x in s3_merchants[~has_flag][:10]])
    pz, fz = lookup(e_mid, z_mid)
    bad = ~fz | ~np.where(fz, e_ok[pz], False)
    if np.any(bad):
        raise InputError("E_UPSTREAM_GATE", "ztp_final for a merchant that is not cross-border eligible",
                         rows=[int(x) for x in z_mid[bad][:10]])
    _, in_s3 = lookup(s3_merchants, z_mid)
    if not np.all(in_s3):
        raise InputError("E_UPSTREAM_GATE", "ztp_final for a merchant without an S3 candidate set",
                         rows=[int(x) for x in z_mid[~in_s3][:10]])
    nb_mid, _N = load_nb_final(ctx)
    pe, fe = lookup(e_mid, s3_merchants)
    _, is_multi = lookup(nb_mid, s3_merchants)
    need = s3_merchants[fe & e_ok[pe] & is_multi]
    _, has_final = lookup(z_mid, need)
    if not np.all(has_final):
        ex = read_family(ctx, "ztp_retry_exhausted", required=False)
        aborted = np.empty(0, np.uint64)
        if ex is not None and ex.num_rows:
            ab = col_bool(ex, "aborted") if "aborted" in ex.column_names else np.ones(ex.num_rows, bool)
            aborted = np.sort(col_u64(ex, "merchant_id")[ab])
        _, was_aborted = lookup(aborted, need)
        miss = ~has_final & ~was_aborted
        if np.any(miss):
            raise InputError("E_UPSTREAM_GATE", "eligible multi-site merchants without a ztp_final",
                             rows=[int(x) for x in need[miss][:10]])

    kap = merchant_kappa(ctx, z_mid, cidx)
    caps = np.array([policy.cap(c) for c in curs], dtype=np.int64)
    incl = np.array([policy.zero_rule(c) == "include" for c in curs], dtype=bool)
    frame = build_frame(z_mid, z_K, kap, c_mid, c_iso, c_rank, c_home, w_keys, w_vals, caps, incl)

    M = rng.master_material("1A", ctx.ids.fingerprint_bytes, ctx.ids.seed)
    d = draw_and_select(frame, M)
    ok = rederive_ok(frame, d)
    if not ok:
        raise ModelError("E_S6_MEMBERSHIP_MISMATCH", "S6 re-derivation of the top-K selection failed")

    # membership (validated before any log is written: guard-before-emit)
    sel = d["selected"]
    memb = pa.table({
        "merchant_id": pa.array(frame.merchants[frame.row_m[sel]], pa.uint64()),
        "country_iso": iso_strings(frame.row_iso[sel]),
        "seed": pa.array(np.full(int(sel.sum()), ctx.ids.seed, dtype=np.uint64), pa.uint64()),
        "parameter_hash": constant_strings(ctx.ids.parameter_hash, int(sel.sum())),
        "produced_by_fingerprint": constant_strings(ctx.ids.manifest_fingerprint, int(sel.sum())),
    })
    probs = validate_table(memb, schema_path(ctx, "s6_membership"))
    if probs:
        raise ModelError("E_SCHEMA_AUTHORITY", "s6_membership does not match its schema", rows=probs)

    # events (rows already in (merchant_id, candidate_rank) order)
    ev = np.ones(frame.row_m.shape[0], bool) if policy.log_all_candidates else d["selected"]
    n_ev = int(ev.sum())
    mids = frame.merchants[frame.row_m[ev]]
    key_col = d["key"][ev]
    order_col = d["order"][ev]
    cols = {
        "merchant_id": mids,
        "before_hi": d["hi"][ev],
        "before_lo": d["lo"][ev],
        "after_hi": d["hi_a"][ev],
        "after_lo": d["lo_a"][ev],
        "blocks": np.ones(n_ev, np.uint64),
        "draws": np.ones(n_ev, np.uint64),
        "country_iso": iso_strings(frame.row_iso[ev]),
        "weight": frame.row_wt[ev],
        "u": d["u"][ev],
        "key": pa.array(key_col, pa.float64(), mask=np.isnan(key_col)),
        "selected": d["selected"][ev],
        "selection_order": pa.array(order_col, pa.int64(), mask=order_col == 0),
    }
    logs = rnglog.RngLogs(ctx.data_root, ctx.segment, ctx.ids)
    logs.add_events(FAMILY, MODULE, LABEL, cols)
    summary = logs.close()
    written = int(summary.get("events", {}).get(FAMILY, {}).get("events", 0))
    touched = [tuple(k) for k in summary.get("trace_keys", [])]
    trace_ok = written == n_ev
    isolation_ok = set(touched) <= {(MODULE, LABEL)} and set(summary.get("events", {})) <= {FAMILY}
    if not (trace_ok and isolation_ok):
        raise ModelError("E_EVENT_COVERAGE", "S6 RNG logs do not match the selection",
                         detail={"events_expected": n_ev, "events_written": written, "trace_keys": touched})

    reason_counts = {name: int(np.sum(frame.reason == i + 1)) for i, name in enumerate(REASONS)}
    shortfall = (frame.K_realized > 0) & (frame.K_realized < frame.K_target)
    receipt = {
        "seed": ctx.ids.seed,
        "parameter_hash": ctx.ids.parameter_hash,
        "run_id": ctx.ids.run_id,
        "manifest_fingerprint": ctx.ids.manifest_fingerprint,
        "producer": MODULE,
        "policy_digest": file_sha256_hex(policy.path),
        "merchants_processed": int(frame.merchants.shape[0]),
        "merchants_drawing": int(np.sum(frame.K_realized > 0)),
        "events_written": written,
        "gumbel_key_expected": int(frame.row_m.shape[0] if policy.log_all_candidates else sel.sum()),
        "gumbel_key_written": n_ev,
        "trace_events": n_ev,
        "membership_rows": int(sel.sum()),
        "emit_membership_dataset": policy.emit_membership_dataset,
        "log_all_candidates": policy.log_all_candidates,
        "shortfall_count": int(shortfall.sum()),
        "reason_code_counts": reason_counts,
        "selection_size_histogram": histogram(frame.K_realized[frame.K_target > 0]),
        "s6.run.K_target_total": int(frame.K_target.sum()),
        "s6.run.K_realized_total": int(frame.K_realized.sum()),
        "rng_isolation_ok": isolation_ok,
        "trace_reconciled": trace_ok,
        "re_derivation_ok": ok,
    }
    code = "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL"
    if policy.emit_membership_dataset:
        with publish.staged(ctx.path("s6_membership"), code) as tmp:
            publish.write_parquet(memb, tmp / "part-00000.parquet", sort_by=["merchant_id", "country_iso"],
                                  schema=arrow_schema(schema_path(ctx, "s6_membership")))
    with publish.staged(ctx.path("s6_receipt"), code) as tmp:
        write_json_file(receipt, tmp / RECEIPT_NAME)
        (tmp / FLAG_NAME).write_bytes(flag_text(receipt_digest(tmp, RECEIPT_MEMBERS)))


# --------------------------------------------------------------------------------------------
# membership read-back (S7, S8, S9)
# --------------------------------------------------------------------------------------------


def read_membership(ctx) -> tuple[np.ndarray, np.ndarray]:
    """Selected (merchant_id, iso code) pairs sorted by merchant then ISO.

    Verifies the S6 flag first (no PASS -> no read); reads ``s6_membership`` when the policy emits
    it, else the ``gumbel_key`` events with ``selected = true`` (§4.1).
    """
    from engine.core import publish

    verify_receipt(ctx.path("s6_receipt"), RECEIPT_MEMBERS, "S6")
    policy = load_selection_policy(ctx)
    if policy.emit_membership_dataset:
        t = publish.read_parquet_dir(ctx.path("s6_membership"))
        mid = col_u64(t, "merchant_id")
        iso = iso_codes(t.column("country_iso"))
    else:
        t = read_family(ctx, FAMILY, required=False)
        if t is None or t.num_rows == 0:
            return np.empty(0, np.uint64), np.empty(0, np.int16)
        s = col_bool(t, "selected")
        mid = col_u64(t, "merchant_id")[s]
        iso = iso_codes(t.column("country_iso"))[s]
    o = np.lexsort((iso, mid))
    return mid[o], iso[o]


__all__ = [
    "run", "read_membership", "parse_selection_policy", "load_selection_policy", "select_top_k", "gumbel_keys",
    "build_frame", "draw_and_select", "iso_codes", "iso_strings", "iso_list", "fixed_strings", "constant_strings",
    "segment_sum", "lookup", "position_in_group", "load_ztp_final", "load_nb_final", "load_candidate_set",
    "read_family", "read_columns", "read_merchant_homes", "merchant_u64_rows", "merchant_kappa",
]
