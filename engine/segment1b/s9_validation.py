"""1B S9 - validation bundle, ``_passed.flag`` and stage log (spec 1B 11; 00-core 5; decisions 2, 5, 22, 25, 27).

No RNG. S9 re-derives parity, schema, identity, sort, geometry and RNG accounting from the stored files of one
1B run (seed, 1B parameter_hash, 1B fingerprint, 1B run_id) and publishes a fingerprint-scoped bundle at
``validation_bundle_1B`` (``data/layer1/1B/validation/seed={seed}/fingerprint={fp}/``). ``_passed.flag`` is
written only on PASS. Every check runs and every failure is collected (spec 1B 11 "all run"):

==========  ==================================================================================================
A901        parity of ``s7_site_synthesis`` and ``site_locations``: S7 key absent from S8 ``E901_ROW_MISSING``
            (also an S8 row whose coordinates differ from S7's: the projection of that S7 row is missing),
            S8 key absent from S7 ``E902_ROW_EXTRA``, duplicate S8 key ``E903_DUP_KEY``.
A902        every ``site_locations`` file matches ``contracts/schemas/1B/site_locations.schema.json``: exactly the
            five columns in order, their Arrow types (a wrong column type fails), ranges, ISO pattern, no nulls
            -> ``E904_EGRESS_SCHEMA_VIOLATION`` (S7 schema problems are reported under the same code).
A903/A912   ``site_locations`` path carries exactly this seed and fingerprint, no ``parameter_hash=``/``run_id=``,
            and holds only ``part-NNNNN.parquet`` files (``E905_PARTITION_OR_IDENTITY``); S7's path carries the
            seed, 1B parameter_hash and fingerprint and ``run_id`` is the decision-15 value of these identities
            (``E912_IDENTITY_COHERENCE``).
A904        rows in writer sort within and across files in ASCII file order (``E906_WRITER_SORT_VIOLATION``).
A905        RNG accounting (``E907_RNG_BUDGET_OR_COUNTERS``): :func:`engine.core.rnglog.reconcile` over
            ``site_tile_assign`` and ``in_cell_jitter`` with chaining (audit row present, module/label, embedded
            identities incl. run_id, ``blocks = u128(after) - u128(before)``, budgets ``1/"1"`` and ``1/"2"``,
            trace row count = event count and final totals = event sums per (module, substream_label, run_id),
            consecutive events of a substream chain) plus cardinality: exactly one ``site_tile_assign`` event
            per site and none for an unknown site, its ``tile_id`` = S7's; at least one ``in_cell_jitter``
            event per site and none for an unknown site; the accepted attempt (the site's last event, max
            after-counter) reproduces S7's coordinates exactly (``centroid + delta``, :func:`synthesise_coordinates`).
            Unreadable or missing event / trace / audit files are E907 too.
geometry    every S7 tile is in ``tile_bounds`` (``E709_TILE_FK_VIOLATION``); every point lies in its pixel,
            bounds inclusive with eps 1e-9 degrees (``E707_POINT_OUTSIDE_PIXEL``, spec 1B 9 step 4) and in its
            legal country (``E608_POINT_OUTSIDE_COUNTRY``): the decision-24 predicate (closed shell, holes
            excluded; :meth:`engine.segment1b.spatial.CountryShape.contains_points`, shapely ``intersects_xy``
            = covers for points) that S6 accepted with; a point failing it still passes if it lies within
            ``COUNTRY_TOL_DEG`` = 1e-9 degrees of the country (binary64 rounding of centroid + delta may move a
            boundary point by an ulp). The spec's S9 has no code of its own for these two; the state codes that
            name them (S7 E707, S6 E608) are reused.
A911        the dictionary keeps egress final and order-free: writer sort = site key, partitioning
            [seed, manifest_fingerprint], no column beyond the five (``E911_FINALITY_OR_ORDER_LEAK``).
A906-A909   the bundle about to be written holds every required file (``E908_BUNDLE_CONTENTS_MISSING``).
==========  ==================================================================================================

Bundle (all bytes deterministic; no timestamps, no absolute paths, no paths that a dictionary change would move):
``MANIFEST.json``, ``parameter_hash_resolved.json``, ``manifest_fingerprint_resolved.json``,
``egress_checksums.json``, ``rng_accounting.json``, ``s9_summary.json`` (with ``passed``, ``failure_codes``,
``failures``) and ``index.json`` (:func:`engine.core.bundle.write_bundle`). On FAIL the bundle is published
without flag, then :class:`ValidationFailure` is raised (non-zero exit; the Snakemake rule's only output is the
flag, so the failed bundle stays). A PASS bundle is write-once (``E913_ATOMIC_PUBLISH_VIOLATION``).

Stage log (decisions 2, 22): one JSON line per stage boundary (``initialise``, ``load_inputs``, ``validate``,
``persist_bundle``; ``begin``/``end``) appended to ``s9_stage_log`` (append-only across runs), each with
``seed, parameter_hash, manifest_fingerprint, run_id``, ``elapsed_ns`` (monotonic nanoseconds since this S9
execution started) and ``ts_utc`` (allowed: the file is under ``logs/``); ``validate`` end carries
``extra {passed, failure_count}``, ``persist_bundle`` end ``extra {flag_emitted, ...}``.

API: :func:`validate` (pure w.r.t. ``data/``: reads, never writes), :func:`run` (Snakemake), :func:`revalidate`
(CLI ``validate-s9``: re-checks without re-publishing and compares with the stored bundle).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.core import bundle as bundle_mod
from engine.core import dictionary, identities, rnglog
from engine.core.errors import EngineError, GateError, ValidationFailure
from engine.core.progress import Progress
from engine.core.publish import canonical_json_bytes
from engine.core.schema import arrow_schema, load_schema, validate_table
from engine.segment1b.s7_synthesis import (
    KEY,
    cast_keys,
    duplicate_keys,
    first_rows,
    group_rows,
    inside_pixel,
    key_differences,
    keys_where,
    lookup_tile_bounds,
    orderable,
    same_keys,
    sort_by_key,
    synthesise_coordinates,
)
from engine.segment1b.s8_site_locations import EGRESS_COLUMNS, is_sorted

PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"
VERSION = "1B.validation.v1"
STAGES = ("initialise", "load_inputs", "validate", "persist_bundle")
FAMILIES = {  # spec 1B 0.5: family -> (module, label, blocks, draws)
    "site_tile_assign": ("1B.S5.assigner", "site_tile_assign", 1, "1"),
    "in_cell_jitter": ("1B.S6.jitter", "in_cell_jitter", 1, "2"),
}
COUNTRY_TOL_DEG = 1e-9
REQUIRED_FILES = ("MANIFEST.json", "egress_checksums.json", "manifest_fingerprint_resolved.json",
                  "parameter_hash_resolved.json", "rng_accounting.json", "s9_summary.json")
# ops record under logs/ (not a dataset): the resolved run, so `segment1b validate-s9` can find it from identities
_PART_RE = re.compile(r"^part-[0-9]{5}\.parquet$")
_TRACE_CODES = ("E_TRACE_COVERAGE_MISSING", "E_TRACE_TOTALS_MISMATCH")
MAX_ROWS = 10


# ====================================================================== results
@dataclass
class Result:
    """Outcome of :func:`validate`: ``bundle_files`` maps bundle-relative paths to their bytes (without
    ``index.json`` and the flag, which :func:`engine.core.bundle.write_bundle` adds)."""

    passed: bool
    failure_codes: list[str]
    failures: list[dict]
    bundle_files: dict[str, bytes]
    summary: dict = field(default_factory=dict)


class _Failures:
    def __init__(self, data_root: Path):
        self.items: list[dict] = []
        self.root = str(Path(data_root).resolve())

    def add(self, code: str, check: str, message: str, rows: list | None = None, count: int | None = None,
            **detail: Any) -> None:
        f: dict[str, Any] = {"code": code, "check": check, "message": message}
        if count is not None:
            f["count"] = int(count)
        if rows:
            f["rows"] = _plain(rows[:MAX_ROWS])
        if detail:
            f["detail"] = _plain(detail)
        self.items.append(_relativise(f, self.root))

    @property
    def codes(self) -> list[str]:
        return sorted({f["code"] for f in self.items})


def _plain(obj: Any) -> Any:
    """JSON-safe copy (numpy scalars -> Python, tuples -> lists, non-finite floats -> strings)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return repr(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _relativise(obj: Any, root: str) -> Any:
    """Strip the data root from every string (bundle bytes must not depend on where the data root is)."""
    if isinstance(obj, dict):
        return {k: _relativise(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relativise(v, root) for v in obj]
    if isinstance(obj, str) and root in obj:
        return obj.replace(root + os.sep, "").replace(root, ".")
    return obj


# ====================================================================== stage log
class StageLog:
    """Appends S9 stage lines to ``s9_stage_log`` (append-only across runs, decision 22)."""

    def __init__(self, ctx, mode: str = "run"):
        self.path = Path(ctx.path("s9_stage_log"))
        self.ids = ctx.ids
        self.mode = mode
        self.t0 = time.perf_counter_ns()

    def emit(self, stage: str, status: str, extra: dict | None = None) -> None:
        line: dict[str, Any] = {
            "ts_utc": rnglog.utc_now(), "stage": stage, "status": status, "seed": int(self.ids.seed),
            "parameter_hash": self.ids.parameter_hash, "manifest_fingerprint": self.ids.manifest_fingerprint,
            "run_id": self.ids.run_id, "elapsed_ns": time.perf_counter_ns() - self.t0,
        }
        if extra is not None:
            line["extra"] = _plain(extra)
        data = canonical_json_bytes(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # concurrent S9 runs of other identities share the file
            os.write(fd, data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """``with log.stage("validate") as extra: ...; extra.update(...)`` -> begin and end lines; an exception
        ends the stage with ``extra.error`` = its code and propagates."""
        self.emit(name, "begin")
        extra: dict = {}
        try:
            yield extra
        except EngineError as exc:
            self.emit(name, "end", {**extra, "error": exc.code})
            raise
        except Exception as exc:
            self.emit(name, "end", {**extra, "error": type(exc).__name__})
            raise
        self.emit(name, "end", extra or None)


@contextlib.contextmanager
def _maybe_stage(log: StageLog | None, name: str) -> Iterator[dict]:
    if log is None:
        yield {}
    else:
        with log.stage(name) as extra:
            yield extra


# ====================================================================== loading
@dataclass
class Inputs:
    s7: pa.Table | None = None
    s7_files: list[tuple[str, str]] = field(default_factory=list)  # (name, sha256)
    egress_files: list[tuple[str, pa.Table | None, str]] = field(default_factory=list)  # (name, table, sha256)
    egress_other: list[str] = field(default_factory=list)
    egress_present: bool = False
    events: dict[str, pa.Table | None] = field(default_factory=dict)
    event_errors: dict[str, str] = field(default_factory=dict)
    reconcile: list[dict] = field(default_factory=list)
    trace: pa.Table | None = None
    bounds_found: np.ndarray | None = None
    bounds: dict[str, np.ndarray] | None = None
    shapes: dict | None = None
    rng_pending: Future | None = None  # the RNG logs being read in the background (load_inputs with a pool)
    rng_events_pending: dict[str, Future] = field(default_factory=dict)  # family -> (events, error) once read


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parts(d: Path) -> tuple[list[Path], list[str]]:
    """(part files in ASCII order, other visible entries) of a partition directory."""
    parts, other = [], []
    for p in sorted(d.iterdir(), key=lambda x: x.name.encode("utf-8")):
        if p.name.startswith(("_", ".")):
            continue  # staging leftovers and hidden files are never read (engine.core.publish)
        if p.is_file() and _PART_RE.match(p.name):
            parts.append(p)
        else:
            other.append(p.name + ("/" if p.is_dir() else ""))
    return parts, other


def load_inputs(ctx, fails: _Failures, rng: bool = True, pool: ThreadPoolExecutor | None = None) -> Inputs:
    """Read everything S9 checks; unreadable or missing inputs become failures, never exceptions (except the
    reference polygons, whose absence is an environment error). ``rng=False`` leaves the RNG logs to a later
    :func:`load_rng_logs` (their hashing starts here, in the background); with a ``pool`` (two workers) the
    polygons load on it while the datasets are read, and with ``rng=False`` the RNG logs' reading (and
    reconciliation) starts on it too, :func:`load_rng_logs` then collecting the result."""
    inp = Inputs()
    # hash the RNG logs (GBs at 10^6 merchants) in the background while the datasets below are read and checked
    rnglog.prefetch_digests(ctx.data_root, ctx.ids, list(FAMILIES), ctx.config)
    shapes_pending = None
    if pool is not None:
        # the reference polygons load meanwhile (used, and their errors raised, only when S7 has rows)
        shapes_pending = pool.submit(_load_shapes, ctx)
    if not rng and pool is not None:
        # each read waits for its digest, then decodes; a family's table is published as soon as it is read
        inp.rng_events_pending = {fam: Future() for fam in FAMILIES}
        inp.rng_pending = pool.submit(_read_rng_logs, ctx, inp.rng_events_pending)
    s7_dir = Path(ctx.path("s7_site_synthesis"))
    if s7_dir.is_dir():
        parts, _ = _parts(s7_dir)
        inp.s7_files = [(p.name, _sha256_file(p)) for p in parts]
        tables = [pq.ParquetFile(p).read() for p in parts]
        s7_schema = ctx.schema_path("s7_site_synthesis")
        t = pa.concat_tables(tables) if len(tables) > 1 else (tables[0] if tables else None)
        if t is None:
            fails.add("E905_PARTITION_OR_IDENTITY", "A903", "s7_site_synthesis partition holds no part file",
                      path=str(s7_dir))
        else:
            problems = validate_table(t, s7_schema)
            if problems:
                fails.add("E904_EGRESS_SCHEMA_VIOLATION", "A902", "s7_site_synthesis does not match its schema",
                          rows=problems, dataset="s7_site_synthesis")
            try:
                inp.s7 = sort_by_key(t.select(load_schema(s7_schema)["x-column-order"]).cast(arrow_schema(s7_schema))
                                     .combine_chunks())  # one chunk per column: numpy views without copies
            except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                inp.s7 = None
    else:
        fails.add("E905_PARTITION_OR_IDENTITY", "A903", "s7_site_synthesis partition not found", path=str(s7_dir))

    s8_dir = Path(ctx.path("site_locations"))
    if s8_dir.is_dir():
        inp.egress_present = True
        parts, inp.egress_other = _parts(s8_dir)
        for p in parts:
            try:
                t = pq.ParquetFile(p).read()
            except (OSError, pa.ArrowInvalid) as exc:
                t = None
                fails.add("E904_EGRESS_SCHEMA_VIOLATION", "A902", f"site_locations file {p.name} unreadable: {exc}")
            inp.egress_files.append((p.name, t, _sha256_file(p)))

    if inp.s7 is not None and inp.s7.num_rows:
        inp.bounds_found, inp.bounds = lookup_tile_bounds(
            ctx.path("tile_bounds"), inp.s7["legal_country_iso"],
            np.asarray(inp.s7["tile_id"].to_numpy(zero_copy_only=False), np.uint64))
        inp.shapes = shapes_pending.result() if shapes_pending is not None else _load_shapes(ctx)
    if rng:
        load_rng_logs(ctx, inp)
    return inp


def _load_shapes(ctx) -> dict:
    from engine.segment1b import spatial

    return spatial.load_world_countries(ctx.config["segment1b"]["inputs"]["world_countries"])


def load_rng_logs(ctx, inp: Inputs) -> None:
    """The RNG part of :func:`load_inputs`: both event families and the trace, each read once (string columns
    kept dictionary-encoded as the mirrors store them; event columns no check reads are skipped:
    :data:`_UNREAD_EVENT_COLUMNS`) and handed to :func:`engine.core.rnglog.reconcile`. Unreadable files are
    recorded, never raised. Their mirrors' sha256 checks were started in the background by :func:`load_inputs`;
    when it was given a pool, the reading and reconciliation run there meanwhile and are collected here
    (:func:`validate` does this last, after the dataset and geometry checks)."""
    pending = inp.rng_pending
    inp.rng_pending = None
    inp.rng_events_pending = {}
    inp.events, inp.event_errors, inp.trace, inp.reconcile = (
        pending.result() if pending is not None else _read_rng_logs(ctx))


# event columns that neither reconcile (envelope, budgets, chains, failure rows) nor the A905 checks read
_UNREAD_EVENT_COLUMNS = frozenset({"ts_utc", "u", "sigma_lat_deg", "sigma_lon_deg"})


def _read_rng_logs(ctx, published: dict[str, Future] | None = None) -> tuple[dict, dict, pa.Table | None,
                                                                              list[dict]]:
    """(events by family, event read errors by family, trace, reconcile failures): see :func:`load_rng_logs`.
    ``published``: family -> Future, each given ``(events or None, error or None)`` as soon as that family is
    read (or the exception that ended this function)."""
    events: dict[str, pa.Table | None] = {}
    errors: dict[str, str] = {}
    try:
        progress = Progress("1B.S9", total=len(FAMILIES) + 1, unit="rng logs")
        for fam in FAMILIES:
            try:
                d = dictionary.load("1B", ctx.config)
                names = arrow_schema(load_schema(d.schema_ref("rng_event", family=fam))).names
                cols = [c for c in names if c not in _UNREAD_EVENT_COLUMNS] + ["_part", "_line"]
                events[fam] = rnglog.read_events(ctx.data_root, ctx.ids, fam, columns=cols, config=ctx.config,
                                                 with_source=True, dictionary=True)
            except EngineError as exc:
                events[fam] = None
                errors[fam] = f"{exc.code}: {exc.message}"
            if published is not None:
                published[fam].set_result((events[fam], errors.get(fam)))
            progress.advance(1)
    except BaseException as exc:
        for fut in (published or {}).values():
            if not fut.done():
                fut.set_exception(exc)
        raise
    try:
        trace = rnglog.read_trace(ctx.data_root, ctx.ids, ctx.config, dictionary=True)
    except EngineError:
        trace = None
    progress.advance(1)
    progress.finish()
    try:
        # what could not be read here (a file not fitting its schema) reconcile reads and reports itself
        rec = rnglog.reconcile(ctx.data_root, ctx.ids, families=list(FAMILIES), chain=True, config=ctx.config,
                               trace=trace, events={f: t for f, t in events.items() if t is not None})
    except EngineError as exc:
        rec = [{"code": exc.code, "family": None, "detail": exc.message, "rows": exc.rows}]
    return events, errors, trace, rec


# ====================================================================== checks
def _egress_checks(ctx, inp: Inputs, fails: _Failures) -> pa.Table | None:
    """A902 per file, A903 path/contents, returns the typed concatenation (None when not castable)."""
    spath = ctx.schema_path("site_locations")
    target = arrow_schema(spath)
    s8_dir = Path(ctx.path("site_locations"))
    rel = s8_dir.relative_to(ctx.data_root) if s8_dir.is_relative_to(ctx.data_root) else s8_dir
    toks = dictionary.parse_tokens(rel)
    want = {"seed": str(ctx.ids.seed), "manifest_fingerprint": ctx.ids.manifest_fingerprint}
    wrong = {k: toks.get(k) for k, v in want.items() if toks.get(k) != v}
    forbidden = {k: toks[k] for k in ("parameter_hash", "run_id") if k in toks}
    if wrong or forbidden:
        fails.add("E905_PARTITION_OR_IDENTITY", "A903", "site_locations path does not carry exactly this run's "
                  "seed and fingerprint (and no parameter_hash / run_id)", expected=want, wrong=wrong,
                  forbidden=forbidden)
    if not inp.egress_present:
        fails.add("E905_PARTITION_OR_IDENTITY", "A903", "site_locations partition not found (did S8 run?)",
                  path=str(s8_dir))
        return None
    if inp.egress_other:
        fails.add("E905_PARTITION_OR_IDENTITY", "A903", "site_locations partition holds entries other than "
                  "part-NNNNN.parquet files (e.g. key=value sub-folders)", rows=inp.egress_other)
    if not inp.egress_files:
        fails.add("E905_PARTITION_OR_IDENTITY", "A903", "site_locations partition holds no part file")
        return target.empty_table()
    order = list(target.names)
    typed: list[pa.Table] = []
    castable = True
    for name, t, _ in inp.egress_files:
        if t is None:
            castable = False
            continue
        problems = validate_table(t, spath)
        if t.column_names != order and sorted(t.column_names) == sorted(order):
            problems.append(f"column order {t.column_names}, expected {order}")
        if problems:
            fails.add("E904_EGRESS_SCHEMA_VIOLATION", "A902", f"site_locations file {name} does not match "
                      "schemas/1B/site_locations.schema.json", rows=problems, file=name)
        try:
            typed.append(t.select(order).cast(target))
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            castable = False
    if not castable:
        return None
    return (pa.concat_tables(typed) if len(typed) > 1 else typed[0]).combine_chunks()


def _parity_clean(s7: pa.Table, s8: pa.Table) -> dict | None:
    """A901 without joins: when ``site_locations`` holds S7's keys row for row (both strictly increasing) with
    S7's coordinates, every A901 check passes; returns the per-country sizes then, else None (the join path
    runs and reports)."""
    if s7.num_rows == 0 or not same_keys(s7.select(list(KEY)), s8.select(list(KEY)), KEY):
        return None
    for c in ("lon_deg", "lat_deg"):
        a = np.asarray(s7[c].to_numpy(zero_copy_only=False), np.float64)
        b = np.asarray(s8[c].to_numpy(zero_copy_only=False), np.float64)
        if not (a == b).all():
            return None
    col = s7["legal_country_iso"]
    enc = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    names = enc.dictionary.to_pylist()
    counts = np.bincount(np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64), minlength=len(names))
    return {iso: {"rows_s7": int(counts[k]), "rows_s8": int(counts[k]), "parity_ok": True}
            for iso, k in sorted((names[k], k) for k in range(len(names)))}


def _parity_checks(s7: pa.Table, s8: pa.Table, fails: _Failures) -> dict:
    fast = _parity_clean(s7, s8)
    if fast is not None:
        return fast
    d = duplicate_keys(s8)
    if d.num_rows:
        fails.add("E903_DUP_KEY", "A901", "site_locations has duplicate site keys", rows=first_rows(d),
                  count=d.num_rows)
    missing, extra = key_differences(s7, s8)
    if missing.num_rows:
        fails.add("E901_ROW_MISSING", "A901", "sites of s7_site_synthesis absent from site_locations",
                  rows=first_rows(missing), count=missing.num_rows)
    if extra.num_rows:
        fails.add("E902_ROW_EXTRA", "A901", "site_locations rows for sites absent from s7_site_synthesis",
                  rows=first_rows(extra), count=extra.num_rows)
    j = s7.select([*KEY, "lon_deg", "lat_deg"]).join(
        s8.select([*KEY, "lon_deg", "lat_deg"]).rename_columns([*KEY, "lon_s8", "lat_s8"]), list(KEY))
    j = sort_by_key(j)
    if j.num_rows:
        lon7, lat7 = (np.asarray(j[c].to_numpy(zero_copy_only=False), np.float64) for c in ("lon_deg", "lat_deg"))
        lon8, lat8 = (np.asarray(j[c].to_numpy(zero_copy_only=False), np.float64) for c in ("lon_s8", "lat_s8"))
        bad = ~((lon7 == lon8) & (lat7 == lat8))
        if bad.any():
            fails.add("E901_ROW_MISSING", "A901", "site_locations coordinates differ from s7_site_synthesis (the "
                      "S7 row's projection is missing)", rows=keys_where(j, bad, [*KEY, "lon_deg", "lat_deg",
                                                                                   "lon_s8", "lat_s8"]),
                      count=int(bad.sum()))
    # per-country sizes for the summary
    by: dict[str, dict] = {}
    for name, t in (("rows_s7", s7), ("rows_s8", s8)):
        if t.num_rows:
            g = t.group_by(["legal_country_iso"]).aggregate([([], "count_all")])
            for iso, n in zip(g["legal_country_iso"].to_pylist(), g["count_all"].to_pylist()):
                by.setdefault(iso, {"rows_s7": 0, "rows_s8": 0})[name] = int(n)
    bad_iso = set()
    for t in (missing, extra):
        bad_iso.update(t["legal_country_iso"].to_pylist())
    if j.num_rows and bad.any():
        bad_iso.update(j.filter(pa.array(bad))["legal_country_iso"].to_pylist())
    for iso, v in by.items():
        v["parity_ok"] = iso not in bad_iso and v["rows_s7"] == v["rows_s8"]
    return dict(sorted(by.items()))


def _identity_checks(ctx, fails: _Failures) -> None:
    ids = ctx.ids
    s7_dir = Path(ctx.path("s7_site_synthesis"))
    rel = s7_dir.relative_to(ctx.data_root) if s7_dir.is_relative_to(ctx.data_root) else s7_dir
    toks = dictionary.parse_tokens(rel)
    want = {"seed": str(ids.seed), "parameter_hash": ids.parameter_hash,
            "manifest_fingerprint": ids.manifest_fingerprint}
    wrong = {k: toks.get(k) for k, v in want.items() if toks.get(k) != v}
    if wrong:
        fails.add("E912_IDENTITY_COHERENCE", "A912", "s7_site_synthesis path does not carry this run's seed, "
                  "parameter_hash and fingerprint", expected=want, wrong=wrong)
    expect = identities.run_id("1B", ids.manifest_fingerprint, ids.parameter_hash, int(ids.seed))
    if ids.run_id != expect:
        fails.add("E912_IDENTITY_COHERENCE", "A912", "run_id is not the decision-15 run_id of this seed, "
                  "parameter_hash and fingerprint", run_id=ids.run_id, expected=expect)


def _dictionary_checks(ctx, fails: _Failures) -> None:
    d = dictionary.load("1B", ctx.config)
    e = d.entry("site_locations")
    cols = load_schema(ctx.schema_path("site_locations")).get("x-column-order")
    problems = []
    if tuple(e.writer_sort) != KEY:
        problems.append(f"writer_sort {list(e.writer_sort)} != {list(KEY)}")
    if tuple(e.partitioning) != ("seed", "manifest_fingerprint"):
        problems.append(f"partitioning {list(e.partitioning)} != ['seed', 'manifest_fingerprint']")
    if tuple(cols or ()) != EGRESS_COLUMNS:
        problems.append(f"egress columns {cols} != {list(EGRESS_COLUMNS)}")
    if problems:
        fails.add("E911_FINALITY_OR_ORDER_LEAK", "A911", "site_locations is not declared final and order-free",
                  rows=problems)


def _geometry_checks(inp: Inputs, fails: _Failures) -> dict:
    s7 = inp.s7
    n = s7.num_rows
    found = inp.bounds_found
    if not found.all():
        fails.add("E709_TILE_FK_VIOLATION", "geometry", "(legal_country_iso, tile_id) of s7_site_synthesis not "
                  "in tile_bounds", rows=keys_where(s7, ~found, [*KEY, "tile_id"]), count=int((~found).sum()))
    lon = np.asarray(s7["lon_deg"].to_numpy(zero_copy_only=False), np.float64)
    lat = np.asarray(s7["lat_deg"].to_numpy(zero_copy_only=False), np.float64)
    in_pix = inside_pixel(lon, lat, inp.bounds) | ~found
    if not in_pix.all():
        fails.add("E707_POINT_OUTSIDE_PIXEL", "geometry", "site outside its pixel (inclusive, eps 1e-9 deg)",
                  rows=keys_where(s7, ~in_pix, [*KEY, "tile_id", "lon_deg", "lat_deg"]),
                  count=int((~in_pix).sum()))
    import shapely
    from shapely.geometry import MultiPolygon

    in_country = np.zeros(n, dtype=bool)
    iso = s7["legal_country_iso"]
    enc = pc.dictionary_encode(iso.combine_chunks() if isinstance(iso, pa.ChunkedArray) else iso)
    names = enc.dictionary.to_pylist()
    order, cuts = group_rows(enc.indices, len(names))
    no_polygon = []
    for k, code in sorted(enumerate(names), key=lambda x: x[1]):
        rows = order[cuts[k]:cuts[k + 1]]  # ascending
        shape = (inp.shapes or {}).get(code)
        if shape is None or not shape.parts:
            no_polygon.append(code)
            continue
        ok = shape.contains_points(lon[rows], lat[rows])
        if not ok.all():  # tolerance for points an ulp off the boundary
            out = rows[~ok]
            dist = shapely.distance(MultiPolygon(shape.parts), shapely.points(lon[out], lat[out]))
            ok[~ok] = dist <= COUNTRY_TOL_DEG
        in_country[rows] = ok
    if not in_country.all():
        fails.add("E608_POINT_OUTSIDE_COUNTRY", "geometry", "site outside its legal country's polygon (closed "
                  f"shell minus holes, tolerance {COUNTRY_TOL_DEG} deg)",
                  rows=keys_where(s7, ~in_country, [*KEY, "tile_id", "lon_deg", "lat_deg"]),
                  count=int((~in_country).sum()), countries_without_polygon=no_polygon)
    return {"inside_pixel_fail_count": int((~in_pix).sum()), "inside_country_fail_count": int((~in_country).sum()),
            "fk_tile_fail_count": int((~found).sum())}


def _last_event_per_site(ev: pa.Table) -> pa.Table:
    """The site's accepted attempt: its event with the largest after-counter (counters increase within a site,
    spec 1B 8 A613)."""
    t = ev.select([*KEY, "delta_lat_deg", "delta_lon_deg", "rng_counter_after_hi", "rng_counter_after_lo"])
    t = t.take(pc.sort_indices(t, sort_keys=[("merchant_id", "ascending"), ("legal_country_iso", "ascending"),
                                             ("site_order", "ascending"), ("rng_counter_after_hi", "descending"),
                                             ("rng_counter_after_lo", "descending")]))
    if t.num_rows < 2:
        return t
    m = np.asarray(t["merchant_id"].to_numpy(zero_copy_only=False), np.uint64)
    s = np.asarray(t["site_order"].to_numpy(zero_copy_only=False), np.int64)
    iso = t["legal_country_iso"]
    diff_iso = ~np.asarray(pc.fill_null(pc.equal(iso.slice(1), iso.slice(0, t.num_rows - 1)), False)
                           .to_numpy(zero_copy_only=False), bool)
    start = np.concatenate([[True], (m[1:] != m[:-1]) | (s[1:] != s[:-1]) | diff_iso])
    return t.filter(pa.array(start))


def _site_tile_clean(keys7: pa.Table, ev: pa.Table) -> bool:
    """True when the site_tile_assign events hold exactly S7's site keys row for row (both strictly increasing,
    so: one event per site, none for an unknown site) with S7's tile_id -- every A905 cardinality check of the
    family passes, proved without joins. False: not proved, the join path runs and reports."""
    k5 = ev.select([*KEY, "tile_id"])
    if ev["tile_id"].null_count or keys7["tile_id"].null_count or not same_keys(keys7, k5):
        return False
    return bool(np.array_equal(np.asarray(keys7["tile_id"].to_numpy(zero_copy_only=False), np.uint64),
                               np.asarray(k5["tile_id"].to_numpy(zero_copy_only=False), np.uint64)))


def _jitter_clean(s7: pa.Table, ev: pa.Table, bounds: dict | None) -> bool:
    """True when the in_cell_jitter events come in site-key order, their runs of equal keys are exactly S7's
    sites (>= 1 event per site, none for an unknown site), each run's after-counters strictly increase (so its
    last event is the accepted attempt :func:`_last_event_per_site` picks) and that event reproduces S7's
    coordinates -- every A905 check of the family passes. False: not proved, the join path runs and reports."""
    n = ev.num_rows
    if n == 0:
        return False
    cols = [orderable(ev[k]) for k in KEY]
    ah = ev["rng_counter_after_hi"]
    al = ev["rng_counter_after_lo"]
    if any(c is None for c in cols) or ah.null_count or al.null_count:
        return False
    same = np.ones(n - 1, dtype=bool)
    for x in cols:
        if (same & (x[1:] < x[:-1])).any():
            return False
        same &= x[1:] == x[:-1]
    start = np.flatnonzero(np.concatenate([[True], ~same]))
    if not same_keys(s7.select(list(KEY)), ev.select(list(KEY)).take(pa.array(start)), KEY):
        return False
    ah = np.asarray(ah.to_numpy(zero_copy_only=False), np.uint64)
    al = np.asarray(al.to_numpy(zero_copy_only=False), np.uint64)
    up = (ah[1:] > ah[:-1]) | ((ah[1:] == ah[:-1]) & (al[1:] > al[:-1]))
    if (same & ~up).any():
        return False
    if bounds is None:
        return True
    last = pa.array(np.append(start[1:] - 1, n - 1))
    dlon = np.asarray(ev["delta_lon_deg"].take(last).to_numpy(zero_copy_only=False), np.float64)
    dlat = np.asarray(ev["delta_lat_deg"].take(last).to_numpy(zero_copy_only=False), np.float64)
    lon, lat = synthesise_coordinates(bounds["centroid_lon_deg"], bounds["centroid_lat_deg"], dlon, dlat)
    known = np.isfinite(bounds["centroid_lon_deg"])
    lon7 = np.asarray(s7["lon_deg"].to_numpy(zero_copy_only=False), np.float64)
    lat7 = np.asarray(s7["lat_deg"].to_numpy(zero_copy_only=False), np.float64)
    return not (known & ~((lon == lon7) & (lat == lat7))).any()


def _coverage_checks(s7: pa.Table, bounds: dict | None, fam: str, ev: pa.Table) -> tuple[dict | None, list]:
    """A905 cardinality checks of one family's events against S7 (for ``in_cell_jitter`` also the accepted
    attempt's coordinates): (the family's coverage summary, the failures as ``_Failures.add`` argument tuples, in
    order). Pure, so :func:`validate` runs it as soon as the family's events are read."""
    code = "E907_RNG_BUDGET_OR_COUNTERS"
    found: list[tuple[tuple, dict]] = []

    def add(*args: Any, **kwargs: Any) -> None:
        found.append((args, kwargs))

    keys7 = s7.select([*KEY, "tile_id"])
    if fam == "site_tile_assign":  # exactly one event per site, same tile
        if _site_tile_clean(keys7, ev):
            return {"sites_total": s7.num_rows, "events_missing": 0, "events_extra": 0, "events_duplicate": 0}, found
        ev = rnglog.plain_strings(ev)
        k5 = cast_keys(ev.select([*KEY, "tile_id"]), [*KEY, "tile_id"])
        dup = duplicate_keys(k5)
        missing, extra = key_differences(keys7, k5)
        if dup.num_rows:
            add(code, "A905", "more than one site_tile_assign event for a site", rows=first_rows(dup),
                count=dup.num_rows, family="site_tile_assign")
        if missing.num_rows:
            add(code, "A905", "sites without a site_tile_assign event", rows=first_rows(missing),
                count=missing.num_rows, family="site_tile_assign")
        if extra.num_rows:
            add(code, "A905", "site_tile_assign events for sites absent from s7_site_synthesis",
                rows=first_rows(extra), count=extra.num_rows, family="site_tile_assign")
        # sites with an event only (a missing event is reported above, not as a differing tile)
        j = sort_by_key(keys7.join(k5.rename_columns([*KEY, "event_tile_id"]), list(KEY), join_type="inner"))
        bad = np.asarray(j["tile_id"].to_numpy(zero_copy_only=False), np.uint64) != np.asarray(
            j["event_tile_id"].to_numpy(zero_copy_only=False), np.uint64)
        if bad.any():
            add(code, "A905", "site_tile_assign event tile_id differs from the site's tile",
                rows=keys_where(j, bad, [*KEY, "tile_id", "event_tile_id"]), count=int(bad.sum()),
                family="site_tile_assign")
        return {"sites_total": s7.num_rows, "events_missing": missing.num_rows, "events_extra": extra.num_rows,
                "events_duplicate": dup.num_rows}, found
    if fam != "in_cell_jitter":
        return None, found
    # in_cell_jitter: >= 1 event per site; the last one is the accepted point
    if _jitter_clean(s7, ev, bounds):
        return {"sites_total": s7.num_rows, "sites_with_ge1_event": s7.num_rows, "sites_with_0_event": 0,
                "events_extra": 0}, found
    ev = rnglog.plain_strings(ev)
    k6 = cast_keys(ev.select(list(KEY)))
    missing, extra = key_differences(keys7, k6)
    if missing.num_rows:
        add(code, "A905", "sites without an in_cell_jitter event", rows=first_rows(missing),
            count=missing.num_rows, family="in_cell_jitter")
    if extra.num_rows:
        add(code, "A905", "in_cell_jitter events for sites absent from s7_site_synthesis",
            rows=first_rows(extra), count=extra.num_rows, family="in_cell_jitter")
    with_events = s7.num_rows - missing.num_rows
    coverage = {"sites_total": s7.num_rows, "sites_with_ge1_event": with_events,
                "sites_with_0_event": missing.num_rows, "events_extra": extra.num_rows}
    if ev.num_rows and bounds is not None:
        last = cast_keys(_last_event_per_site(ev))
        ref = s7.select([*KEY, "lon_deg", "lat_deg"]).append_column(
            "centroid_lon_deg", pa.array(bounds["centroid_lon_deg"])).append_column(
            "centroid_lat_deg", pa.array(bounds["centroid_lat_deg"]))
        j = sort_by_key(ref.join(last, list(KEY)))
        if j.num_rows:
            g = {c: np.asarray(j[c].to_numpy(zero_copy_only=False), np.float64)
                 for c in ("centroid_lon_deg", "centroid_lat_deg", "delta_lon_deg", "delta_lat_deg",
                           "lon_deg", "lat_deg")}
            lon, lat = synthesise_coordinates(g["centroid_lon_deg"], g["centroid_lat_deg"],
                                              g["delta_lon_deg"], g["delta_lat_deg"])
            known = np.isfinite(g["centroid_lon_deg"])  # unknown tiles are E709 already
            bad = known & ~((lon == g["lon_deg"]) & (lat == g["lat_deg"]))
            if bad.any():
                add(code, "A905", "the last in_cell_jitter event of a site (its accepted attempt) does not "
                    "reproduce the site's coordinates", rows=keys_where(j, bad, [*KEY, "lon_deg", "lat_deg",
                                                                                 "delta_lon_deg", "delta_lat_deg"]),
                    count=int(bad.sum()), family="in_cell_jitter")
    return coverage, found


def _early_coverage(inp: Inputs) -> dict:
    """:func:`_coverage_checks` of each family whose events the background read publishes, while it goes on
    (trace, reconciliation); ``{}`` without a background read (:func:`_rng_checks` then computes them)."""
    out: dict = {}
    if inp.s7 is None:
        return out
    for fam in ("site_tile_assign", "in_cell_jitter"):
        fut = inp.rng_events_pending.get(fam)
        if fut is None:
            continue
        try:
            ev, _err = fut.result()
        except Exception:  # noqa: BLE001 - load_rng_logs raises it (the background read's own exception)
            return out
        if ev is not None:
            out[fam] = _coverage_checks(inp.s7, inp.bounds, fam, ev)
    return out


def _rng_checks(ctx, inp: Inputs, fails: _Failures, early: dict | None = None) -> dict:
    """A905; returns the per-family summaries (s9_summary.rng.families, rng_accounting.json). ``early``: the
    :func:`_coverage_checks` results already computed per family (their failures are added here, in the same
    order as when computed here)."""
    code = "E907_RNG_BUDGET_OR_COUNTERS"
    per_family_fail: dict[str, dict] = {f: {"envelope": 0, "trace": False} for f in FAMILIES}
    for fam, msg in inp.event_errors.items():
        fails.add(code, "A905", f"{fam} event log unreadable", family=fam, error=msg)
        per_family_fail[fam]["envelope"] += 1
    for f in inp.reconcile:
        fam = f.get("family")
        fails.add(code, "A905", f"{f.get('code')}: {f.get('detail')}", rows=f.get("rows"), count=f.get("count"),
                  rng_code=f.get("code"), family=fam, module=f.get("module"),
                  substream_label=f.get("substream_label"))
        if fam in per_family_fail:
            if f.get("code") in _TRACE_CODES:
                per_family_fail[fam]["trace"] = True
            else:
                per_family_fail[fam]["envelope"] += int(f.get("count") or 1)
    for fam, (module, label, _, _) in FAMILIES.items():
        ev = inp.events.get(fam)
        if fam not in inp.event_errors and (ev is None or ev.num_rows == 0) and inp.s7 is not None \
                and inp.s7.num_rows:
            fails.add(code, "A905", f"no {fam} events for this run (event file missing or empty)", family=fam,
                      path=str(rnglog.event_dir(ctx.data_root, ctx.ids, fam, ctx.config)))
    tpath = rnglog.trace_path(ctx.data_root, ctx.ids, ctx.config)
    if inp.s7 is not None and inp.s7.num_rows and not tpath.exists():
        fails.add(code, "A905", "rng_trace_log missing", path=str(tpath))

    coverage: dict[str, dict] = {}
    if inp.s7 is not None:
        for fam in ("site_tile_assign", "in_cell_jitter"):
            ev = inp.events.get(fam)
            if ev is None:
                continue
            cov, found = (early or {}).get(fam) or _coverage_checks(inp.s7, inp.bounds, fam, ev)
            for args, kwargs in found:
                fails.add(*args, **kwargs)
            if cov is not None:
                coverage[fam] = cov

    families: dict[str, dict] = {}
    trace = inp.trace
    for fam, (module, label, blocks, draws) in FAMILIES.items():
        ev = inp.events.get(fam)
        n = 0 if ev is None else ev.num_rows
        bl = dr = 0
        if n:
            bl = rnglog.exact_sum(np.asarray(pc.fill_null(ev["blocks"], 0).to_numpy(zero_copy_only=False), np.uint64))
            dr = rnglog.exact_sum(rnglog.parse_draws(ev)[0])
        tt = None
        if trace is not None and trace.num_rows:
            rows = rnglog.stream_rows(trace, module, label)
            if rows.size:
                ev_tot = np.asarray(trace["events_total"].take(pa.array(rows)).to_numpy(zero_copy_only=False),
                                    np.uint64)
                row = trace.slice(int(rows[int(np.argmax(ev_tot))]), 1).to_pylist()[0]
                tt = {"rows": int(rows.size), "events_total": row["events_total"],
                      "blocks_total": row["blocks_total"], "draws_total": str(row["draws_total"])}
        cov = coverage.get(fam, {})
        cov_ok = bool(cov) and all(v == 0 for k, v in cov.items() if k not in ("sites_total", "sites_with_ge1_event"))
        families[fam] = {
            "id": fam, "module": module, "substream_label": label,
            "budget_per_event": {"blocks": blocks, "draws": draws},
            "coverage": cov, "coverage_ok": cov_ok,
            "events_total": n, "blocks_total": bl, "draws_total": str(dr),
            "trace_totals": tt,
            "trace_reconciled": (not per_family_fail[fam]["trace"]) and tt is not None
            and (tt["events_total"], tt["blocks_total"], tt["draws_total"]) == (n, bl, str(dr)),
            "envelope_failures": per_family_fail[fam]["envelope"],
        }
    return families


# ====================================================================== validate
def _composite(files: list[tuple[str, str]], directory: Path) -> str:
    h = hashlib.sha256()
    for name, _ in sorted(files, key=lambda f: f[0].encode("utf-8")):
        with open(directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def validate(ctx, log: StageLog | None = None) -> Result:
    """Run every S9 check from the stored files of ``ctx``'s run; build the bundle files in memory. Writes
    nothing under ``data/`` (only stage lines when ``log`` is given). The RNG logs are read and reconciled on
    a worker thread (the polygons on another) while the datasets are loaded and checked (same results: nothing
    there depends on timing)."""
    fails = _Failures(ctx.data_root)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="s9-load") as pool:
        return _validate(ctx, log, fails, pool)


def _validate(ctx, log: StageLog | None, fails: _Failures, pool: ThreadPoolExecutor) -> Result:
    ids = ctx.ids
    with _maybe_stage(log, "load_inputs") as extra:
        inp = load_inputs(ctx, fails, rng=False, pool=pool)  # the RNG logs are read on ``pool`` meanwhile
        extra.update(rows_s7=None if inp.s7 is None else inp.s7.num_rows, egress_files=len(inp.egress_files))
    with _maybe_stage(log, "validate") as extra:
        _identity_checks(ctx, fails)
        _dictionary_checks(ctx, fails)
        s8 = _egress_checks(ctx, inp, fails)
        by_country: dict = {}
        sort_violations = 0
        if s8 is not None:
            ok, first = is_sorted(s8)
            if not ok:
                sort_violations = 1
                fails.add("E906_WRITER_SORT_VIOLATION", "A904", "site_locations rows (files in ASCII order) are not "
                          "in writer sort [merchant_id, legal_country_iso, site_order]", first_row=first,
                          rows=first_rows(s8.slice(max(first - 1, 0), 2)))
            if inp.s7 is not None:
                by_country = _parity_checks(inp.s7, s8, fails)
        geometry = {}
        if inp.s7 is not None and inp.s7.num_rows:
            geometry = _geometry_checks(inp, fails)
        early = _early_coverage(inp)  # each family as soon as the background read has it
        load_rng_logs(ctx, inp)  # (collects the background read) adds no failure itself: _rng_checks reports
        # what could not be read
        families = _rng_checks(ctx, inp, fails, early)

        s8_dir = Path(ctx.path("site_locations"))
        egress_files = [(name, sha) for name, _, sha in inp.egress_files]
        egress = {
            "dataset_id": "site_locations",
            "partition": {"seed": int(ids.seed), "manifest_fingerprint": ids.manifest_fingerprint},
            "files": [{"path": name, "sha256_hex": sha} for name, sha in egress_files],
            "composite_sha256_hex": _composite(egress_files, s8_dir) if egress_files else None,
        }
        s7_composite = _composite(inp.s7_files, Path(ctx.path("s7_site_synthesis"))) if inp.s7_files else None
        opts = (ctx.config.get("segment1b") or {}).get("options") or {}
        ids_1a = ctx.ids_1a
        identity = {"seed": int(ids.seed), "parameter_hash": ids.parameter_hash,
                    "manifest_fingerprint": ids.manifest_fingerprint, "run_id": ids.run_id}
        upstream = None if ids_1a is None else {
            "seed": int(ids_1a.seed), "parameter_hash": ids_1a.parameter_hash,
            "manifest_fingerprint": ids_1a.manifest_fingerprint, "run_id": ids_1a.run_id}
        manifest = {
            "version": VERSION, "segment": "1B", **identity, "upstream_1A": upstream,
            "inputs": {
                "s7_site_synthesis": {"partition": {"seed": int(ids.seed), "parameter_hash": ids.parameter_hash,
                                                    "manifest_fingerprint": ids.manifest_fingerprint},
                                      "files": [{"path": n, "sha256_hex": s} for n, s in inp.s7_files],
                                      "composite_sha256_hex": s7_composite},
                "site_locations": {"partition": egress["partition"], "files": egress["files"],
                                   "composite_sha256_hex": egress["composite_sha256_hex"]},
                "rng_logs": {"partition": {"seed": int(ids.seed), "parameter_hash": ids.parameter_hash,
                                           "run_id": ids.run_id}, "families": sorted(FAMILIES)},
            },
            "outputs": {"validation_bundle": {"partition": {"seed": int(ids.seed),
                                                            "manifest_fingerprint": ids.manifest_fingerprint}}},
        }
        param = {"parameter_hash": ids.parameter_hash, "segment": "1B",
                 "options": {"basis": opts.get("basis"), "dp": opts.get("dp")},
                 "parameter_files": sorted(((ctx.config.get("segment1b") or {}).get("parameters") or {}).keys())}
        fingerprint = {"manifest_fingerprint": ids.manifest_fingerprint, "segment": "1B",
                       "upstream_1A_manifest_fingerprint": None if ids_1a is None else ids_1a.manifest_fingerprint,
                       "code_digest": ctx.extra.get("code_digest"), "grid_hash": ctx.extra.get("grid_hash"),
                       "weights_hash": ctx.extra.get("weights_hash")}
        rows_s7 = 0 if inp.s7 is None else inp.s7.num_rows
        rows_s8 = 0 if s8 is None else s8.num_rows
        accounting = {"version": VERSION, **identity, "families": [families[f] for f in sorted(FAMILIES)]}
        files_prelim = {"MANIFEST.json": manifest, "parameter_hash_resolved.json": param,
                        "manifest_fingerprint_resolved.json": fingerprint, "egress_checksums.json": egress,
                        "rng_accounting.json": accounting, "s9_summary.json": None}
        missing = [f for f in REQUIRED_FILES if f not in files_prelim]
        if missing:  # pragma: no cover - guard of A906-A909
            fails.add("E908_BUNDLE_CONTENTS_MISSING", "A906", "bundle files missing", rows=missing)
        codes = fails.codes
        passed = not fails.items
        summary = {
            "version": VERSION, "identity": identity, "upstream_1A": upstream,
            "sizes": {"rows_s7": rows_s7, "rows_s8": rows_s8,
                      "parity_ok": not any(c in codes for c in ("E901_ROW_MISSING", "E902_ROW_EXTRA", "E903_DUP_KEY"))
                      and s8 is not None and inp.s7 is not None},
            "egress": {"dataset_id": "site_locations", "writer_sort_violations": sort_violations,
                       "path_embed_mismatches": sum(1 for f in fails.items if f["code"] == "E905_PARTITION_OR_IDENTITY"),
                       "files": len(inp.egress_files)},
            "geometry": geometry,
            "rng": {"families": {f: {k: families[f][k] for k in ("coverage_ok", "events_total", "blocks_total",
                                                                    "draws_total", "envelope_failures",
                                                                    "trace_reconciled")} for f in sorted(FAMILIES)}},
            "by_country": by_country,
            "passed": passed,
            "failure_codes": codes,
            "failures": fails.items,
        }
        files_prelim["s9_summary.json"] = summary
        bundle_files = {k: canonical_json_bytes(v) for k, v in sorted(files_prelim.items())}
        extra.update(passed=passed, failure_count=len(fails.items))
    return Result(passed=passed, failure_codes=codes, failures=fails.items, bundle_files=bundle_files,
                  summary=summary)


def bundle_payload(files: dict[str, bytes]) -> dict[str, bytes]:
    """The exact bytes :func:`engine.core.bundle.write_bundle` writes for ``files`` (index.json included, flag
    excluded)."""
    payload = dict(files)
    payload[bundle_mod.INDEX] = canonical_json_bytes(bundle_mod.build_index(list(files)))
    return payload


def _failure_error(res: Result, bundle_dir: Path) -> ValidationFailure:
    return ValidationFailure(
        res.failure_codes[0], "1B S9 validation FAILED with " + ", ".join(res.failure_codes)
        + f"; bundle published without _passed.flag (details in s9_summary.json)", path=bundle_dir,
        rows=[f"{f['code']}: {f['message']}" for f in res.failures],
        detail={"failure_codes": res.failure_codes})


# ====================================================================== entry points
def _ids_record(ids) -> dict | None:
    return None if ids is None else {"seed": int(ids.seed), "parameter_hash": ids.parameter_hash,
                                     "manifest_fingerprint": ids.manifest_fingerprint, "run_id": ids.run_id}


def write_run_record(ctx) -> Path:
    """Record the run's resolved config and identities under ``logs/config/1B/`` (ops only; rewritten atomically).
    ``engine.cli.segment1b validate-s9`` finds the run through it from its 1A or 1B identities."""
    import json

    p = Path(ctx.path("run_record_1B"))
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": ctx.config, "ids_1a": _ids_record(ctx.ids_1a), "ids_1b": _ids_record(ctx.ids),
           "extra": dict(ctx.extra)}
    tmp = p.with_name(f"_tmp.{p.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, sort_keys=True, indent=1, default=str))
    os.replace(tmp, p)
    return p


def run(ctx) -> None:
    """Snakemake S9: validate, publish the bundle (flag only on PASS), log the stages; FAIL -> raise."""
    log = StageLog(ctx, "run")
    with log.stage("initialise") as extra:
        bundle_dir = Path(ctx.path("validation_bundle_1B"))
        if ctx.ids_1a is not None:
            write_run_record(ctx)
        extra.update(mode="run")
    res = validate(ctx, log)
    with log.stage("persist_bundle") as extra:
        bundle_mod.write_bundle(bundle_dir, res.bundle_files, passed=res.passed, code=PUBLISH_CODE)
        extra.update(flag_emitted=bool(res.passed and (bundle_dir / bundle_mod.FLAG).is_file()))
    if not res.passed:
        raise _failure_error(res, bundle_dir)


def compare_with_stored(bundle_dir: Path, payload: dict[str, bytes], passed: bool) -> list[dict]:
    """How a stored bundle differs from the recomputed one (E908 contents, E909 index, E910 flag)."""
    out: list[dict] = []
    stored = {}
    for dirpath, dirnames, filenames in os.walk(bundle_dir):
        dirnames.sort()
        for f in filenames:
            p = Path(dirpath) / f
            stored[p.relative_to(bundle_dir).as_posix()] = p
    flag = stored.pop(bundle_mod.FLAG, None)
    if set(stored) != set(payload):
        out.append({"code": "E908_BUNDLE_CONTENTS_MISSING", "message": "stored bundle files differ from the "
                    "recomputed bundle", "missing": sorted(set(payload) - set(stored)),
                    "unexpected": sorted(set(stored) - set(payload))})
    differ = sorted(p for p in set(stored) & set(payload) if stored[p].read_bytes() != payload[p])
    if bundle_mod.INDEX in differ:
        out.append({"code": "E909_INDEX_INVALID", "message": "stored index.json differs from the recomputed one"})
    other = [p for p in differ if p != bundle_mod.INDEX]
    if other:
        out.append({"code": "E908_BUNDLE_CONTENTS_MISSING", "message": "stored bundle files differ in bytes "
                    "from the recomputed ones (inputs changed since the bundle was written?)", "files": other})
    if flag is None and passed:
        out.append({"code": "E910_FLAG_BAD_OR_MISSING", "message": "checks pass but the stored bundle has no "
                    "_passed.flag"})
    elif flag is not None:
        if not passed:
            out.append({"code": "E910_FLAG_BAD_OR_MISSING", "message": "stored bundle has a _passed.flag but the "
                        "checks fail"})
        try:
            bundle_mod.verify_bundle(bundle_dir)
        except GateError as exc:
            out.append({"code": "E910_FLAG_BAD_OR_MISSING", "message": f"stored flag does not verify: {exc.code}"})
    return out


def revalidate(ctx) -> dict:
    """CLI ``validate-s9``: re-run every check from the stored files WITHOUT publishing anything under
    ``data/``; when a stored bundle exists, compare the recomputed bundle bytes (and flag) with it. Appends the
    stage lines. Returns ``{passed, failure_codes, bundle_path, flag_path (None without a flag),
    stage_log_path, bundle_present, bundle_identical, validation_passed, failures}``."""
    log = StageLog(ctx, "revalidate")
    with log.stage("initialise") as extra:
        bundle_dir = Path(ctx.path("validation_bundle_1B"))
        extra.update(mode="revalidate")
    res = validate(ctx, log)
    with log.stage("persist_bundle") as extra:
        payload = bundle_payload(res.bundle_files)
        present = bundle_dir.is_dir()
        diffs = compare_with_stored(bundle_dir, payload, res.passed) if present else []
        flag = bundle_dir / bundle_mod.FLAG
        extra.update(flag_emitted=False, republished=False, bundle_present=present, bundle_identical=present
                     and not diffs)
    codes = sorted(set(res.failure_codes) | {d["code"] for d in diffs})
    return {
        "passed": bool(res.passed and not diffs),
        "failure_codes": codes,
        "bundle_path": str(bundle_dir),
        "flag_path": str(flag) if flag.is_file() else None,
        "stage_log_path": str(log.path),
        "bundle_present": present,
        "bundle_identical": present and not diffs,
        "validation_passed": res.passed,
        "failures": res.failures + diffs,
    }
