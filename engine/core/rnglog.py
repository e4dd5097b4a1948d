"""RNG logs: audit, events, trace -- writing (vectorised), reading (u64-exact) and reconciliation.

Layout (decision 2; templates in the dictionaries' shared section)::

    logs/rng/audit/seed=/parameter_hash=/run_id=/rng_audit_log.jsonl
    logs/rng/events/<family>/seed=/parameter_hash=/run_id=/part-NNNNN.jsonl
    logs/rng/trace/seed=/parameter_hash=/run_id=/rng_trace_log.jsonl

Writing -- :class:`RngLogs` ``(data_root, segment, ids, config=None)``:

* :meth:`RngLogs.write_audit` ``(build_commit=..., **optional)`` -- the 00-core 3.7 audit row
  (``algorithm = "philox2x64-10"``; ``build_commit`` = code digest hex, decision 3). If a row of this run
  with the same non-``ts_utc`` fields exists, nothing is written.
* :meth:`RngLogs.add_events` ``(family, module, label, columns, part=0)`` -- columns is a dict of equal-length
  arrays: ``before_hi, before_lo, after_hi, after_lo, blocks, draws`` (u64), ``merchant_id`` when the family
  is merchant-scoped, and the family payload (typed by the family schema; ``None`` / NaN -> null; a scalar
  is broadcast). Rows must already be in writer order. The audit row must exist
  (``RngError("E_RNG_AUDIT_MISSING")``); module/label must be a registered pair of the family
  (``E_RNG_ENVELOPE``); counters, budgets and payload are checked before anything is written
  (``E_RNG_COUNTER_MISMATCH``, ``E_RNG_BUDGET_VIOLATION``, ``E_NONCONSUMING_CHANGED_COUNTERS``, ``E_RNG_ENVELOPE``).
* :meth:`RngLogs.close` -- writes each ``(family, part)`` as ``part-NNNNN.jsonl`` (temp + rename; a re-run
  replaces its own part) and its columnar mirror, then adds one cumulative trace row per event, in event
  order, under a lock. When none of the writer's ``(module, substream_label)`` keys is in the trace yet (a
  byte search for its labels: the normal first run of a state) the rows are appended -- O(new rows), not
  O(trace); otherwise (a re-run, or a torn tail left by a crash) the trace is rewritten atomically without
  those keys' rows (and without a torn last line) before the new ones: a re-run never double counts. One
  ``ts_utc`` per close. Use one writer per state execution for all events of a key.
  ``with RngLogs(...) as logs:`` closes on success and discards on an exception.

Lines are canonical JSON (sorted keys, compact, ASCII): envelope (00-core 3.6) + payload at top level;
u64 exact, ``draws`` a decimal string, floats via ``repr`` (shortest round trip), booleans/nulls as JSON;
an optional field that is null is omitted (e.g. ``selection_order`` present iff selected).
Rendering: one numba kernel per chunk (GIL released) formats u64/i64/bools and copies keys, constants and
pre-rendered float/string text (Arrow float->string, fixed up to ``repr`` layout); a large chunk is rendered as
two halves in two threads (the second moved onto the first's end: same bytes, same order). While chunk k+1
renders, one helper thread writes chunk k and another hashes it. Files are written with ``O_DIRECT`` where the
file system allows it (:mod:`engine.core._direct_io`; buffered otherwise): at GBs per state the page-cache copy
and page allocation of buffered writes cost more system time than the device; chunks are placed in page-aligned
buffers at the file offset's phase so whole blocks go to the device without a copy. A part's mirror is encoded
in the background while the trace is written. ``close(progress=...)`` reports lines written.

Columnar mirrors (a cache, never the authority): beside each part, ``_mirror.part-NNNNN.parquet`` holds the
same rows typed by the family schema plus the size and sha256 of the exact JSONL bytes; beside the trace,
``_mirror.rng_trace_log.<start>.parquet`` segments each cover one appended byte range with its sha256.
Names start with ``_`` so readers of the log directories ignore them (00-core 2.2). Each mirror also records
the JSONL's stat (device, inode, size, mtime, ctime) after the writer's rename / append. A reader uses a mirror
only when the JSONL provably still has the mirrored bytes: by default (``verify="stat"``) when its stat is
exactly the recorded one (any change of the bytes sets a new ctime -- the writer waits past the timestamp tick
before returning -- and a copied root has new inodes), else when the bytes hash to the recorded sha256 (a
changed, truncated or replaced JSONL is parsed). The trace's appenders chain this: an appender that finds the
file with exactly the stat the previous segment recorded carries that segment's ``stat_chain`` (the ranges it
vouches for) into its own. ``verify="sha256"`` (or ``ENGINE_RNGLOG_VERIFY=sha256``) always hashes; per
process, the digest of a file unchanged for > 2 s is remembered (keyed by its stat, ctime included).
The writer produces mirror and JSONL from the same typed columns; tests hold ``source="auto"`` equal to
``source="jsonl"`` for every family.

Measured at 10^6 events (``benchmarks/bench_rnglog.py``, 2-core shared box): writing ~250k-400k events/s
wall including the trace rows and mirrors (first run of a key); ``read_events`` of an unchanged part reads only
its mirror (the GBs of JSONL are neither hashed nor read); with hashing ~1.5-2.5M events/s vs ~300k/s parsing
the JSONL; ``read_trace`` ~3M rows/s.

Reading -- :func:`read_events` ``(data_root, ids, family, columns=None, config=None, with_source=False,
source="auto")`` (explicit Arrow schema from the family schema, u64 exact, parts concatenated in part order),
:func:`read_trace` ``(..., source="auto")``, :func:`read_audit`, :func:`accounting` (per-family / per-stream
totals and final trace rows for ``rng_accounting.json``). ``source="jsonl"`` parses the JSONL files and
ignores the mirrors (a full independent audit of the text, e.g. ``engine audit``); ``verify=`` (``"stat"`` /
``"sha256"``) chooses how a mirror is proved current (see above).

``read_events`` / ``read_trace`` with ``dictionary=True`` keep the mirrors' dictionary-encoded string columns
(envelope constants, ISO codes) as stored instead of copying them per row; every check below accepts both forms
(string predicates are evaluated once per distinct value). :func:`prefetch_digests` starts the sha256 checks of a
run's mirrors in a background thread for a validator that reads the logs later.

Checking -- :func:`reconcile` ``(data_root, ids, families=None, chain=False, source="auto", events=None,
trace=None)`` (``events`` / ``trace``: tables the caller already read) returns failure dicts
``{code, family, module, substream_label, detail, rows}``: per event ``blocks == u128(after) - u128(before)``
(``E_RNG_COUNTER_MISMATCH``), fixed budgets (``E_RNG_BUDGET_VIOLATION``), non-consuming families keep their
counters (``E_NONCONSUMING_CHANGED_COUNTERS``), registered module/label/context (``E_SCHEMA_INVALID``),
embedded identities (``E_PATH_EMBED_MISMATCH``); per ``(module, substream_label)`` trace row count == event
count (``E_TRACE_COVERAGE_MISSING``) and final totals == event sums (``E_TRACE_TOTALS_MISMATCH``); audit row
present (``E_RNG_AUDIT_MISSING``); with ``chain=True`` consecutive consuming events of one keyed substream
chain (``E_RNG_COUNTER_MISMATCH``; proved in one pass when the events come grouped by substream, else by a sort).
:func:`check_events` and :func:`check_chains` do the per-table parts. ``reconcile`` is composed of public parts
a validator can call itself to stream the logs (one event table held at a time): :func:`reconciled_families`
(which families), :func:`summarise_events` (one family's table -> its check failures and per-key event sums),
:func:`summarise_trace` (the trace -> embed failures and per-key row count and final row) and
:func:`reconcile_summaries` (audit rows + those summaries -> reconcile's failure list, in its order).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import fcntl
import hashlib
import itertools
import json
import mmap
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from engine.core import _direct_io, dictionary
from engine.core.errors import RngError
from engine.core.publish import canonical_json_bytes
from engine.core.schema import arrow_schema, arrow_type, load_schema, validate_record, validate_table

ALGORITHM = "philox2x64-10"
_MASK32 = np.uint64(0xFFFFFFFF)
COUNTER_COLS = ("before_hi", "before_lo", "after_hi", "after_lo", "blocks", "draws")
ENVELOPE = (
    "ts_utc", "run_id", "seed", "parameter_hash", "manifest_fingerprint", "module", "substream_label",
    "rng_counter_before_lo", "rng_counter_before_hi", "rng_counter_after_lo", "rng_counter_after_hi",
    "blocks", "draws",
)
_ENV_FROM_COL = {
    "rng_counter_before_hi": "before_hi", "rng_counter_before_lo": "before_lo",
    "rng_counter_after_hi": "after_hi", "rng_counter_after_lo": "after_lo",
}
TRACE_SCHEMA_REF = "schemas/rng/rng_trace_log.schema.json"
AUDIT_SCHEMA_REF = "schemas/rng/rng_audit_log.schema.json"
MAX_ROWS = 10


def utc_now() -> str:
    """RFC-3339 UTC with exactly 6 fractional digits and ``Z`` (logs only; decision 5)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ====================================================================== JSON line rendering
# Lines are rendered by one numba kernel from a small "program" (one step per field, keys pre-sorted):
# constants and keys are copied from a byte blob, u64/i64 are formatted in the kernel, floats and strings
# arrive pre-rendered as JSON text (Arrow string buffers). This keeps the writer columnar and fast.
K_CONST, K_U64, K_I64, K_STR, K_QU64, K_BOOL = 0, 1, 2, 3, 4, 5
_VAL_BOUND = {K_U64: 20, K_I64: 20, K_QU64: 22, K_BOOL: 5}
_CHUNK_BYTES = 32 << 20  # rendering buffer per chunk
_PAR_MIN_ROWS = 20_000  # a chunk of at least this many lines is rendered as two halves in two threads
_RENDER_POOL: list = []


def _render_pool() -> ThreadPoolExecutor | None:
    """One helper thread rendering the second half of each large chunk (None on a one-core machine)."""
    if not _RENDER_POOL:
        _RENDER_POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnglog-render")
                            if (os.cpu_count() or 1) > 1 else None)
    return _RENDER_POOL[0]
_NEEDS_ESCAPE = r'["\\\x00-\x1f\x7f]|[^\x00-\x7f]'


_POW10 = np.array([10 ** i for i in range(20)], dtype=np.uint64)
_DIGITS2 = np.frombuffer(b"".join(b"%02d" % i for i in range(100)), dtype=np.uint8).copy()


@numba.njit(cache=True)
def _fmt_u64(out, pos, x):
    """Decimal text of a u64 at out[pos:]; returns the new position (two digits per division)."""
    pow10 = _POW10
    dig = _DIGITS2
    n = 1
    while n < 20 and x >= pow10[n]:
        n += 1
    p = pos + n
    while x >= np.uint64(100):
        q = x // np.uint64(100)
        r = np.int64(x - q * np.uint64(100)) * 2
        p -= 2
        out[p] = dig[r]
        out[p + 1] = dig[r + 1]
        x = q
    if x >= np.uint64(10):
        r = np.int64(x) * 2
        out[p - 2] = dig[r]
        out[p - 1] = dig[r + 1]
    else:
        out[p - 1] = np.uint8(np.uint64(48) + x)
    return pos + n


@numba.njit(cache=True, nogil=True)  # nogil: the next chunk renders while a thread writes/hashes this one
def _render(row0, row1, kinds, args, pre_start, pre_len, null_idx, omit, blob, u64cols, i64cols, svals, soffs,
            nulls, out):
    """Render rows [row0, row1) into ``out``; returns the byte count. Each step copies its prefix (commas,
    keys, merged constants) from ``blob`` and then writes its value; an omitted optional step writes nothing
    (if it was the line's first field, the next prefix loses its leading comma)."""
    pos = 0
    ns = kinds.shape[0]
    for r in range(row0, row1):
        out[pos] = 123  # {
        pos += 1
        strip = False
        for f in range(ns):
            isnull = False
            ni = null_idx[f]
            if ni >= 0:
                isnull = nulls[ni, r]
            if isnull and omit[f]:
                if f == 0:
                    strip = True
                continue
            ps = pre_start[f]
            pl = pre_len[f]
            if strip and pl > 0 and blob[ps] == 44:
                ps += 1
                pl -= 1
            strip = False
            out[pos:pos + pl] = blob[ps:ps + pl]
            pos += pl
            k = kinds[f]
            if k < 0:
                continue
            if isnull:
                out[pos] = 110
                out[pos + 1] = 117
                out[pos + 2] = 108
                out[pos + 3] = 108
                pos += 4
            elif k == 1:
                pos = _fmt_u64(out, pos, u64cols[args[f], r])
            elif k == 2:
                v = i64cols[args[f], r]
                if v < 0:
                    out[pos] = 45
                    pos += 1
                    pos = _fmt_u64(out, pos, np.uint64(-(v + 1)) + np.uint64(1))
                else:
                    pos = _fmt_u64(out, pos, np.uint64(v))
            elif k == 3:
                s = soffs[args[f], r]
                e = soffs[args[f], r + 1]
                out[pos:pos + (e - s)] = svals[s:e]
                pos += e - s
            elif k == 4:
                out[pos] = 34
                pos = _fmt_u64(out, pos + 1, u64cols[args[f], r])
                out[pos] = 34
                pos += 1
            else:
                if u64cols[args[f], r] != np.uint64(0):
                    out[pos] = 116
                    out[pos + 1] = 114
                    out[pos + 2] = 117
                    out[pos + 3] = 101
                    pos += 4
                else:
                    out[pos] = 102
                    out[pos + 1] = 97
                    out[pos + 2] = 108
                    out[pos + 3] = 115
                    out[pos + 4] = 101
                    pos += 5
    return pos


@numba.njit(cache=True, nogil=True)
def _float_flags(vals, offs, x, flags):
    """Per row: 0 = Arrow text is repr's text, 1 = repr adds ".0", 2 = needs repr (see _float_strings)."""
    nbad = 0
    for i in range(x.shape[0]):
        has_e = False
        has_dot = False
        for j in range(offs[i], offs[i + 1]):
            c = vals[j]
            if c == 101:
                has_e = True
            elif c == 46:
                has_dot = True
        ax = abs(x[i])
        if ax < 1e16 and not has_e and has_dot and ax >= 1e-4:
            flags[i] = 0
        elif ax < 1e16 and not has_e and not has_dot and x[i] == np.floor(x[i]):
            flags[i] = 1
        else:
            flags[i] = 2
            nbad += 1
    return nbad


@numba.njit(cache=True, nogil=True)
def _float_assemble(vals, offs, flags, rep_blob, rep_offs, out, out_offs):
    pos = 0
    k = 0
    for i in range(flags.shape[0]):
        out_offs[i] = pos
        f = flags[i]
        if f == 2:
            s = rep_offs[k]
            e = rep_offs[k + 1]
            k += 1
            for j in range(e - s):
                out[pos + j] = rep_blob[s + j]
            pos += e - s
        else:
            s = offs[i]
            e = offs[i + 1]
            for j in range(e - s):
                out[pos + j] = vals[s + j]
            pos += e - s
            if f == 1:
                out[pos] = 46
                out[pos + 1] = 48
                pos += 2
    out_offs[flags.shape[0]] = pos
    return pos


def _string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values uint8, offsets int64 relative to values) of a string array without nulls."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4).astype(np.int64)
    vals = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return vals, offs


_FLOAT_PAR_MIN = 200_000  # values; from here the two halves are formatted in two threads


def _float_strings(values: np.ndarray) -> pa.Array:
    """JSON text of finite float64 values, byte-equal to Python ``repr`` (shortest round trip).

    Arrow's float->string cast gives the same shortest digits as ``repr`` but a different layout for
    exponent forms, integral values ("1" vs "1.0") and some magnitudes. Rows where ``repr`` uses fixed
    notation (1e-4 <= |x| < 1e16) and Arrow did too are kept; integral ones get ".0"; the rest (rare:
    |x| < 1e-4, |x| >= 1e16, or Arrow chose an exponent) are formatted by ``repr``. A large column is done as
    two halves in two threads (the Arrow cast and the kernels release the GIL), then concatenated."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    pool = _render_pool() if values.shape[0] >= _FLOAT_PAR_MIN else None
    if pool is None:
        return _float_strings_part(values)
    h = values.shape[0] // 2
    fut = pool.submit(_float_strings_part, values[h:])
    try:
        first = _float_strings_part(values[:h])
    finally:
        second = fut.result()
    return pa.concat_arrays([first, second])


def _float_strings_part(values: np.ndarray) -> pa.Array:
    n = values.shape[0]
    vals, offs = _string_buffers(pc.cast(pa.array(values, type=pa.float64()), pa.string()))
    flags = np.empty(n, dtype=np.int8)
    nbad = _float_flags(vals, offs, values, flags)
    reps = [float.__repr__(v).encode("ascii") for v in values[flags == 2].tolist()] if nbad else []
    rep_blob = np.frombuffer(b"".join(reps), dtype=np.uint8) if reps else np.zeros(0, np.uint8)
    rep_offs = np.zeros(len(reps) + 1, dtype=np.int64)
    if reps:
        np.cumsum([len(r) for r in reps], out=rep_offs[1:])
    out = np.empty(int(offs[-1] - offs[0]) + 2 * n + int(rep_offs[-1]), dtype=np.uint8)
    out_offs = np.empty(n + 1, dtype=np.int64)
    used = _float_assemble(vals, offs, flags, rep_blob, rep_offs, out, out_offs)
    return pa.StringArray.from_buffers(n, pa.py_buffer(out_offs.astype(np.int32)), pa.py_buffer(out[:used]))


def _json_strings(arr: pa.Array) -> pa.Array:
    """Per-row JSON text of a float / string / list Arrow array (nulls stay null)."""
    t = arr.type
    if pa.types.is_floating(t):
        vals = np.asarray(pc.fill_null(pc.cast(arr, pa.float64()), 0.0).to_numpy(zero_copy_only=False),
                          dtype=np.float64)
        if not np.isfinite(vals).all():
            raise ValueError("non-finite float cannot be written as JSON")
        s = _float_strings(vals)
        if arr.null_count:
            s = pc.if_else(pc.is_null(arr), pa.scalar(None, pa.string()), s)
        return s
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        esc = np.asarray(pc.fill_null(pc.match_substring_regex(arr, _NEEDS_ESCAPE), False)
                         .to_numpy(zero_copy_only=False), dtype=bool)
        quoted = pc.binary_join_element_wise('"', arr, '"', "")
        if esc.any():
            idx = np.flatnonzero(esc)
            rep = pa.array([json.dumps(arr[i].as_py(), ensure_ascii=True) for i in idx.tolist()], type=pa.string())
            quoted = pc.replace_with_mask(quoted, pa.array(esc), rep)
        return quoted
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        out = [None if v is None else json.dumps(v, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
               for v in arr.to_pylist()]
        return pa.array(out, type=pa.string())
    raise TypeError(f"unsupported Arrow type for JSON text: {t}")


def _scalar_json(v: Any) -> str:
    if isinstance(v, np.generic):
        v = v.item()
    return json.dumps(v, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _chunk_inputs(r0: int, r1: int, u64s: list, i64s: list, svals: list, soffs: list, null_rows: list) -> tuple:
    """Rows [r0, r1) of the plan's columns as :func:`_render`'s inputs: u64 / i64 / null matrices (one row per
    column), and the string columns' bytes concatenated with their offsets rebased onto that blob."""
    m = r1 - r0
    u64m = np.empty((len(u64s), m), np.uint64)
    for k, a in enumerate(u64s):
        u64m[k] = a[r0:r1]
    i64m = np.empty((len(i64s), m), np.int64)
    for k, a in enumerate(i64s):
        i64m[k] = a[r0:r1]
    nm = np.empty((len(null_rows), m), np.bool_)
    for k, a in enumerate(null_rows):
        nm[k] = a[r0:r1]
    so = np.empty((len(soffs), m + 1), np.int64)
    pieces = []
    base = 0
    for k, (v, o) in enumerate(zip(svals, soffs)):
        s0, s1 = int(o[r0]), int(o[r1])
        pieces.append(v[s0:s1])
        so[k] = o[r0:r1 + 1]
        so[k] += base - s0
        base += s1 - s0
    sv = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    return u64m, i64m, sv, so, nm


class _Plan:
    """Columnar description of n JSON lines; :meth:`chunks` renders them (sorted keys, compact, ASCII)."""

    def __init__(self, n: int):
        self.n = n
        self._fields: list[tuple] = []  # (name, kind, payload, nulls|None, omit)

    def const(self, name: str, value: Any) -> None:
        self._fields.append((name, K_CONST, _scalar_json(value).encode("ascii"), None, False))

    def u64(self, name: str, values: np.ndarray, quoted: bool = False) -> None:
        self._fields.append((name, K_QU64 if quoted else K_U64, np.ascontiguousarray(values, dtype=np.uint64),
                             None, False))

    def arrow(self, name: str, arr: pa.Array, omit_null: bool) -> None:
        """A typed Arrow column: ints/bools formatted in the kernel, floats/strings/lists pre-rendered."""
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        t = arr.type
        nulls = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool) if arr.null_count else None
        if pa.types.is_unsigned_integer(t):
            if t != pa.uint64() or arr.null_count:
                arr = pc.fill_null(pc.cast(arr, pa.uint64()), 0)
            vals = np.asarray(arr.to_numpy(zero_copy_only=False), np.uint64)
            self._fields.append((name, K_U64, vals, nulls, omit_null))
        elif pa.types.is_integer(t):
            if t != pa.int64() or arr.null_count:
                arr = pc.fill_null(pc.cast(arr, pa.int64()), 0)
            vals = np.asarray(arr.to_numpy(zero_copy_only=False), np.int64)
            self._fields.append((name, K_I64, vals, nulls, omit_null))
        elif pa.types.is_boolean(t):
            vals = np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool).astype(np.uint64)
            self._fields.append((name, K_BOOL, vals, nulls, omit_null))
        else:
            text = pc.fill_null(_json_strings(arr), "")
            self._fields.append((name, K_STR, text, nulls, omit_null))

    def chunks(self, on_rows: Any = None, phase: Any = None) -> Iterable[np.ndarray]:
        """Render all lines; yields byte chunks (numpy views of two page-aligned buffers used in turn: a chunk is
        valid until the generator is advanced twice more -- :func:`_write_stream` relies on exactly that).
        ``on_rows(n)`` is called with each chunk's line count (progress reporting). ``phase()`` (optional) gives
        the position inside its 4096-byte block of the file offset the next chunk will be written at; the chunk
        then starts at that offset of its buffer, so an ``O_DIRECT`` writer can write it without copying
        (:class:`engine.core._direct_io.SeqWriter`)."""
        n = self.n
        fields = sorted(self._fields, key=lambda f: f[0])
        blob = bytearray()
        steps: list[tuple] = []  # (prefix bytes, kind, arg, null_idx, omit)
        u64s: list[np.ndarray] = []
        i64s: list[np.ndarray] = []
        svals: list[np.ndarray] = []
        soffs: list[np.ndarray] = []
        null_rows: list[np.ndarray] = []
        bound = 3
        pending = b""
        for i, (name, kind, payload, nulls, om) in enumerate(fields):
            key = (b"," if i else b"") + json.dumps(name).encode("ascii") + b":"
            bound += len(key)
            if kind == K_CONST:
                pending += key + payload
                bound += len(payload)
                continue
            if kind in (K_U64, K_QU64, K_BOOL):
                arg = len(u64s)
                u64s.append(payload)
                width = _VAL_BOUND[kind]
            elif kind == K_I64:
                arg = len(i64s)
                i64s.append(payload)
                width = _VAL_BOUND[kind]
            else:
                v, o = _string_buffers(payload)
                arg = len(soffs)
                svals.append(v)
                soffs.append(o)
                width = int(np.diff(o).max()) if n else 0
            bound += max(width, 4)
            ni = -1
            if nulls is not None:
                ni = len(null_rows)
                null_rows.append(nulls)
            optional = bool(om and nulls is not None)
            if optional and pending:
                steps.append((pending, -1, 0, -1, False))
                pending = b""
            steps.append((pending + key, kind, arg, ni, optional))
            pending = b""
        steps.append((pending + b"}\n", -1, 0, -1, False))
        ns = len(steps)
        kinds = np.array([st[1] for st in steps], np.int64)
        args = np.array([st[2] for st in steps], np.int64)
        null_idx = np.array([st[3] for st in steps], np.int64)
        omit = np.array([st[4] for st in steps], np.bool_)
        pre_start = np.zeros(ns, np.int64)
        pre_len = np.zeros(ns, np.int64)
        for j, st in enumerate(steps):
            pre_start[j], pre_len[j] = len(blob), len(st[0])
            blob += st[0]
        blob_arr = np.frombuffer(bytes(blob), dtype=np.uint8)
        rows_per = max(1, _CHUNK_BYTES // bound)
        # two buffers used in turn: the consumer (_write_stream) writes chunk k while chunk k+1 renders
        cap = min(n, rows_per) * bound
        bufs = [_direct_io.aligned_empty(cap + _direct_io.BLOCK) for _ in range(1 if n <= rows_per else 2)]
        for i, r0 in enumerate(range(0, n, rows_per)):
            r1 = min(n, r0 + rows_per)
            ph = phase() if phase is not None else 0
            buf = bufs[i % len(bufs)][ph:ph + cap]
            # the chunk's rows of every column as the kernel's matrices (rows 0..m-1): chunk-sized copies reuse
            # warm memory, where whole-column matrices would fault in ~100 bytes per line of fresh pages
            m = r1 - r0
            u64m, i64m, sv, so, nm = _chunk_inputs(r0, r1, u64s, i64s, svals, soffs, null_rows)
            pool = _render_pool() if m >= _PAR_MIN_ROWS else None
            if pool is None:
                used = _render(0, m, kinds, args, pre_start, pre_len, null_idx, omit, blob_arr, u64m, i64m, sv,
                               so, nm, buf)
            else:
                # two halves at once (the kernel releases the GIL): the second renders at the first's worst-case
                # end and is moved down onto its actual end (memmove, ~1/10 of the rendering cost)
                rm = m // 2
                off2 = rm * bound
                fut = pool.submit(_render, rm, m, kinds, args, pre_start, pre_len, null_idx, omit, blob_arr, u64m,
                                  i64m, sv, so, nm, buf[off2:])
                try:
                    used1 = _render(0, rm, kinds, args, pre_start, pre_len, null_idx, omit, blob_arr, u64m, i64m,
                                    sv, so, nm, buf[:off2])
                finally:
                    used2 = fut.result()
                if used1 < off2 and used2:
                    addr = buf.__array_interface__["data"][0]
                    ctypes.memmove(addr + used1, addr + off2, used2)
                used = used1 + used2
            yield buf[:used]
            if on_rows is not None:
                on_rows(r1 - r0)


# ====================================================================== numeric helpers
def _u64(values: Any, name: str) -> np.ndarray:
    """A u64 column without passing through signed or float types (decision 12)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pc.cast(values, pa.uint64()).to_numpy(zero_copy_only=False)
    arr = np.asarray(values)
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype.kind == "i":
        if arr.size and arr.min() < 0:
            raise RngError("E_RNG_ENVELOPE", f"column {name} has negative values", rows=np.flatnonzero(arr < 0)[:10])
        return arr.astype(np.uint64)
    if arr.dtype.kind == "u":
        return arr.astype(np.uint64)
    if arr.dtype.kind in ("O", "U", "S"):
        try:
            return np.array([int(v) for v in arr.tolist()], dtype=np.uint64)
        except (TypeError, ValueError, OverflowError):
            raise RngError("E_RNG_ENVELOPE", f"column {name} is not u64") from None
    raise RngError("E_RNG_ENVELOPE", f"column {name} must be an unsigned/signed integer array, got {arr.dtype}")


def exact_sum(a: np.ndarray) -> int:
    """Exact sum of a u64 array as a Python int (split in 32-bit halves; no wrap-around)."""
    a = np.asarray(a, dtype=np.uint64)
    if a.size == 0:
        return 0
    hi = int((a >> np.uint64(32)).sum(dtype=np.uint64))
    lo = int((a & _MASK32).sum(dtype=np.uint64))
    return (hi << 32) + lo


def counter_delta_ok(before_hi, before_lo, after_hi, after_lo, blocks) -> np.ndarray:
    """Row mask of ``u128(after) - u128(before) == blocks`` (vectorised, u64 halves)."""
    borrow = (after_lo < before_lo).astype(np.uint64)
    d_lo = after_lo - before_lo
    d_hi = after_hi - before_hi - borrow
    return (d_hi == np.uint64(0)) & (d_lo == blocks)


def _budget_mask(spec: Mapping, blocks: np.ndarray, draws: np.ndarray) -> np.ndarray | None:
    """Row mask of events violating a fixed budget (None when the budget is variable)."""
    b = spec.get("budget")
    if not isinstance(b, Mapping):
        return None
    if "draws" in b:
        return (blocks != np.uint64(int(b["blocks"]))) | (draws != np.uint64(int(b["draws"])))
    allowed = np.array([int(x) for x in b.get("blocks", [])], dtype=np.uint64)
    bad = ~np.isin(blocks, allowed)
    if b.get("draws_equals_blocks"):
        bad |= draws != blocks
    return bad


# ====================================================================== paths
def _ids_tokens(ids: Any) -> dict:
    return {"seed": ids.seed, "parameter_hash": ids.parameter_hash,
            "manifest_fingerprint": ids.manifest_fingerprint, "run_id": ids.run_id}


def _dict_for(ids: Any, config: Mapping | None) -> dictionary.Dictionary:
    return dictionary.load(ids.segment, config)


def event_dir(data_root: str | Path, ids: Any, family: str, config: Mapping | None = None) -> Path:
    return Path(data_root) / _dict_for(ids, config).path("rng_event", family=family, **_ids_tokens(ids))


def trace_path(data_root: str | Path, ids: Any, config: Mapping | None = None) -> Path:
    return Path(data_root) / _dict_for(ids, config).path("rng_trace_log", **_ids_tokens(ids))


def audit_path(data_root: str | Path, ids: Any, config: Mapping | None = None) -> Path:
    return Path(data_root) / _dict_for(ids, config).path("rng_audit_log", **_ids_tokens(ids))


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive advisory lock on ``.<name>.lock`` beside ``path`` (concurrent states share trace/audit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class _Sink:
    """Byte sink of one file: writes chunks (to a file object or a :class:`_direct_io.SeqWriter`) and feeds the
    bytes at stream offsets >= ``hash_from`` to ``hasher``. ``next_offset``: file offset of the next chunk handed
    over (kept by :func:`_write_stream`); :meth:`phase` is what :meth:`_Plan.chunks` places chunks by."""

    def __init__(self, f, hasher=None, hash_from: int = 0):
        self.f, self.hasher, self.hash_from, self.pos = f, hasher, hash_from, 0
        self.next_offset = getattr(f, "pos", 0)

    def write(self, c: Any) -> None:
        self.f.write(c)

    def phase(self) -> int:
        ph = getattr(self.f, "phase", None)
        return ph(self.next_offset) if ph is not None else 0

    def hash(self, c: Any, pos: int) -> None:
        """Feed chunk ``c``, which starts at stream offset ``pos`` (chunks in order, one at a time)."""
        n = len(c)
        if self.hasher is not None and pos + n > self.hash_from:
            skip = max(0, self.hash_from - pos)
            self.hasher.update(memoryview(c)[skip:] if skip else c)

    def __call__(self, c: Any) -> None:
        self.write(c)
        self.hash(c, self.pos)
        self.pos += len(c)
        self.next_offset += len(c)


def _write_stream(sink: _Sink, chunks: Any) -> int:
    """Feed ``chunks`` to ``sink`` in two helper threads, one chunk behind the producer: the producer (the numba
    renderer, GIL released) makes chunk k+1 while chunk k is written by one thread and hashed by the other (file
    writes and sha256 release the GIL). Writing is usually throttled to the disk's speed, so the hash must not
    queue behind it. A chunk is handed over only after both are done with the previous one, which is all
    :meth:`_Plan.chunks` (two buffers in turn) needs, and keeps the hash in file order. ``chunks`` may be a
    callable ``chunks(phase)`` returning the iterable (``phase`` = :meth:`_Sink.phase`, for chunk placement).
    Returns the byte count."""
    total = 0
    if callable(chunks):
        chunks = chunks(sink.phase)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="rnglog-write") as ex:
        pending: list = []
        for c in chunks:
            for fut in pending:
                fut.result()
            pending = [ex.submit(sink.write, c)]
            if sink.hasher is not None:
                pending.append(ex.submit(sink.hash, c, sink.pos + total))
            total += len(c)
            sink.next_offset += len(c)
        for fut in pending:
            fut.result()
    sink.pos += total
    return total


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, chunks: Any, hasher=None, hash_from: int = 0, durable: bool = True,
                  direct: bool = True, stat_out: list | None = None) -> int:
    """Write chunks to ``_tmp.<name>.<hex>`` beside ``path``, fsync, rename over ``path``; returns the size.
    ``hasher`` (e.g. ``hashlib.sha256()``) receives the bytes from offset ``hash_from`` on. ``chunks``: an
    iterable, or a callable as :func:`_write_stream` takes. ``direct``: write with ``O_DIRECT`` where the file
    system allows it (:mod:`engine.core._direct_io`). ``stat_out``: receives the file's stat after the rename,
    settled (:func:`_settled_stat`; None when it cannot be trusted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"_tmp.{path.name}.{os.urandom(6).hex()}"
    try:
        fd, is_direct = _direct_io.open_fd(tmp, direct=direct)
        try:
            w = _direct_io.SeqWriter(fd, 0, is_direct)
            size = _write_stream(_Sink(w, hasher, hash_from), chunks)
            w.finish()
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if durable:
        _fsync_dir(path.parent)
    if stat_out is not None:
        stat_out.append(_settled_stat(path))
    return size


# ====================================================================== stat identity of a written file
# A writer records in each mirror the stat of the JSONL it mirrors, taken after its last write (rename / append).
# While the file keeps that exact (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) it still holds the bytes
# the writer wrote: any change of its bytes sets a new ctime (user space cannot set ctime; restoring size and
# mtime with utime sets ctime too), a copy or a replacement has another inode. A reader then trusts the mirror
# without hashing the GBs of JSONL (``verify="stat"``, the default); any difference and it hashes as before.
# Timestamps come from a clock that ticks coarsely (a jiffy; seconds on some file systems), so a change within
# the same tick as the writer's stat could keep the ctime: the writer waits until the clock has moved past the
# recorded ctime before returning (a few ms), and records no stat when it cannot be sure (the reader hashes).
VERIFY_MODES = ("stat", "sha256")
_CLOCK_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5 if os.uname().sysname == "Linux" else None)
_SETTLE_MAX_NS = 200_000_000


def _verify_mode(verify: str | None) -> str:
    """``verify`` or the process default (``ENGINE_RNGLOG_VERIFY``, else ``"stat"``)."""
    v = verify if verify is not None else os.environ.get("ENGINE_RNGLOG_VERIFY", "stat")
    if v not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {v!r}")
    return v


def _stat_record(st: os.stat_result) -> dict:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _stat_matches(rec: Any, st: os.stat_result) -> bool:
    return isinstance(rec, dict) and rec == _stat_record(st)


def _clock_ns() -> int:
    if _CLOCK_COARSE is not None:
        with contextlib.suppress(OSError, ValueError, OverflowError):
            return time.clock_gettime_ns(_CLOCK_COARSE)
    return time.time_ns() - 20_000_000  # no coarse clock: allow for a 20 ms tick


def _settled_stat(path: Path) -> dict | None:
    """Stat record of ``path`` once no later change can reproduce its timestamps (see above), else None.
    The file-system timestamp granularity is estimated from the trailing decimal zeros of ctime/mtime (an
    over-estimate only waits longer); the clock must pass ctime + granularity within 0.2 s."""
    try:
        st = path.stat()
    except OSError:
        return None
    g = 1
    while g < 10 ** 9 and st.st_ctime_ns % (g * 10) == 0 and st.st_mtime_ns % (g * 10) == 0:
        g *= 10
    if g > _SETTLE_MAX_NS // 2:
        return None  # second-granularity timestamps: waiting is too costly, let readers hash
    deadline = time.monotonic_ns() + _SETTLE_MAX_NS
    while _clock_ns() < st.st_ctime_ns + g:
        if time.monotonic_ns() > deadline:
            return None
        time.sleep(0.001)
    return _stat_record(st)


# ====================================================================== columnar mirrors
# Every JSONL file the writer produces gets a Parquet "mirror" beside it holding the same rows as typed columns
# (names start with "_": readers of the log directories ignore them, 00-core 2.2). A mirror records the size,
# sha256 and stat of the exact JSONL bytes it mirrors; a reader uses it only when the JSONL still has those bytes
# (same stat, or same sha256; see "stat identity" above), otherwise it parses the JSONL (the JSONL stays the
# authority; ``source="jsonl"`` always parses it). The trace, which grows by appends, has one mirror segment per
# append covering a byte range of the file.
MIRROR_KEY = b"rnglog.mirror"
MIRROR_FORMAT = 1
_TRACE_SEG_PREFIX = "_mirror.rng_trace_log."
SOURCES = ("auto", "jsonl")


def mirror_path(jsonl: Path) -> Path:
    """``part-00000.jsonl`` -> ``_mirror.part-00000.parquet`` (same directory)."""
    return jsonl.parent / f"_mirror.{jsonl.stem}.parquet"


def _nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema])


def _file_schema(schema: pa.Schema) -> pa.Schema:
    """Mirror file schema: the read schema with string columns dictionary-encoded (envelope constants)."""
    return pa.schema([f.with_type(pa.dictionary(pa.int32(), pa.string())) if pa.types.is_string(f.type) else f
                      for f in schema])


def _const_array(value: Any, typ: pa.DataType, n: int) -> pa.Array:
    if value is None:
        return pa.nulls(n, typ)
    if pa.types.is_dictionary(typ):
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], typ.value_type))
    return pa.repeat(pa.scalar(value, typ), n)


def _as_file_type(arr: pa.Array, typ: pa.DataType) -> pa.Array:
    if pa.types.is_dictionary(typ) and not pa.types.is_dictionary(arr.type):
        return pc.dictionary_encode(arr.cast(typ.value_type))
    return arr.cast(typ) if arr.type != typ else arr


def _write_mirror(path: Path, fschema: pa.Schema, tables: Iterable[pa.Table], meta: Mapping) -> None:
    """Write a mirror (temp + rename; no fsync: a lost or torn mirror only means the JSONL is parsed).
    LZ4: it shrinks the mirrors about as much as zstd level 1 did for these columns (random u64 counters and
    float deltas do not compress; dictionary indices, totals and constant columns do) at less than half the
    CPU, for the writer and for every validator reading them back (measured at 10^6 rows: in_cell_jitter
    mirror 112 vs 99 MB, read ~0.25 vs ~0.55 s CPU)."""
    tmp = path.parent / f"_tmp.{path.name}.{os.urandom(6).hex()}"
    schema = fschema.with_metadata({MIRROR_KEY: json.dumps({"format": MIRROR_FORMAT, **meta}, sort_keys=True)})
    dict_cols = [f.name for f in fschema if pa.types.is_dictionary(f.type)]
    try:
        with pq.ParquetWriter(tmp, schema, compression="lz4",
                              use_dictionary=dict_cols or False,
                              write_statistics=False) as w:
            for t in tables:
                w.write_table(t.replace_schema_metadata(schema.metadata), row_group_size=1 << 30)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _mirror_meta(path: Path) -> tuple[pq.ParquetFile, dict] | None:
    try:
        pf = pq.ParquetFile(path)
        meta = json.loads(pf.schema_arrow.metadata[MIRROR_KEY])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return None
    if not isinstance(meta, dict) or meta.get("format") != MIRROR_FORMAT:
        return None
    return pf, meta


def _mirror_table(pf: pq.ParquetFile, meta: Mapping, read_schema: pa.Schema,
                  columns: Sequence[str] | None, dictionary: bool = False) -> pa.Table | None:
    """Rows of a verified mirror as ``read_schema`` (or its ``columns``); None if the mirror does not fit.
    ``dictionary``: string columns stay dictionary-encoded as stored (no per-row copy of constant strings)."""
    fschema = _file_schema(read_schema)
    if pf.schema_arrow.remove_metadata() != fschema or pf.metadata.num_rows != meta.get("rows"):
        return None  # written under another family schema: parse the JSONL instead
    names = list(read_schema.names if columns is None else columns)
    try:  # no column asked: read the smallest one for the row count
        t = pf.read(columns=names or [read_schema.names[0]], use_threads=True)
    except (OSError, pa.ArrowException):
        return None
    if not names:
        return t.replace_schema_metadata(None).select([])  # (this order keeps num_rows)
    target = [fschema.field(c).with_nullable(True) if dictionary and pa.types.is_dictionary(fschema.field(c).type)
              else read_schema.field(c) for c in names]
    return t.cast(pa.schema(target)).replace_schema_metadata(None)


def _buffer_sha256(buf: Any) -> str:
    return hashlib.sha256(buf).hexdigest()


# sha256 of file byte ranges already computed by this process (a validator reads a family twice: its checks,
# then reconcile). Keyed by the file's identity and stat; only for files whose ctime was >= 2 s in the past
# when hashed: any later change sets a newer ctime (user space cannot set ctime), so a stale entry can never
# be hit, even on file systems with coarse timestamps where two writes in one tick leave mtime unchanged.
_VERIFIED: dict[tuple, str] = {}
_SETTLED_NS = 2_000_000_000


def _stat_key(path: Path, st: os.stat_result, start: int, end: int) -> tuple:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, start, end)


def _range_sha256(path: Path, st: os.stat_result | None, buf: Any, start: int, end: int,
                  wait_pending: bool = True) -> str:
    """sha256 of ``buf[start:end]`` (bytes of ``path`` as stat-ed in ``st`` before ``buf`` was mapped;
    ``st=None``: no cache). A digest of the same stat key being computed by :func:`prefetch_digests` is waited
    for instead of computed again."""
    if st is None:
        return _buffer_sha256(buf.slice(start, end - start))
    key = _stat_key(path, st, start, end)
    got = _VERIFIED.get(key)
    if got is not None:
        if wait_pending:
            _PENDING.pop(key, None)  # its result is this very entry
        return got
    fut = _PENDING.pop(key, None) if wait_pending else None
    if fut is not None:
        try:
            got = fut.result()
        except Exception:  # noqa: BLE001 - e.g. the file vanished: hash it here (and fail here) as before
            got = None
        if got:
            return got
    settled = time.time_ns() - st.st_ctime_ns > _SETTLED_NS
    digest = _buffer_sha256(buf.slice(start, end - start))
    if settled:
        with contextlib.suppress(OSError):
            if _stat_key(path, os.stat(path), start, end) == key:
                _VERIFIED[key] = digest
    return digest


def _file_sha256(path: Path, st: os.stat_result) -> str:
    if st.st_size == 0:
        return hashlib.sha256(b"").hexdigest()
    key = _stat_key(path, st, 0, st.st_size)
    if key in _VERIFIED:
        _PENDING.pop(key, None)  # its result is this very entry
        return _VERIFIED[key]
    return _mapped_range_sha256(path, st, 0, st.st_size)


def _mapped_range_sha256(path: Path, st: os.stat_result, start: int, end: int, wait_pending: bool = True) -> str:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm.size() != st.st_size:
            return ""
        with memoryview(mm) as view:
            return _range_sha256(path, st, pa.py_buffer(view), start, end, wait_pending)


# Digests being computed in the background (prefetch_digests), by stat key. Only settled files are submitted
# (same rule as _VERIFIED), so a later change of the file gives another key and the result is never used for it.
_PENDING: dict[tuple, Any] = {}
_POOL: list = []


def _prefetch_pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnglog-sha256"))
    return _POOL[0]


def prefetch_digests(data_root: str | Path, ids: Any, families: Iterable[str], config: Mapping | None = None,
                     trace: bool = True, verify: str | None = None) -> int:
    """Start hashing (one background thread; hashlib releases the GIL) the event parts of ``families`` and the
    trace byte ranges whose mirrors a later :func:`read_events` / :func:`read_trace` of this process will verify;
    that read then waits for the digest instead of hashing again. For a validator that has other work to do
    meanwhile. Only files whose ctime is more than 2 s old are prefetched (others are hashed when read, as
    before). Files or ranges a read will trust by their stat (``verify="stat"``, see :func:`read_events`) are
    not hashed. Returns the number of ranges submitted."""
    verify = _verify_mode(verify)
    jobs: list[tuple[Path, os.stat_result, int, int]] = []
    for fam in families:
        d = event_dir(data_root, ids, fam, config)
        for p in (sorted(d.glob("part-*.jsonl")) if d.is_dir() else []):
            got = _mirror_meta(mirror_path(p))
            if got is not None:
                with contextlib.suppress(OSError):
                    st = p.stat()
                    if not (verify == "stat" and _stat_matches(got[1].get("stat"), st)):
                        jobs.append((p, st, 0, st.st_size))
    tp = trace_path(data_root, ids, config)
    if trace and tp.exists():
        with contextlib.suppress(OSError):
            st = tp.stat()
            trusted = set(_trace_vouched(tp)[0]) if verify == "stat" else set()
            for start, end, sha, _pf, _meta in _trace_segments(tp):
                if 0 <= start < end <= st.st_size and (start, end, sha) not in trusted:
                    jobs.append((tp, st, start, end))
    n = 0
    now = time.time_ns()
    for path, st, start, end in jobs:
        if st.st_size == 0 or now - st.st_ctime_ns <= _SETTLED_NS:
            continue
        key = _stat_key(path, st, start, end)
        if key in _VERIFIED or key in _PENDING:
            continue
        _PENDING[key] = _prefetch_pool().submit(_mapped_range_sha256, path, st, start, end, False)
        n += 1
    return n


def _read_event_mirror(jsonl: Path, read_schema: pa.Schema, columns: Sequence[str] | None,
                       dictionary: bool = False, verify: str = "stat") -> pa.Table | None:
    """The mirror of one event part when it still mirrors the part's exact bytes, else None: the part has the
    stat the writer recorded (``verify="stat"``) or hashes to the recorded sha256."""
    got = _mirror_meta(mirror_path(jsonl))
    if got is None:
        return None
    pf, meta = got
    try:
        st = jsonl.stat()
    except OSError:
        return None
    if meta.get("size") != st.st_size:
        return None
    if not (verify == "stat" and _stat_matches(meta.get("stat"), st)) \
            and meta.get("sha256") != _file_sha256(jsonl, st):
        return None
    return _mirror_table(pf, meta, read_schema, columns, dictionary)


def _trace_segments(path: Path) -> list[tuple[int, int, str, pq.ParquetFile, dict]]:
    """Mirror segments of a trace file: (start, end, sha256, file, meta) sorted by start."""
    out = []
    for p in path.parent.glob(f"{_TRACE_SEG_PREFIX}*.parquet"):
        got = _mirror_meta(p)
        if got is None:
            continue
        pf, meta = got
        try:
            out.append((int(meta["start"]), int(meta["end"]), str(meta["sha256"]), pf, meta))
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(out, key=lambda x: (x[0], x[1]))


def _trace_segment_path(path: Path, start: int) -> Path:
    return path.parent / f"{_TRACE_SEG_PREFIX}{start:020d}.parquet"


def _drop_trace_segments(path: Path) -> None:
    for p in path.parent.glob(f"{_TRACE_SEG_PREFIX}*.parquet"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ====================================================================== writer
@dataclass
class _Batch:
    family: str
    module: str
    label: str
    part: int
    n: int
    plan: "_Plan"
    before_hi: np.ndarray
    before_lo: np.ndarray
    after_hi: np.ndarray
    after_lo: np.ndarray
    blocks: np.ndarray
    draws: np.ndarray
    read_schema: pa.Schema  # the family's read schema (nullable), for the mirror
    arrays: dict  # typed payload columns
    consts: dict  # typed payload constants (None = null)


class RngLogs:
    """Writer of one state's RNG logs for one run (see module docstring)."""

    def __init__(self, data_root: str | Path, segment: str, ids: Any, config: Mapping | None = None):
        if ids.segment != segment:
            raise RngError("E_RNG_ENVELOPE", f"ids are of segment {ids.segment}, writer segment {segment}")
        self.data_root = Path(data_root)
        self.segment = segment
        self.ids = ids
        self.config = config
        self.dictionary = dictionary.load(segment, config)
        self._families = self.dictionary.families()
        self._batches: list[_Batch] = []

    # -------------------------------------------------------------- paths
    @property
    def audit_path(self) -> Path:
        return audit_path(self.data_root, self.ids, self.config)

    @property
    def trace_path(self) -> Path:
        return trace_path(self.data_root, self.ids, self.config)

    def event_dir(self, family: str) -> Path:
        return event_dir(self.data_root, self.ids, family, self.config)

    # -------------------------------------------------------------- audit
    def write_audit(self, **fields: Any) -> bool:
        """Write the run's audit row (00-core 3.7) unless an equal one (ignoring ts_utc) exists.
        Required: ``build_commit`` (code digest hex). Optional: ``ts_utc``, ``code_digest``, ``git_commit``,
        ``hostname``, ``platform``, ``notes``, ``rng_key``, ``rng_counter_hi``, ``rng_counter_lo``.
        Returns True when a row was written."""
        row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in fields.items() if v is not None}
        row.setdefault("ts_utc", utc_now())
        row.update(run_id=self.ids.run_id, seed=int(self.ids.seed), manifest_fingerprint=self.ids.manifest_fingerprint,
                   parameter_hash=self.ids.parameter_hash, algorithm=ALGORITHM)
        problems = validate_record(row, load_schema(AUDIT_SCHEMA_REF))
        if problems:
            raise RngError("E_RNG_ENVELOPE", "invalid rng_audit_log row", path=self.audit_path, rows=problems)
        path = self.audit_path
        with _locked(path):
            existing = path.read_bytes() if path.exists() else b""
            core = {k: v for k, v in row.items() if k != "ts_utc"}
            for line in existing.splitlines():
                if not line.strip():
                    continue
                try:
                    old = json.loads(line)
                except ValueError:
                    continue
                if {k: v for k, v in old.items() if k != "ts_utc"} == core:
                    return False
            if existing and not existing.endswith(b"\n"):
                existing += b"\n"
            _atomic_write(path, [existing, canonical_json_bytes(row)], direct=False)
        return True

    def audit_exists(self) -> bool:
        return _audit_matches(read_audit(self.data_root, self.ids, self.config), self.ids)

    # -------------------------------------------------------------- events
    def add_events(self, family: str, module: str, label: str, columns: Mapping[str, Any], part: int = 0) -> int:
        """Queue events of one family and one (module, substream_label); returns the row count."""
        spec = self._families.get(family)
        if spec is None:
            raise RngError("E_RNG_ENVELOPE", f"unknown RNG event family {family!r}")
        if spec.get("segment") != self.segment:
            raise RngError("E_RNG_ENVELOPE", f"family {family} belongs to segment {spec.get('segment')}")
        streams = spec.get("streams") or []
        if not any(s["module"] == module and s["substream_label"] == label for s in streams):
            raise RngError("E_RNG_ENVELOPE", f"({module}, {label}) is not a registered stream of {family}",
                           detail={"registered": streams})
        if not isinstance(part, int) or not 0 <= part <= 99999:
            raise RngError("E_RNG_ENVELOPE", f"part must be an int in 0..99999, got {part!r}")
        if not self.audit_exists():
            raise RngError("E_RNG_AUDIT_MISSING", "no rng_audit_log row for this run before its first event "
                           "(call write_audit first)", path=self.audit_path)
        schema = load_schema(self.dictionary.schema_ref("rng_event", family=family))
        props = schema["properties"]
        required = set(schema.get("required") or [])
        for c in COUNTER_COLS:
            if c not in columns:
                raise RngError("E_RNG_ENVELOPE", f"{family}: column {c!r} missing")
        payload_names = [k for k in columns if k not in COUNTER_COLS]
        unknown = [k for k in payload_names if k not in props or k in ENVELOPE]
        if unknown:
            raise RngError("E_RNG_ENVELOPE", f"{family}: columns not in the family schema: {unknown}")
        missing = sorted(k for k in required if k not in ENVELOPE and k not in columns)
        if missing:
            raise RngError("E_RNG_ENVELOPE", f"{family}: payload columns missing: {missing}")

        counters = {c: _u64(columns[c], c) for c in COUNTER_COLS}
        n = len(counters["blocks"])
        if any(len(v) != n for v in counters.values()):
            raise RngError("E_RNG_ENVELOPE", f"{family}: counter columns differ in length")
        if n == 0:
            return 0
        self._check_counters(family, spec, module, label, counters)

        arrays: dict[str, pa.Array] = {}
        consts: dict[str, Any] = {}
        for name in payload_names:
            v = columns[name]
            prop = props[name]
            if v is None or isinstance(v, (str, bool, int, float, np.generic)):
                consts[name] = v
                continue
            try:
                if isinstance(v, (pa.Array, pa.ChunkedArray)):
                    typ = arrow_type(prop)
                    arr = v if v.type == typ else pc.cast(v, typ)
                else:
                    arr = pa.array(v, type=arrow_type(prop), from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
                raise RngError("E_RNG_ENVELOPE", f"{family}: column {name} does not fit {prop.get('x-arrow')}: {exc}") from None
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            if len(arr) != n:
                raise RngError("E_RNG_ENVELOPE", f"{family}: column {name} has {len(arr)} rows, expected {n}")
            arrays[name] = arr
        # payload values against the family schema (vectorised; constants as one-row columns)
        sub = {"properties": {k: props[k] for k in payload_names}, "additionalProperties": False,
               "required": [k for k in payload_names if k in required]}
        check = dict(arrays)
        for name, v in list(consts.items()):
            try:
                check[name] = pa.array([v], type=arrow_type(props[name]), from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
                raise RngError("E_RNG_ENVELOPE", f"{family}: constant {name}={v!r} does not fit "
                               f"{props[name].get('x-arrow')}: {exc}") from None
            consts[name] = check[name][0].as_py()  # typed as the schema says (0 -> 0.0 for a float field)
        problems: list[str] = []
        if arrays:
            problems += validate_table(pa.table(arrays), {**sub, "required": []})
        if consts:
            const_sub = {**sub, "properties": {k: props[k] for k in consts}, "required": []}
            problems += validate_table(pa.table({k: check[k] for k in consts}), const_sub)
        if problems:
            raise RngError("E_RNG_ENVELOPE", f"{family}: payload violates its schema", rows=problems)

        plan = _Plan(n)
        for k, v in (("run_id", self.ids.run_id), ("seed", int(self.ids.seed)),
                     ("parameter_hash", self.ids.parameter_hash),
                     ("manifest_fingerprint", self.ids.manifest_fingerprint),
                     ("module", module), ("substream_label", label)):
            plan.const(k, v)
        for env, col in _ENV_FROM_COL.items():
            plan.u64(env, counters[col])
        plan.u64("blocks", counters["blocks"])
        plan.u64("draws", counters["draws"], quoted=True)
        for name, v in consts.items():
            if v is None and name not in required:
                continue  # optional null constant: omitted
            plan.const(name, v)
        for name, arr in arrays.items():
            try:
                plan.arrow(name, arr, omit_null=name not in required)
            except ValueError as exc:
                raise RngError("E_RNG_ENVELOPE", f"{family}: column {name}: {exc}") from None
        self._batches.append(_Batch(family, module, label, part, n, plan, counters["before_hi"],
                                    counters["before_lo"], counters["after_hi"], counters["after_lo"],
                                    counters["blocks"], counters["draws"], _nullable(arrow_schema(schema)),
                                    arrays, consts))
        return n

    @staticmethod
    def _check_counters(family: str, spec: Mapping, module: str, label: str, c: Mapping[str, np.ndarray]) -> None:
        ok = counter_delta_ok(c["before_hi"], c["before_lo"], c["after_hi"], c["after_lo"], c["blocks"])
        if not ok.all():
            raise RngError("E_RNG_COUNTER_MISMATCH", f"{family} ({module}, {label}): blocks != after - before",
                           rows=np.flatnonzero(~ok)[:MAX_ROWS].tolist())
        if spec.get("consuming") is False:
            moved = (c["before_hi"] != c["after_hi"]) | (c["before_lo"] != c["after_lo"]) | (c["draws"] != 0)
            if moved.any():
                raise RngError("E_NONCONSUMING_CHANGED_COUNTERS", f"{family}: non-consuming event moved counters",
                               rows=np.flatnonzero(moved)[:MAX_ROWS].tolist())
        bad = _budget_mask(spec, c["blocks"], c["draws"])
        if bad is not None and bad.any():
            raise RngError("E_RNG_BUDGET_VIOLATION", f"{family}: blocks/draws differ from the budget {spec['budget']}",
                           rows=np.flatnonzero(bad)[:MAX_ROWS].tolist())

    # -------------------------------------------------------------- close
    def discard(self) -> None:
        self._batches = []

    def close(self, progress: Any = None, alongside: Any = None) -> dict:
        """Write queued events (one file per family and part) and rewrite the trace; returns a summary.
        ``progress``: an :class:`engine.core.progress.Progress` advanced by the lines written (events, then
        trace rows; logs only). ``alongside``: a callable run in a helper thread once every check of this
        close passed (audit row present, trace totals within u64), while the lines are written -- a state
        publishes its dataset there instead of after the logs (at 10^6 events the writes wait on the disk);
        close waits for it and raises its error (after the logs are complete). Should writing the lines fail
        (I/O), what ``alongside`` published stays: the state fails, and Snakemake removes a failed job's
        outputs."""
        batches, self._batches = self._batches, []
        on_rows = None if progress is None else progress.advance
        ts = utc_now()  # one ts_utc per close, for every event and trace row it writes
        if not batches:
            if alongside is not None:
                alongside()
            return {"ts_utc": ts, "events": {}, "trace_keys": []}
        if not self.audit_exists():
            raise RngError("E_RNG_AUDIT_MISSING", "no rng_audit_log row for this run", path=self.audit_path)
        # trace plans first (totals are checked for u64 overflow before anything is written)
        keys: list[tuple[str, str]] = []
        for b in batches:
            if (b.module, b.label) not in keys:
                keys.append((b.module, b.label))
        totals = {k: [0, 0, 0] for k in keys}  # events, blocks, draws
        trace_plans: list[_Plan] = []
        trace_tot: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        u64max = int(np.iinfo(np.uint64).max)
        for b in batches:
            t = totals[(b.module, b.label)]
            ev, bl, dr = t[0] + b.n, t[1] + exact_sum(b.blocks), t[2] + exact_sum(b.draws)
            if max(ev, bl, dr) > u64max:
                raise RngError("E_RNG_BUDGET_VIOLATION",
                               f"trace totals of ({b.module}, {b.label}) would overflow u64 (F4d)")
            plan = _Plan(b.n)
            for k, v in (("ts_utc", ts), ("run_id", self.ids.run_id), ("seed", int(self.ids.seed)),
                         ("module", b.module), ("substream_label", b.label)):
                plan.const(k, v)
            plan.u64("rng_counter_before_hi", b.before_hi)
            plan.u64("rng_counter_before_lo", b.before_lo)
            plan.u64("rng_counter_after_hi", b.after_hi)
            plan.u64("rng_counter_after_lo", b.after_lo)
            tot = (np.arange(t[0] + 1, ev + 1, dtype=np.uint64),
                   np.cumsum(b.blocks, dtype=np.uint64) + np.uint64(t[1]),
                   np.cumsum(b.draws, dtype=np.uint64) + np.uint64(t[2]))
            plan.u64("events_total", tot[0])
            plan.u64("blocks_total", tot[1])
            plan.u64("draws_total", tot[2])
            trace_plans.append(plan)
            trace_tot.append(tot)
            totals[(b.module, b.label)] = [ev, bl, dr]
        # events: one file per (family, part), batches in call order; then the part's columnar mirror
        groups: dict[tuple[str, int], list[_Batch]] = {}
        for b in batches:
            groups.setdefault((b.family, b.part), []).append(b)
        summary: dict[str, dict] = {}
        # a part's mirror is encoded and written in the background while the next part and the trace are
        # rendered and written (at 10^6 events the JSONL writes wait on the disk, the mirror is mostly CPU)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnglog-alongside") as side, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnglog-mirror") as mirrors:
            beside = side.submit(alongside) if alongside is not None else None
            pending = []
            for (family, part), bs in groups.items():
                path = self.event_dir(family) / f"part-{part:05d}.jsonl"
                for b in bs:
                    b.plan.const("ts_utc", ts)
                mpath = mirror_path(path)
                with contextlib.suppress(FileNotFoundError):
                    mpath.unlink()  # never leave the previous run's mirror beside the new part
                h = hashlib.sha256()
                st_rec: list = []
                size = _atomic_write(path, lambda ph, bs=bs: (c for b in bs for c in b.plan.chunks(on_rows, ph)),
                                     hasher=h, stat_out=st_rec)
                fschema = _file_schema(bs[0].read_schema)
                pending.append(mirrors.submit(
                    _write_mirror, mpath, fschema, [self._event_table(b, ts, fschema) for b in bs],
                    {"size": size, "sha256": h.hexdigest(), "rows": sum(b.n for b in bs), "family": family,
                     "stat": st_rec[0]}))
                s = summary.setdefault(family, {"events": 0, "parts": []})
                s["events"] += sum(b.n for b in bs)
                s["parts"].append(path.name)
            # trace (after the events are durable): one cumulative row per event, appended; a key already in the
            # trace (a re-run) makes the writer drop that key's rows instead, rewriting the file
            self._write_trace(keys, batches, trace_plans, trace_tot, ts, on_rows)
            for fut in pending:
                fut.result()
            if beside is not None:
                beside.result()
        if progress is not None:
            progress.finish()
        return {"ts_utc": ts, "events": summary, "trace_keys": [list(k) for k in keys]}

    def _event_table(self, b: _Batch, ts: str, fschema: pa.Schema) -> pa.Table:
        """One batch as mirror rows (the values its JSONL lines carry, typed by the family schema)."""
        n = b.n
        env = {"ts_utc": ts, "run_id": self.ids.run_id, "seed": int(self.ids.seed),
               "parameter_hash": self.ids.parameter_hash, "manifest_fingerprint": self.ids.manifest_fingerprint,
               "module": b.module, "substream_label": b.label}
        cols = []
        for f in fschema:
            name = f.name
            if name in env:
                cols.append(_const_array(env[name], f.type, n))
            elif name in _ENV_FROM_COL or name == "blocks":
                cols.append(pa.array(getattr(b, _ENV_FROM_COL.get(name, name)), pa.uint64()).cast(f.type))
            elif name == "draws":
                cols.append(_as_file_type(pc.cast(pa.array(b.draws, pa.uint64()), pa.string()), f.type))
            elif name in b.arrays:
                cols.append(_as_file_type(b.arrays[name], f.type))
            else:  # a payload constant, or an optional field this writer did not give (null, as when parsed)
                cols.append(_const_array(b.consts.get(name), f.type, n))
        return pa.Table.from_arrays(cols, schema=fschema)

    def _write_trace(self, keys: list[tuple[str, str]], batches: list[_Batch], plans: list[_Plan],
                     tot: list[tuple[np.ndarray, np.ndarray, np.ndarray]], ts: str, on_rows: Any = None) -> None:
        path = self.trace_path
        tschema = _nullable(arrow_schema(load_schema(TRACE_SCHEMA_REF)))
        fschema = _file_schema(tschema)

        def tables():
            for b, (ev, bl, dr) in zip(batches, tot):
                env = {"ts_utc": ts, "run_id": self.ids.run_id, "seed": int(self.ids.seed), "module": b.module,
                       "substream_label": b.label}
                arrs = {"rng_counter_before_hi": b.before_hi, "rng_counter_before_lo": b.before_lo,
                        "rng_counter_after_hi": b.after_hi, "rng_counter_after_lo": b.after_lo,
                        "events_total": ev, "blocks_total": bl, "draws_total": dr}
                yield pa.Table.from_arrays(
                    [_const_array(env[f.name], f.type, b.n) if f.name in env else pa.array(arrs[f.name], f.type)
                     for f in fschema], schema=fschema)

        chunks = lambda ph: (c for p in plans for c in p.chunks(on_rows, ph))  # noqa: E731
        h = hashlib.sha256()
        kept_table = None
        st_rec: list = []
        with _locked(path):
            size = path.stat().st_size if path.exists() else 0
            # the stat chain: when the file is exactly as the previous appender left it (same stat as its
            # segment recorded), the ranges that segment vouched for stay vouched, with ours added
            chain, vouched = _trace_vouched(path) if size else ([], [])
            if size and not _trace_has_keys(path, size, keys, vouched):
                start = size  # the normal first run of a state: O(new rows)
                fd, is_direct = _direct_io.open_fd(path, append=True)
                try:
                    w = _direct_io.SeqWriter(fd, start, is_direct)
                    try:
                        end = start + _write_stream(_Sink(w, h), chunks)
                        w.finish()
                        os.fsync(fd)
                    except BaseException:
                        os.ftruncate(fd, start)  # never leave a torn tail (a hard crash is handled by the rewrite)
                        raise
                finally:
                    os.close(fd)
                st_rec.append(_settled_stat(path))
            else:  # first writer, a re-run (drop the keys' rows) or a torn tail: rewrite the file
                with contextlib.ExitStack() as stack:
                    kept: list[Any] = []
                    kept_table = None
                    if size:
                        f = stack.enter_context(open(path, "rb"))
                        mm = stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                        view = memoryview(mm)
                        stack.callback(view.release)
                        ranges, drop = _trace_keep_ranges(np.frombuffer(mm, np.uint8), keys)
                        kept = [view[a:b] for a, b in ranges]
                        kept_table = _kept_trace_rows(path, keys, drop, tschema)
                    chain = []
                    kept_size = sum(len(k) for k in kept)
                    _drop_trace_segments(path)  # byte ranges move: the old segments no longer apply
                    start = 0 if kept_table is not None else kept_size
                    end = _atomic_write(path, lambda ph: itertools.chain(kept, chunks(ph)), hasher=h,
                                        hash_from=start, stat_out=st_rec)
                    del kept
                if kept_table is not None:
                    kept_table = kept_table.cast(fschema)
            rows = sum(b.n for b in batches) + (kept_table.num_rows if kept_table is not None else 0)
            sha = h.hexdigest()
            meta = {"start": start, "end": end, "sha256": sha, "rows": rows, "stat": st_rec[0]}
            if st_rec[0] is not None:
                meta["stat_chain"] = [list(x) for x in chain] + [[start, end, sha]]
            _write_mirror(_trace_segment_path(path, start), fschema,
                          itertools.chain([kept_table] if kept_table is not None else [], tables()), meta)

    def __enter__(self) -> "RngLogs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def _json_inner(text: str) -> bytes:
    """The bytes of a string value between its quotes as the writer renders it (canonical JSON, ASCII)."""
    return json.dumps(text, ensure_ascii=True).encode("ascii")[1:-1]


def _trace_vouched(path: Path) -> tuple[list[tuple], list[tuple]]:
    """(stat chain, its segments): when the trace has exactly the stat its last segment recorded, the
    (start, end, sha256) ranges that segment's ``stat_chain`` vouches for and the segments
    (:func:`_trace_segments` entries) covering them; else ``([], [])``."""
    try:
        st = path.stat()
    except OSError:
        return [], []
    segs = _trace_segments(path)
    for s0, e0, _sha, _pf, meta in segs:
        if e0 == st.st_size and _stat_matches(meta.get("stat"), st):
            try:
                chain = [(int(a), int(b), str(c)) for a, b, c in meta.get("stat_chain") or []]
            except (TypeError, ValueError):
                return [], []
            want = set(chain)
            return chain, [x for x in segs if (x[0], x[1], x[2]) in want]
    return [], []


def _trace_has_keys(path: Path, size: int, keys: Iterable[tuple[str, str]], vouched: Sequence[tuple] = ()) -> bool:
    """True when the trace may hold rows of ``keys`` (a substream label appears in it) or ends in a torn line.
    Conservative: a False is certain (lines are canonical JSON, written only by this module), a True only
    costs the rewrite that drops the keys' rows exactly. When ``vouched`` segments (:func:`_trace_vouched`)
    tile the whole file, their (module, substream_label) columns answer exactly without reading the file."""
    spans = sorted((x[0], x[1]) for x in vouched)
    if spans and spans[0][0] == 0 and spans[-1][1] == size and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        tschema = _nullable(arrow_schema(load_schema(TRACE_SCHEMA_REF)))
        pairs: set = set()
        for _s, _e, _sha, pf, meta in vouched:
            t = _mirror_table(pf, meta, tschema, ["module", "substream_label"], dictionary=True)
            if t is None:
                break
            if t.num_rows:
                pairs.update(_pair_codes(t)[1])
        else:
            return any(tuple(k) in pairs for k in keys)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[size - 1] != 0x0A:
            return True
        for label in sorted({l for _, l in keys}):
            if mm.find(b'"substream_label":"' + _json_inner(label) + b'"') >= 0:
                return True
    return False


_PAT_MODULE = np.frombuffer(b'"module":"', dtype=np.uint8).copy()
_PAT_LABEL = np.frombuffer(b'"substream_label":"', dtype=np.uint8).copy()


@numba.njit(cache=True, nogil=True)
def _count_newlines(buf):
    c = 0
    for i in range(buf.shape[0]):
        if buf[i] == 10:
            c += 1
    return c


@numba.njit(cache=True, nogil=True)
def _value_after(buf, i, n, pat):
    """If ``pat`` starts at i: (value start, value end) of the string after it up to the next quote (end -1
    if the line ends first); else (-1, -1)."""
    m = pat.shape[0]
    if i + m > n:
        return -1, -1
    for j in range(m):
        if buf[i + j] != pat[j]:
            return -1, -1
    s = i + m
    q = s
    while q < n and buf[q] != 34 and buf[q] != 10:
        q += 1
    return s, (q if q < n and buf[q] == 34 else -1)


@numba.njit(cache=True, nogil=True)
def _trace_drop_scan(buf, pat_m, pat_l, kblob, kms, kme, kls, kle, ends, drop):
    """Per complete line of a trace: its newline position and whether its first ``"module":"..."`` and first
    ``"substream_label":"..."`` values equal one of the keys (the rule of the regexes of earlier versions);
    a line lacking either is kept. One pass over the bytes. Returns the number of complete lines (a torn
    tail is not counted)."""
    n = buf.shape[0]
    nk = kms.shape[0]
    m1 = pat_m[1]
    l1 = pat_l[1]
    i = 0
    ln = 0
    while i < n:
        ms, me, ls, le = -1, -1, -1, -1
        mdone, ldone = False, False
        while i < n:
            c = buf[i]
            if c == 10:
                break
            if c == 34 and i + 1 < n:
                c1 = buf[i + 1]
                if c1 == m1 and not mdone:
                    a, b = _value_after(buf, i, n, pat_m)
                    if a >= 0:
                        ms, me, mdone = a, b, True
                elif c1 == l1 and not ldone:
                    a, b = _value_after(buf, i, n, pat_l)
                    if a >= 0:
                        ls, le, ldone = a, b, True
            i += 1
        if i >= n:
            break  # torn tail: no newline
        d = False
        if me >= 0 and le >= 0:
            for k in range(nk):
                if me - ms != kme[k] - kms[k] or le - ls != kle[k] - kls[k]:
                    continue
                same = True
                for j in range(me - ms):
                    if buf[ms + j] != kblob[kms[k] + j]:
                        same = False
                        break
                if same:
                    for j in range(le - ls):
                        if buf[ls + j] != kblob[kls[k] + j]:
                            same = False
                            break
                if same:
                    d = True
                    break
        ends[ln] = i
        drop[ln] = d
        ln += 1
        i += 1
    return ln


def _trace_keep_ranges(buf: np.ndarray, keys: Iterable[tuple[str, str]]) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Byte ranges of the trace lines to keep (rows of other keys; a torn last line is dropped) and the
    per-line drop mask of the complete lines."""
    blob = bytearray()
    kms, kme, kls, kle = [], [], [], []
    for m, l in sorted(keys):
        for text, st, en in ((m, kms, kme), (l, kls, kle)):
            b = _json_inner(text)
            st.append(len(blob))
            blob += b
            en.append(len(blob))
    a = lambda x: np.array(x, dtype=np.int64)  # noqa: E731
    cap = _count_newlines(buf)
    ends = np.empty(cap, np.int64)
    drop = np.zeros(cap, np.bool_)
    n = _trace_drop_scan(buf, _PAT_MODULE, _PAT_LABEL, np.frombuffer(bytes(blob), np.uint8), a(kms), a(kme),
                         a(kls), a(kle), ends, drop)
    ends, drop = ends[:n], drop[:n]
    keep = np.flatnonzero(~drop)
    if keep.size == 0:
        return [], drop
    starts = np.concatenate([[0], ends[:-1] + 1])
    brk = np.flatnonzero(np.diff(keep) != 1)
    first = keep[np.concatenate([[0], brk + 1])]
    last = keep[np.concatenate([brk, [keep.size - 1]])]
    return list(zip(starts[first].tolist(), (ends[last] + 1).tolist())), drop


def _drop_trace_keys(data: bytes, keys: set[tuple[str, str]]) -> bytes:
    """Trace bytes without the rows of ``keys`` (and without a torn last line: an append cut short)."""
    if not data:
        return b""
    ranges, _ = _trace_keep_ranges(np.frombuffer(data, np.uint8), keys)
    return b"".join(data[a:b] for a, b in ranges)


# ====================================================================== reading
def _read_jsonl(path: Path, schema: pa.Schema) -> pa.Table:
    read_schema = pa.schema([f.with_nullable(True) for f in schema])
    try:
        return pj.read_json(path, read_options=pj.ReadOptions(block_size=1 << 24),
                            parse_options=pj.ParseOptions(explicit_schema=read_schema,
                                                          unexpected_field_behavior="error"))
    except pa.ArrowInvalid as exc:
        raise RngError("E_SCHEMA_INVALID", f"JSON lines do not fit the schema: {exc}", path=path) from None


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def read_events(data_root: str | Path, ids: Any, family: str, columns: Sequence[str] | None = None,
                config: Mapping | None = None, with_source: bool = False, source: str = "auto",
                dictionary: bool = False, verify: str | None = None) -> pa.Table:
    """Events of one family for one run as an Arrow table (explicit schema from the family schema: u64
    exact, floats bit-exact), parts concatenated in part order. ``with_source`` adds ``_part`` (file name)
    and ``_line`` (0-based line in the part). No event file -> an empty table.

    ``source="auto"`` reads a part's columnar mirror when it still mirrors the part's exact bytes (size and
    sha256 recorded at writing), else parses the JSONL; ``source="jsonl"`` always parses the JSONL. Both give
    the same table (``tests/test_rnglog.py`` holds the writer to that). ``dictionary=True`` lets string columns
    of a mirror stay dictionary-encoded as stored (same values; the checks below accept both forms).

    ``verify`` (``source="auto"`` only): ``"stat"`` (default; ``ENGINE_RNGLOG_VERIFY`` sets the process
    default) trusts a mirror without reading the JSONL when the part has exactly the stat (device, inode, size,
    mtime, ctime) its writer recorded after the rename -- any later change of the bytes changes ctime, a copied
    root changes the inode -- and hashes it otherwise; ``"sha256"`` always hashes (archival audits)."""
    _check_source(source)
    verify = _verify_mode(verify)
    d = _dict_for(ids, config)
    schema = arrow_schema(load_schema(d.schema_ref("rng_event", family=family)))
    read_schema = _nullable(schema)
    directory = event_dir(data_root, ids, family, config)
    parts = sorted(p for p in directory.glob("part-*.jsonl")) if directory.is_dir() else []
    if columns is not None:
        unknown = [c for c in columns if c not in schema.names and not (with_source and c in ("_part", "_line"))]
        if unknown:
            raise KeyError(f"{family}: unknown columns {unknown}")
    want = None if columns is None else [c for c in columns if c in schema.names]
    tables = []
    for p in parts:
        t = _read_event_mirror(p, read_schema, want, dictionary, verify) if source == "auto" else None
        if t is None:
            t = _read_jsonl(p, schema).select(schema.names if want is None else want)
        if with_source:
            t = t.append_column("_part", pa.repeat(pa.scalar(p.name, pa.string()), t.num_rows))
            t = t.append_column("_line", pa.array(np.arange(t.num_rows, dtype=np.int64)))
        tables.append(t)
    if not tables:
        empty = read_schema
        if with_source:
            empty = empty.append(pa.field("_part", pa.string())).append(pa.field("_line", pa.int64()))
        t = empty.empty_table()
    else:
        if len(tables) > 1 and any(x.schema != tables[0].schema for x in tables[1:]):
            tables = [plain_strings(x) for x in tables]  # a mirrored part and a parsed one: one schema
        t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if columns is not None:
        t = t.select(list(columns))
    return t


def plain_strings(t: pa.Table) -> pa.Table:
    """``t`` with dictionary columns decoded to their value type (a table read with ``dictionary=True`` as
    Arrow kernels without dictionary support need it)."""
    if not any(pa.types.is_dictionary(f.type) for f in t.schema):
        return t
    return t.cast(pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f
                             for f in t.schema]))


def _parse_trace_bytes(buf: pa.Buffer, schema: pa.Schema, path: Path) -> pa.Table:
    read_schema = _nullable(schema)
    try:
        return pj.read_json(pa.BufferReader(buf), read_options=pj.ReadOptions(block_size=1 << 24),
                            parse_options=pj.ParseOptions(explicit_schema=read_schema,
                                                          unexpected_field_behavior="error")).select(schema.names)
    except pa.ArrowInvalid as exc:
        raise RngError("E_SCHEMA_INVALID", f"JSON lines do not fit the schema: {exc}", path=path) from None


def read_trace(data_root: str | Path, ids: Any, config: Mapping | None = None, source: str = "auto",
               dictionary: bool = False, verify: str | None = None) -> pa.Table:
    """The run's trace rows (file order), u64 exact; a missing file gives an empty table.

    ``source="auto"``: byte ranges of the file covered by a mirror segment whose sha256 still matches are
    read from the segment, the rest is parsed; ``source="jsonl"`` parses the whole file. ``dictionary`` as in
    :func:`read_events`. ``verify="stat"``: when the file has exactly the stat its last appender recorded,
    the segments of that appender's stat chain (each appender checks, under the lock, that the file still has
    the stat the previous one recorded before extending the chain) are trusted without hashing."""
    _check_source(source)
    return _read_trace_file(trace_path(data_root, ids, config), source, dictionary, _verify_mode(verify))


def _read_trace_file(path: Path, source: str = "auto", dictionary: bool = False, verify: str = "stat") -> pa.Table:
    schema = arrow_schema(load_schema(TRACE_SCHEMA_REF))
    read_schema = _nullable(schema)
    if not path.exists() or path.stat().st_size == 0:
        return read_schema.empty_table()
    segs = _trace_segments(path) if source == "auto" else []
    if not segs:
        return _read_jsonl(path, schema).select(schema.names)
    st = path.stat()
    trusted = set(_trace_vouched(path)[0]) if verify == "stat" else set()
    with pa.memory_map(str(path)) as mm:
        buf = mm.read_buffer()
        size = buf.size
        if size != st.st_size:
            st = None  # changed in between: hash without the cache
        pieces: list[pa.Table] = []
        pos = 0
        for start, end, sha, pf, meta in segs:
            if start < pos or end > size or end <= start:
                continue
            if (start, end, sha) not in trusted and ((start > 0 and buf[start - 1] != 0x0A)
                                                     or _range_sha256(path, st, buf, start, end) != sha):
                continue
            t = _mirror_table(pf, meta, read_schema, None, dictionary)
            if t is None:
                continue
            if start > pos:
                pieces.append(_parse_trace_bytes(buf.slice(pos, start - pos), schema, path))
            pieces.append(t)
            pos = end
        if pos < size:
            pieces.append(_parse_trace_bytes(buf.slice(pos, size - pos), schema, path))
        if len(pieces) > 1 and any(x.schema != pieces[0].schema for x in pieces[1:]):
            pieces = [plain_strings(x) for x in pieces]
        return pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]


def _kept_trace_rows(path: Path, keys: Iterable[tuple[str, str]], drop: np.ndarray,
                     schema: pa.Schema) -> pa.Table | None:
    """Rows of the trace lines a rewrite keeps, as a table (for the rewritten file's mirror): the file read
    (mirror-assisted) and filtered by key. None unless its rows match the lines one to one, with the same
    drop decisions as the byte scan (so the mirror can never disagree with the bytes it covers)."""
    try:
        old = _read_trace_file(path)
    except RngError:
        return None
    if old.num_rows != drop.shape[0] or old.schema != schema:
        return None
    if old.num_rows == 0:
        return old
    combo = pc.binary_join_element_wise(old["module"], old["substream_label"], "\x00")
    tdrop = _bool(pc.is_in(combo, value_set=pa.array([f"{m}\x00{l}" for m, l in sorted(keys)], pa.string())))
    if not np.array_equal(tdrop, drop):
        return None
    return old.filter(pa.array(~tdrop))


def read_audit(data_root: str | Path, ids: Any, config: Mapping | None = None) -> list[dict]:
    """The run's audit rows (Python ``json``; u64 exact)."""
    path = audit_path(data_root, ids, config)
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"_invalid": line[:200].decode("utf-8", "replace")})
    return out


def _audit_matches(rows: list[dict], ids: Any) -> bool:
    return any(r.get("run_id") == ids.run_id and r.get("seed") == int(ids.seed)
               and r.get("parameter_hash") == ids.parameter_hash
               and r.get("manifest_fingerprint") == ids.manifest_fingerprint
               and r.get("algorithm") == ALGORITHM for r in rows)


# ====================================================================== checks
_ROW_COLS = ("_part", "_line", "merchant_id", "module", "substream_label", "rng_counter_before_hi",
             "rng_counter_before_lo", "rng_counter_after_hi", "rng_counter_after_lo", "blocks", "draws")


def _rows_of(table: pa.Table, mask: np.ndarray) -> list[dict]:
    idx = np.flatnonzero(mask)[:MAX_ROWS]
    cols = [c for c in _ROW_COLS if c in table.column_names]
    sub = table.select(cols).take(pa.array(idx, type=pa.int64()))
    rows = sub.to_pylist()
    for i, r in zip(idx.tolist(), rows):
        r.setdefault("_row", i)
    return rows


def _failure(code: str, family: str | None, detail: str, table: pa.Table | None = None,
             mask: np.ndarray | None = None, module: str | None = None, label: str | None = None,
             **extra: Any) -> dict:
    f = {"code": code, "family": family, "module": module, "substream_label": label, "detail": detail,
         "rows": _rows_of(table, mask) if table is not None and mask is not None else []}
    if mask is not None:
        f["count"] = int(np.count_nonzero(mask))
    f.update(extra)
    return f


def _np(table: pa.Table, name: str) -> np.ndarray:
    col = table[name]
    if pa.types.is_unsigned_integer(col.type) and col.type.bit_width == 64:
        return np.asarray(pc.fill_null(col, 0).to_numpy(zero_copy_only=False), dtype=np.uint64)
    return np.asarray(col.to_numpy(zero_copy_only=False))


def _bool(arr: Any) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _col_codes(col: Any) -> tuple[np.ndarray, list]:
    """(int64 code per row, -1 for null; the distinct values, ``values[code]``) of a string column, plain or
    dictionary-encoded (as a mirror stores it): checks evaluate a predicate once per distinct value and gather
    it by code, instead of comparing or joining strings row by row."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    values: list = []
    index: dict = {}
    out = np.empty(sum(len(c) for c in chunks), np.int64)
    pos = 0
    for ch in chunks:
        n = len(ch)
        if n == 0:
            continue
        if not pa.types.is_dictionary(ch.type):
            ch = pc.dictionary_encode(ch)
        remap = []
        for v in ch.dictionary.to_pylist():
            if v is None:
                remap.append(-1)
            else:
                if v not in index:
                    index[v] = len(values)
                    values.append(v)
                remap.append(index[v])
        if ch.null_count == 0 and remap and all(r == remap[0] for r in remap):
            out[pos:pos + n] = remap[0]  # one value (a mirror chunk of a constant column): no gather
        else:
            remap_arr = np.array(remap + [-1], np.int64)  # index -1 (a null index) -> code -1
            ind = ch.indices
            idx = (ind.to_numpy() if ind.null_count == 0 else
                   np.asarray(pc.fill_null(ind, -1).to_numpy(zero_copy_only=False), np.int64))
            np.take(remap_arr, idx, out=out[pos:pos + n], mode="wrap")  # (-1 -> the last entry, -1)
        pos += n
    return out, values


def _gather(codes: np.ndarray, per_value: list) -> np.ndarray:
    """``per_value[code]`` per row, a null code giving the last entry of ``per_value + [null_value]``."""
    return np.asarray(per_value)[codes]


def _eq_const(col: Any, value: Any) -> np.ndarray:
    """Row mask of ``col == value`` (a null is not equal), for a plain or dictionary-encoded string column."""
    codes, vals = _col_codes(col)
    return _gather(codes, [v == value for v in vals] + [False])


_DRAWS_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_U64_MAX = int(np.iinfo(np.uint64).max)


def parse_draws(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(draws as u64, mask of rows whose draws is not a canonical decimal u64 string), evaluated once per distinct
    value (plain or dictionary-encoded column; a null is not canonical and counts 0)."""
    codes, vals = _col_codes(table["draws"])
    num, bad = [], []
    for v in vals:
        ok = isinstance(v, str) and _DRAWS_RE.fullmatch(v) is not None and int(v) <= _U64_MAX
        num.append(int(v) if ok else 0)
        bad.append(not ok)
    return (np.array(num + [0], dtype=np.uint64)[codes], np.array(bad + [True], dtype=bool)[codes])


def _pair_codes(table: pa.Table, a: str = "module", b: str = "substream_label") -> tuple[np.ndarray, list]:
    """(code per row, -1 when either is null; the distinct (a, b) pairs by code) of two string columns."""
    ca, va = _col_codes(table[a])
    cb, vb = _col_codes(table[b])
    if len(va) == 1 and len(vb) == 1 and ca.shape[0] and ca.min() >= 0 and cb.min() >= 0:
        return np.zeros(ca.shape[0], np.int64), [(va[0], vb[0])]  # one pair (one writer's events)
    nb = max(len(vb), 1)
    space = len(va) * nb
    flat = np.where((ca >= 0) & (cb >= 0), ca * nb + cb, space)  # the last slot: a null in either
    if space <= 4 * flat.shape[0] + 1024:  # the usual case, a handful of pairs: O(n) without a sort
        used = np.flatnonzero(np.bincount(flat, minlength=space + 1)[:-1])
        remap = np.full(space + 1, -1, np.int64)
        remap[used] = np.arange(used.shape[0], dtype=np.int64)
        codes = remap[flat]
    else:
        valid = flat < space
        used, inv = np.unique(flat[valid], return_inverse=True)
        codes = np.full(flat.shape[0], -1, np.int64)
        codes[valid] = inv.ravel()
    return codes, [(va[int(u) // nb], vb[int(u) % nb]) for u in used.tolist()]


def stream_rows(table: pa.Table, module: str, label: str) -> np.ndarray:
    """Indices (ascending) of the rows of ``table`` (events or trace, plain or dictionary strings) whose
    (module, substream_label) is (``module``, ``label``)."""
    if table.num_rows == 0:
        return np.zeros(0, np.int64)
    codes, pairs = _pair_codes(table)
    if (module, label) not in pairs:
        return np.zeros(0, np.int64)
    return np.flatnonzero(codes == pairs.index((module, label)))


def check_events(table: pa.Table, family: str, spec: Mapping, ids: Any | None = None) -> list[dict]:
    """Per-event checks of one family's table (as from :func:`read_events`): registered module/label and
    context, embedded identities, counter delta, budget, non-consuming counters."""
    out: list[dict] = []
    if table.num_rows == 0:
        return out
    streams = spec.get("streams") or []
    registered = {(s["module"], s["substream_label"]) for s in streams}
    pcodes, pairs = _pair_codes(table)
    unreg = ~_gather(pcodes, [p in registered for p in pairs] + [False])
    if unreg.any():
        out.append(_failure("E_SCHEMA_INVALID", family, "module/substream_label is not a registered stream of "
                            f"{family}: {streams}", table, unreg))
    if "context" in table.column_names:
        for s in streams:
            if "context" not in s:
                continue
            m = _gather(pcodes, [p == (s["module"], s["substream_label"]) for p in pairs] + [False])
            badctx = m & ~_eq_const(table["context"], s["context"])
            if badctx.any():
                out.append(_failure("E_SCHEMA_INVALID", family, f"context must be {s['context']!r} for "
                                    f"({s['module']}, {s['substream_label']})", table, badctx))
    if ids is not None:
        for col, want in (("run_id", ids.run_id), ("parameter_hash", ids.parameter_hash),
                          ("manifest_fingerprint", ids.manifest_fingerprint)):
            bad = ~_eq_const(table[col], want)
            if bad.any():
                out.append(_failure("E_PATH_EMBED_MISMATCH", family, f"{col} differs from the run's {want}",
                                    table, bad))
        bad = ~_bool(pc.equal(table["seed"], pa.scalar(int(ids.seed), pa.uint64())))
        if bad.any():
            out.append(_failure("E_PATH_EMBED_MISMATCH", family, f"seed differs from {ids.seed}", table, bad))
    bh, bl = _np(table, "rng_counter_before_hi"), _np(table, "rng_counter_before_lo")
    ah, al = _np(table, "rng_counter_after_hi"), _np(table, "rng_counter_after_lo")
    blocks = _np(table, "blocks")
    nulls = np.zeros(table.num_rows, dtype=bool)
    for c in ("rng_counter_before_hi", "rng_counter_before_lo", "rng_counter_after_hi", "rng_counter_after_lo",
              "blocks", "draws"):
        nulls |= _bool(pc.is_null(table[c]))
    if nulls.any():
        out.append(_failure("E_SCHEMA_INVALID", family, "envelope counter/blocks/draws missing", table, nulls))
    draws, bad_draws = parse_draws(table)
    if bad_draws.any():
        out.append(_failure("E_RNG_BUDGET_VIOLATION", family, "draws is not a canonical decimal u64 string",
                            table, bad_draws))
    mism = ~counter_delta_ok(bh, bl, ah, al, blocks) & ~nulls
    if mism.any():
        out.append(_failure("E_RNG_COUNTER_MISMATCH", family, "blocks != u128(after) - u128(before)", table, mism))
    if spec.get("consuming") is False:
        moved = ((bh != ah) | (bl != al) | (blocks != 0) | (draws != 0)) & ~nulls & ~bad_draws
        if moved.any():
            out.append(_failure("E_NONCONSUMING_CHANGED_COUNTERS", family,
                                "non-consuming event with moved counters or non-zero blocks/draws", table, moved))
    bad = _budget_mask(spec, blocks, draws)
    if bad is not None:
        bad &= ~nulls & ~bad_draws
        if spec.get("consuming") is False:
            bad &= ~((bh != ah) | (bl != al) | (blocks != 0) | (draws != 0))  # already reported above
        if bad.any():
            out.append(_failure("E_RNG_BUDGET_VIOLATION", family,
                                f"blocks/draws differ from the family budget {dict(spec['budget'])}", table, bad))
    return out


def _orderable(col: Any) -> np.ndarray | None:
    """A numpy array ordering rows as ``col`` does (strings by rank of value), or None (nulls, other types)."""
    if col.null_count:
        return None
    t = col.type
    if pa.types.is_dictionary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        codes, vals = _col_codes(col)
        rank = np.empty(len(vals), np.int64)
        rank[np.argsort(np.array(vals, dtype=object), kind="stable")] = np.arange(len(vals), dtype=np.int64)
        return rank[codes]
    if pa.types.is_integer(t):
        return np.asarray(col.to_numpy(zero_copy_only=False))
    return None


def _chains_clean(table: pa.Table, keys: Sequence[str]) -> bool:
    """True when every substream chains, proved without a sort: the consuming events are in non-decreasing
    (module, substream_label, *keys) order in file order -- so each substream's events form one contiguous run
    in file order, exactly the order the sort in :func:`check_chains` produces -- and adjacent events of a run
    chain. False means "not proved" (unsorted file, nulls, or a broken chain): the caller runs the sort."""
    blocks = _np(table, "blocks")
    rows = np.flatnonzero(blocks > 0)
    if rows.size < 2:
        return True
    eq = np.ones(rows.size - 1, dtype=bool)
    for k in ("module", "substream_label", *keys):
        x = _orderable(table[k])
        if x is None:
            return False
        x = x[rows]
        nxt, prev = x[1:], x[:-1]
        if (eq & (nxt < prev)).any():
            return False
        eq &= nxt == prev
    ah, al = _np(table, "rng_counter_after_hi")[rows], _np(table, "rng_counter_after_lo")[rows]
    bh, bl = _np(table, "rng_counter_before_hi")[rows], _np(table, "rng_counter_before_lo")[rows]
    return not (eq & ((ah[:-1] != bh[1:]) | (al[:-1] != bl[1:]))).any()


def check_chains(table: pa.Table, family: str, spec: Mapping) -> list[dict]:
    """Within one keyed substream ((module, substream_label) + the family's ``stream_key`` columns), consecutive
    consuming events (blocks > 0, in file order) must chain: after of one == before of the next.

    Writers emit events grouped by substream, so :func:`_chains_clean` usually proves a clean table in one pass;
    otherwise (or to report a break) the events are sorted by (stream, file row) and compared pairwise."""
    if table.num_rows < 2:
        return []
    keys = [k for k in (spec.get("stream_key") or []) if k in table.column_names]
    if _chains_clean(table, keys):
        return []
    need = set(_ROW_COLS) | set(keys)  # the sort keys and what a failure reports (_rows_of): copy no payload
    table = table.select([c for c in table.column_names if c in need])
    t = plain_strings(table).append_column("__row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    t = t.filter(pc.greater(pc.fill_null(t["blocks"], 0), pa.scalar(0, pa.uint64())))
    if t.num_rows < 2:
        return []
    order = ["module", "substream_label", *keys, "__row"]
    t = t.take(pc.sort_indices(t, sort_keys=[(k, "ascending") for k in order]))
    same = np.ones(t.num_rows - 1, dtype=bool)
    for k in order[:-1]:
        col = t[k]
        a, b = col.slice(0, t.num_rows - 1), col.slice(1)
        same &= _bool(pc.equal(a, b)) | (_bool(pc.is_null(a)) & _bool(pc.is_null(b)))
    ah, al = _np(t, "rng_counter_after_hi")[:-1], _np(t, "rng_counter_after_lo")[:-1]
    bh, bl = _np(t, "rng_counter_before_hi")[1:], _np(t, "rng_counter_before_lo")[1:]
    broken = same & ((ah != bh) | (al != bl))
    if not broken.any():
        return []
    mask = np.concatenate([[False], broken])
    return [_failure("E_RNG_COUNTER_MISMATCH", family, "consecutive events of one substream do not chain "
                     "(before != previous after)", t, mask, stream_key=keys)]


def _final_trace_row(sub: pa.Table) -> dict:
    """Final row of one key: max events_total, then latest ts_utc, then max after counter (00-core 3.7)."""
    sub = plain_strings(sub)
    idx = pc.sort_indices(sub, sort_keys=[("events_total", "descending"), ("ts_utc", "descending"),
                                          ("rng_counter_after_hi", "descending"),
                                          ("rng_counter_after_lo", "descending")])
    return sub.take(idx.slice(0, 1)).to_pylist()[0]


def _final_trace_row_of(trace: pa.Table, rows: np.ndarray, events_total: np.ndarray | None) -> dict:
    """:func:`_final_trace_row` of ``trace`` rows ``rows``: the row of the unique largest ``events_total``
    directly (``events_total`` = that column as u64, None when it has nulls), the full sort on a tie."""
    if events_total is not None and rows.size:
        ev = events_total[rows]
        top = rows[ev == ev.max()]
        if top.size == 1:
            return plain_strings(trace.slice(int(top[0]), 1)).to_pylist()[0]
    return _final_trace_row(trace.take(pa.array(rows, pa.int64())))


# ====================================================================== reconciliation, in parts
# :func:`reconcile` is the composition of the four functions below; a validator that cannot hold every event
# table at once (1A S9 at 10^6 merchants) calls them itself, one family at a time, dropping each table after
# :func:`summarise_events`, and gets exactly reconcile's failures.
def reconciled_families(families: Mapping[str, Mapping], segment: str,
                        wanted: Iterable[str] | None = None) -> list[str]:
    """The families :func:`reconcile` covers, in the order it reports them. ``families``: the dictionary's family
    table (``Dictionary.families()``). ``wanted`` None: every family of ``segment`` not marked unused (dictionary
    order); else ``wanted`` (an unknown name raises ``E_RNG_ENVELOPE``) followed, in dictionary order, by every
    other family sharing a (module, substream_label) key with one of them (S4: poisson_component + ztp_*), since
    a key's trace totals count the events of all its families."""
    if wanted is None:
        return [f for f, s in families.items() if s.get("segment") == segment and not s.get("unused")]
    out = list(wanted)
    for f in out:
        if f not in families:
            raise RngError("E_RNG_ENVELOPE", f"unknown RNG event family {f!r}")
    keys = {(s["module"], s["substream_label"]) for f in out for s in families[f]["streams"]}
    for f, s in families.items():
        if f not in out and any((x["module"], x["substream_label"]) in keys for x in s["streams"]):
            out.append(f)
    return out


@dataclass(frozen=True)
class FamilySummary:
    """What :func:`reconcile` keeps of one family's event table: the failures of :func:`check_events` (and of
    :func:`check_chains` when asked) and, per (module, substream_label) found in the table (first-seen order),
    its (events, blocks sum, draws sum) as exact ints."""
    family: str
    failures: list
    sums: dict


def summarise_events(table: pa.Table, family: str, spec: Mapping, ids: Any | None = None,
                     chain: bool = False) -> FamilySummary:
    """One family's part of :func:`reconcile` on its table (as :func:`read_events` gives it, plain or
    ``dictionary=True``; ``with_source=True`` for the ``_part``/``_line`` of offending rows). The result holds no
    reference to ``table``."""
    failures = check_events(table, family, spec, ids)
    if chain:
        failures += check_chains(table, family, spec)
    sums: dict[tuple[str, str], tuple[int, int, int]] = {}
    if table.num_rows:
        draws, _ = parse_draws(table)
        blocks = _np(table, "blocks")
        pcodes, pairs = _pair_codes(table)
        if len(pairs) == 1 and pcodes.shape[0] and pcodes.min() == 0:  # one stream (no null module/label)
            sums[pairs[0]] = (int(table.num_rows), exact_sum(blocks), exact_sum(draws))
        else:
            for k, key in enumerate(pairs):
                mask = pcodes == k
                sums[key] = (int(np.count_nonzero(mask)), exact_sum(blocks[mask]), exact_sum(draws[mask]))
    return FamilySummary(family, failures, sums)


@dataclass(frozen=True)
class TraceSummary:
    """What :func:`reconcile` keeps of the trace: its embedded-identity failures and, per (module,
    substream_label), ``(row count, final row)`` (the final row as a dict, 00-core 3.7: max events_total, then
    latest ts_utc, then max after counter)."""
    failures: list
    keys: dict


def summarise_trace(trace: pa.Table, ids: Any) -> TraceSummary:
    """The trace's part of :func:`reconcile` (``trace`` as :func:`read_trace` gives it, plain or
    ``dictionary=True``): run_id / seed embed checks and the per-key row counts and final rows. The result holds
    no reference to ``trace``."""
    failures: list[dict] = []
    keys: dict[tuple[str, str], tuple[int, dict]] = {}
    if trace.num_rows == 0:
        return TraceSummary(failures, keys)
    for col, want in (("run_id", ids.run_id),):
        bad = ~_eq_const(trace[col], want)
        if bad.any():
            failures.append(_failure("E_PATH_EMBED_MISMATCH", None, f"trace {col} differs from {want}", trace, bad))
    bad = ~_bool(pc.equal(trace["seed"], pa.scalar(int(ids.seed), pa.uint64())))
    if bad.any():
        failures.append(_failure("E_PATH_EMBED_MISMATCH", None, f"trace seed differs from {ids.seed}", trace, bad))
    tcodes, tpairs = _pair_codes(trace)
    t_events = _np(trace, "events_total") if trace["events_total"].null_count == 0 else None
    for k, key in enumerate(tpairs):
        rows = np.flatnonzero(tcodes == k)
        keys[key] = (int(rows.size), _final_trace_row_of(trace, rows, t_events))
    return TraceSummary(failures, keys)


def _read_failure(exc: BaseException, family: str | None) -> dict:
    """A log that could not be read, as a failure (an RngError); anything else is re-raised."""
    if not isinstance(exc, RngError):
        raise exc
    return _failure(exc.code, family, exc.message, path=exc.path)


def reconcile_summaries(ids: Any, families: Mapping[str, Mapping],
                        summaries: Mapping[str, FamilySummary | BaseException],
                        trace: TraceSummary | BaseException, audit: Sequence[Mapping],
                        audit_file: str | Path | None = None) -> list[dict]:
    """:func:`reconcile`'s failures from its parts: ``audit`` (:func:`read_audit` rows; ``audit_file`` is the
    path named by ``E_RNG_AUDIT_MISSING``), ``summaries`` (family -> :func:`summarise_events`, or the
    :class:`RngError` its read raised, in the order to report them, normally :func:`reconciled_families`),
    ``trace`` (:func:`summarise_trace`, or the :class:`RngError` of :func:`read_trace`: reported, and the trace
    comparisons skipped), ``families`` the dictionary's family table. Exceptions other than RngError are
    re-raised. Order: audit, per family (read error or check failures), trace (read error or embed failures),
    then per (module, substream_label) in sorted order coverage and totals."""
    failures: list[dict] = []
    if not _audit_matches(list(audit), ids):
        failures.append(_failure("E_RNG_AUDIT_MISSING", None, "no rng_audit_log row for this run",
                                 path=None if audit_file is None else str(audit_file)))
    sums: dict[tuple[str, str], list[int]] = {}
    key_family: dict[tuple[str, str], str] = {}
    for fam, summary in summaries.items():
        if isinstance(summary, BaseException):
            failures.append(_read_failure(summary, fam))
            continue
        failures += summary.failures
        for s in families[fam]["streams"]:
            key_family.setdefault((s["module"], s["substream_label"]), fam)
        for key, (n, bl, dr) in summary.sums.items():
            acc = sums.setdefault(key, [0, 0, 0])
            acc[0] += n
            acc[1] += bl
            acc[2] += dr
            key_family.setdefault(key, fam)
    if isinstance(trace, BaseException):
        failures.append(_read_failure(trace, None))
        return failures
    failures += trace.failures
    registered = {(s["module"], s["substream_label"]) for f in summaries for s in families[f]["streams"]}
    for key in sorted(set(sums) | (set(trace.keys) & registered)):
        m, l = key
        fam = key_family.get(key)
        n_ev, s_bl, s_dr = sums.get(key, [0, 0, 0])
        n_rows, final = trace.keys.get(key, (0, None))
        if n_rows != n_ev:
            failures.append(_failure("E_TRACE_COVERAGE_MISSING", fam,
                                     f"trace has {n_rows} rows for ({m}, {l}) but the events number {n_ev}",
                                     module=m, label=l, trace_rows=n_rows, events=n_ev))
        if n_rows == 0:
            continue
        got = (final["events_total"], final["blocks_total"], final["draws_total"])
        if got != (n_ev, s_bl, s_dr):
            failures.append(_failure("E_TRACE_TOTALS_MISMATCH", fam,
                                     f"final trace totals (events, blocks, draws) {got} != event sums "
                                     f"{(n_ev, s_bl, s_dr)} for ({m}, {l})", module=m, label=l,
                                     trace_final=final, event_sums={"events_total": n_ev, "blocks_total": s_bl,
                                                                    "draws_total": s_dr}))
    return failures


def reconcile(data_root: str | Path, ids: Any, families: Iterable[str] | None = None, chain: bool = False,
              config: Mapping | None = None, source: str = "auto", events: Mapping[str, pa.Table] | None = None,
              trace: pa.Table | None = None, verify: str | None = None) -> list[dict]:
    """Events vs trace vs audit for one run (see module docstring). Returns failure dicts (empty = clean).
    ``source`` and ``verify`` as in :func:`read_events` (``"jsonl"``: parse every log file, ignoring the mirrors).
    ``events`` (family -> table as :func:`read_events` with ``with_source=True`` gives it) and ``trace`` let a
    caller that already read them pass them in instead of reading again (same results).

    The composition of :func:`reconciled_families`, :func:`summarise_events` (one family at a time),
    :func:`summarise_trace` and :func:`reconcile_summaries`."""
    table = _dict_for(ids, config).families()
    wanted = reconciled_families(table, ids.segment, families)
    audit = read_audit(data_root, ids, config)
    summaries: dict[str, FamilySummary | RngError] = {}
    for fam in wanted:
        ev = (events or {}).get(fam)
        if ev is None:
            try:
                ev = read_events(data_root, ids, fam, config=config, with_source=True, source=source,
                                 dictionary=True, verify=verify)
            except RngError as exc:  # a line that does not fit the family schema: report, keep checking others
                summaries[fam] = exc
                continue
        summaries[fam] = summarise_events(ev, fam, table[fam], ids, chain=chain)
        del ev
    tsum: TraceSummary | RngError
    if trace is None:
        try:
            trace = read_trace(data_root, ids, config, source=source, dictionary=True, verify=verify)
        except RngError as exc:
            tsum = exc
    if trace is not None:
        tsum = summarise_trace(trace, ids)
    return reconcile_summaries(ids, table, summaries, tsum, audit, audit_path(data_root, ids, config))


def accounting(data_root: str | Path, ids: Any, families: Iterable[str] | None = None,
               config: Mapping | None = None, source: str = "auto", verify: str | None = None) -> dict:
    """Per-family and per-(module, substream_label) totals for validation bundles (``rng_accounting.json``):
    ``{"audit_present": bool, "families": {family: {events_total, blocks_total, draws_total (decimal str),
    nonconsuming_events}}, "streams": {"module|label": {events_total, blocks_total, draws_total,
    trace_rows_total, trace_final: {events_total, blocks_total, draws_total} | None}}}`` (exact ints)."""
    d = _dict_for(ids, config)
    table = d.families()
    wanted = list(families) if families is not None else [
        f for f, s in table.items() if s.get("segment") == ids.segment and not s.get("unused")]
    out: dict[str, Any] = {"audit_present": _audit_matches(read_audit(data_root, ids, config), ids),
                           "families": {}, "streams": {}}
    streams: dict[tuple[str, str], list[int]] = {}
    for fam in wanted:
        ev = read_events(data_root, ids, fam, config=config, source=source, verify=verify)
        draws, _ = parse_draws(ev) if ev.num_rows else (np.zeros(0, np.uint64), None)
        blocks = _np(ev, "blocks") if ev.num_rows else np.zeros(0, np.uint64)
        nonc = 0
        if ev.num_rows:
            nonc = int(np.count_nonzero((blocks == 0) & (draws == 0)))
        out["families"][fam] = {"events_total": ev.num_rows, "blocks_total": exact_sum(blocks),
                                "draws_total": str(exact_sum(draws)), "nonconsuming_events": nonc}
        if ev.num_rows:
            combo = pc.binary_join_element_wise(ev["module"], ev["substream_label"], "\x00")
            for key_str in pc.unique(pc.drop_null(combo)).to_pylist():
                m, _, l = key_str.partition("\x00")
                mask = _bool(pc.equal(combo, key_str))
                acc = streams.setdefault((m, l), [0, 0, 0])
                acc[0] += int(mask.sum())
                acc[1] += exact_sum(blocks[mask])
                acc[2] += exact_sum(draws[mask])
    trace = read_trace(data_root, ids, config, source=source, verify=verify)
    tcombo = (pc.binary_join_element_wise(trace["module"], trace["substream_label"], "\x00")
              if trace.num_rows else None)
    for (m, l), (n_ev, s_bl, s_dr) in sorted(streams.items()):
        sub = trace.filter(pc.equal(tcombo, f"{m}\x00{l}")) if tcombo is not None else trace
        final = _final_trace_row(sub) if sub.num_rows else None
        out["streams"][f"{m}|{l}"] = {
            "events_total": n_ev, "blocks_total": s_bl, "draws_total": str(s_dr), "trace_rows_total": sub.num_rows,
            "trace_final": None if final is None else {k: final[k] for k in
                                                       ("events_total", "blocks_total", "draws_total")},
        }
    return out
