"""Write-once, atomic publishing and deterministic file encodings (00-core 2.2, 2.4; decisions 5, 21).

* :func:`staged` ``(final_dir, code)`` -- context manager yielding a sibling temp dir
  ``<parent>/_tmp.<name>.<hex>`` (readers ignore names starting with ``_`` or ``.``). On success every
  file and directory is fsynced; if ``final_dir`` does not exist (or is an empty directory) the temp dir is
  renamed onto it in one step; if it exists with byte-identical content (same relative names, same bytes)
  the temp dir is dropped (no-op); otherwise ``PublishError(code)`` is raised and the original is left
  intact. On an exception inside the block the temp dir is deleted and nothing is published. The
  writer holds an flock on ``<temp>.lock`` while staging; :func:`sweep_stale` (run before each publish)
  removes the staging leftovers of writers that died (SIGKILL) and never a live writer's.
* :func:`publish_file` ``(final_path, data, code)`` -- the same semantics for one file.
* :func:`write_parquet` -- deterministic Parquet (sorted rows, pinned writer settings, no metadata drift).
* :func:`read_parquet_dir` -- ``part-*.parquet`` of a partition, in file-name order.
* :func:`canonical_json_bytes`, :func:`write_json`, :func:`write_jsonl` -- canonical JSON
  (``sort_keys``, ``ensure_ascii``, ``(",", ":")``, floats via ``repr``, trailing newline).
* :func:`write_failure_record` -- 00-core 5.4 failure record (no timestamps, decision 15).

Write-once codes: 1A ``E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL``, 1B ``E913_ATOMIC_PUBLISH_VIOLATION``
(decision 21); the caller passes its code.
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.core.errors import EngineError, PublishError

CODE_1A = "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL"
CODE_1B = "E913_ATOMIC_PUBLISH_VIOLATION"

# Pinned Parquet writer settings (decision 5: byte identity for the pinned pyarrow version).
PARQUET_SETTINGS: dict[str, Any] = dict(
    compression="zstd",
    compression_level=3,
    row_group_size=1 << 20,
    data_page_size=1 << 20,
    write_statistics=True,
    data_page_version="1.0",
    use_dictionary=True,
    version="2.6",
    write_page_index=False,
    store_schema=True,
)


# ---------------------------------------------------------------------- fsync helpers
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _tree(root: Path) -> tuple[list[str], list[str]]:
    """Relative POSIX file and directory names under root, sorted."""
    files: list[str] = []
    dirs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        for d in dirnames:
            dirs.append((rel / d).as_posix())
        for f in filenames:
            files.append((rel / f).as_posix())
    return sorted(files), sorted(dirs)


def tree_differences(a: Path, b: Path, limit: int = 10) -> list[str]:
    """How two directory trees differ (empty = identical names and bytes)."""
    fa, da = _tree(a)
    fb, db = _tree(b)
    out: list[str] = []
    for name in sorted(set(fa) ^ set(fb)):
        out.append(f"{name}: only in {'existing' if name in fa else 'new'}")
    for name in sorted(set(da) ^ set(db)):
        out.append(f"{name}/: directory only in {'existing' if name in da else 'new'}")
    for name in sorted(set(fa) & set(fb)):
        if not filecmp.cmp(a / name, b / name, shallow=False):
            out.append(f"{name}: bytes differ")
        if len(out) >= limit:
            break
    return out[:limit]


def _tmp_name(final: Path) -> Path:
    return final.parent / f"_tmp.{final.name}.{os.urandom(8).hex()}"


# ---------------------------------------------------------------------- staging locks and sweeping
# A staging path X (dir or file) is owned through a sibling lock file X.lock that its writer holds
# with flock(LOCK_EX) for as long as X exists. The lock file is created and locked under a hidden
# name, then renamed into place, so X.lock never exists unlocked while its owner lives. A process
# killed mid-publish (SIGKILL, node loss) releases the lock with its file descriptors, so the next
# publisher of the same partition can tell a dead writer's leftovers from a live writer's work and
# remove them (issue 7 fault tests: no `_tmp.*` debris after a kill and rerun).


def _lock_stage(tmp: Path) -> int:
    pre = tmp.parent / f".{tmp.name}.lock.pre"
    fd = os.open(pre, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(pre, tmp.parent / f"{tmp.name}.lock")
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            pre.unlink()
        raise
    return fd


def _unlock_stage(tmp: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp.parent / f"{tmp.name}.lock")
    os.close(fd)


def _remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def sweep_stale(final: str | Path) -> list[str]:
    """Remove staging leftovers of dead writers beside ``final`` (``_tmp.<name>.*``, ``_old.<name>.*``);
    returns the names removed, sorted. A live writer's staging path (lock held) is never touched."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return []
    removed: list[str] = []
    tmp_prefix, old_prefix = f"_tmp.{final.name}.", f"_old.{final.name}."
    for entry in sorted(os.listdir(parent)):
        if entry.startswith(old_prefix):
            # `_old.*` exists only between two renames and the rmtree that follows: a leftover of a kill
            _remove_path(parent / entry)
            removed.append(entry)
            continue
        if not entry.startswith(tmp_prefix):
            continue
        stage = entry[:-5] if entry.endswith(".lock") else entry
        lock = parent / f"{stage}.lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            if not entry.endswith(".lock"):
                # writers create the lock before the staging path and drop it after: no lock => dead
                _remove_path(parent / entry)
                removed.append(entry)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live writer
        try:
            _remove_path(parent / stage)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            removed.append(entry)
        finally:
            os.close(fd)
    return removed


# ---------------------------------------------------------------------- publishing
@contextlib.contextmanager
def staged(final_dir: str | Path, code: str,
           replace_if: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Stage a partition in a sibling temp dir and publish it atomically (write-once, 00-core 2.4).

    ``replace_if(existing_dir) -> bool`` (optional) allows replacing an existing, *different* partition
    (used for flag-less FAIL bundles, 1B 11): the old folder is moved aside, the new one renamed in, the
    old one deleted."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = _tmp_name(final)
    fd = _lock_stage(tmp)
    try:
        tmp.mkdir()
        yield tmp
        _commit_dir(tmp, final, code, replace_if)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        _unlock_stage(tmp, fd)


def _commit_dir(tmp: Path, final: Path, code: str, replace_if: Callable[[Path], bool] | None) -> str:
    _fsync_tree(tmp)
    if final.is_dir() and not any(final.iterdir()):
        with contextlib.suppress(OSError):
            final.rmdir()  # an empty directory (e.g. made by a workflow tool) holds no published bytes
    if not final.exists():
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # lost a race with a concurrent identical publisher: fall through to the comparison
        else:
            _fsync_dir(final.parent)
            return "published"
    if not final.is_dir():
        raise PublishError(code, "cannot publish a partition over an existing non-directory", path=final)
    diffs = tree_differences(final, tmp)
    if not diffs:
        return "identical"
    if replace_if is not None and replace_if(final):
        old = final.parent / f"_old.{final.name}.{os.urandom(8).hex()}"
        os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        return "replaced"
    raise PublishError(
        code,
        "partition already published with different bytes; write-once partitions are never overwritten "
        "(delete it deliberately, or check which input changed without changing the identities)",
        path=final,
        rows=diffs,
    )


def publish_file(final_path: str | Path, data: bytes, code: str) -> bool:
    """Publish one file atomically and write-once. Returns True if written, False if an identical file
    already existed; different existing bytes -> ``PublishError(code)`` (the original is left intact)."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = _tmp_name(final)
    fd = _lock_stage(tmp)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)  # atomic, and never clobbers an existing file
            _fsync_dir(final.parent)
            return True
        except FileExistsError:
            pass
        except OSError:  # pragma: no cover - filesystems without hard links
            if not final.exists():
                os.rename(tmp, final)
                _fsync_dir(final.parent)
                return True
        with open(final, "rb") as f:
            existing = f.read()
        if existing == data:
            return False
        raise PublishError(code, "file already published with different bytes (write-once)", path=final,
                           detail={"existing_size": len(existing), "new_size": len(data)})
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _unlock_stage(tmp, fd)


# ---------------------------------------------------------------------- parquet
def to_table(table: Any) -> pa.Table:
    """pyarrow Table from a Table, a pandas DataFrame (index dropped) or a dict of columns."""
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, Mapping):
        return pa.table(dict(table))
    return pa.Table.from_pandas(table, preserve_index=False)


def _plain_type(t: pa.DataType) -> pa.DataType:
    """large_string/large_binary/large_list -> their 32-bit-offset forms (pandas 3 yields large_string):
    the same values must give the same bytes whatever container they came from."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_plain_type(t.value_type))
    return t


def _strip_metadata(table: pa.Table) -> pa.Table:
    fields = [pa.field(f.name, _plain_type(f.type), nullable=f.nullable) for f in table.schema]
    schema = pa.schema(fields)
    if schema != table.schema.remove_metadata():
        table = table.cast(schema)
    return pa.Table.from_arrays(table.columns, schema=schema)


def sort_table(table: pa.Table, sort_by: Sequence[str | tuple[str, str]]) -> pa.Table:
    """Stable sort (Arrow ``sort_indices`` is stable) on the given keys; uint64 compares unsigned."""
    keys = [(k, "ascending", "at_end") if isinstance(k, str) else (k[0], k[1], "at_end") for k in sort_by]
    if not keys or table.num_rows < 2:
        return table
    idx = pc.sort_indices(table, sort_keys=keys)
    return table.take(idx)


def write_parquet(table: Any, path: str | Path, sort_by: Sequence[str | tuple[str, str]] | None = None,
                  schema: Any = None) -> Path:
    """Write one deterministic Parquet file: rows sorted by ``sort_by`` (stable), cast to ``schema``
    (a ``pa.Schema`` or a JSON row schema / ref; column set must match exactly), schema metadata
    stripped, chunks combined, pinned writer settings (:data:`PARQUET_SETTINGS`). Identical input gives
    identical bytes."""
    t = to_table(table)
    if schema is not None:
        if not isinstance(schema, pa.Schema):
            from engine.core.schema import arrow_schema

            schema = arrow_schema(schema)
        missing = [n for n in schema.names if n not in t.column_names]
        extra = [n for n in t.column_names if n not in schema.names]
        if missing or extra:
            raise EngineError("E_SCHEMA_INVALID", "table columns do not match the schema", path=path,
                              detail={"missing": missing, "extra": extra})
        try:
            t = t.select(schema.names).cast(schema.remove_metadata())
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise EngineError("E_SCHEMA_INVALID", f"cannot cast table to schema: {exc}", path=path) from None
    t = _strip_metadata(t.replace_schema_metadata(None))
    if sort_by:
        t = sort_table(t, sort_by)
    t = t.combine_chunks()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path, **PARQUET_SETTINGS)
    return path


def read_parquet_file(path: str | Path, columns: Sequence[str] | None = None,
                      read_dictionary: Sequence[str] | None = None) -> pa.Table:
    """One Parquet file as a table: ``pq.ParquetFile(...).read`` rather than ``pq.read_table``, whose dataset
    layer imports ``pyarrow.dataset`` and pandas (~0.4-0.7 s per process) for nothing on a single file.
    ``columns`` come back in the order asked; a column the file lacks raises ``pa.ArrowInvalid`` (as
    ``pq.read_table`` does; ``ParquetFile.read`` alone would silently drop it)."""
    with pq.ParquetFile(path, read_dictionary=list(read_dictionary) if read_dictionary else None) as pf:
        if columns is not None:
            names = set(pf.schema_arrow.names)
            missing = [c for c in columns if c not in names]
            if missing:
                raise pa.ArrowInvalid(f"columns {missing} not in {path}")
            columns = list(columns)
        return pf.read(columns=columns)


def part_files(directory: str | Path, allow_empty: bool = False) -> list[Path]:
    """The ``part-*.parquet`` files of a partition directory in file-name order (names starting with ``_`` /
    ``.`` are never data). A missing directory, or no part file unless ``allow_empty``, raises
    ``EngineError("E_PARTITION_MISSING")``."""
    d = Path(directory)
    if not d.is_dir():
        raise EngineError("E_PARTITION_MISSING", "partition directory not found", path=d)
    parts = sorted(p for p in d.iterdir() if p.name.startswith("part-") and p.name.endswith(".parquet"))
    if not parts and not allow_empty:
        raise EngineError("E_PARTITION_MISSING", "partition holds no part-*.parquet file", path=d)
    return parts


def read_parquet_dir(directory: str | Path, schema: Any = None) -> pa.Table:
    """All ``part-*.parquet`` files of a partition directory (names starting with ``_`` / ``.`` are never
    read), concatenated in file-name order. With ``schema`` (``pa.Schema`` or JSON row schema / ref) the
    columns are selected and cast to it; an empty partition then gives an empty table. A missing directory,
    or no part file without a schema, raises ``EngineError("E_PARTITION_MISSING")``."""
    d = Path(directory)
    parts = part_files(d, allow_empty=schema is not None)
    if schema is not None and not isinstance(schema, pa.Schema):
        from engine.core.schema import arrow_schema

        schema = arrow_schema(schema)
    if not parts:
        return schema.empty_table()
    tables = [read_parquet_file(p) for p in parts]
    t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if schema is not None:
        missing = [n for n in schema.names if n not in t.column_names]
        if missing:
            raise EngineError("E_SCHEMA_INVALID", f"columns missing: {missing}", path=d)
        try:
            t = t.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise EngineError("E_SCHEMA_INVALID", f"cannot cast to schema: {exc}", path=d) from None
    return t


# ---------------------------------------------------------------------- json
def _json_default(o: Any) -> Any:
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def canonical_json_bytes(obj: Any) -> bytes:
    """Canonical JSON: ``sort_keys=True, ensure_ascii=True, separators=(",", ":")``, floats via ``repr``
    (shortest round trip), NaN/inf rejected, one trailing newline."""
    return (json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"), allow_nan=False,
                       default=_json_default) + "\n").encode("ascii")


def write_json(obj: Any, path: str | Path) -> Path:
    """Write canonical JSON (use inside :func:`staged`, or with :func:`publish_file` for single files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(canonical_json_bytes(obj))
    return path


def jsonl_bytes(rows: Iterable[Any]) -> bytes:
    return b"".join(canonical_json_bytes(r) for r in rows)


def write_jsonl(rows: Iterable[Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(jsonl_bytes(rows))
    return path


# ---------------------------------------------------------------------- failure records
FAILURE_CLASSES = tuple(f"F{i}" for i in range(1, 11))


def failure_record(*, ids: Any, failure_class: str, failure_code: str, state: str, module: str,
                   detail: Mapping | None = None, dataset_id: str | None = None,
                   merchant_id: Any = None) -> dict:
    """The 00-core 5.4 record (no ``ts_utc``: decision 15). ``ids`` has seed, parameter_hash,
    manifest_fingerprint, run_id (``SegmentIds``)."""
    if failure_class not in FAILURE_CLASSES:
        raise ValueError(f"failure_class must be one of {FAILURE_CLASSES}, got {failure_class!r}")
    rec: dict[str, Any] = {
        "failure_class": failure_class,
        "failure_code": str(failure_code),
        "state": str(state),
        "module": str(module),
        "parameter_hash": ids.parameter_hash,
        "manifest_fingerprint": ids.manifest_fingerprint,
        "seed": int(ids.seed),
        "run_id": ids.run_id,
        "detail": dict(detail or {}),
    }
    if dataset_id is not None:
        rec["dataset_id"] = dataset_id
    if merchant_id is not None:
        rec["merchant_id"] = str(int(merchant_id))
    return rec


def write_failure_record(final_dir: str | Path, *, ids: Any, failure_class: str, failure_code: str,
                         state: str, module: str, detail: Mapping | None = None,
                         dataset_id: str | None = None, merchant_id: Any = None) -> tuple[Path, bool]:
    """Publish ``failure.json`` and ``_FAILED.SENTINEL.json`` (the same record without ``detail``) into
    ``final_dir`` (``ctx.path("validation_failures_1A")``) atomically. Only the first failure of a run is
    kept: if the folder already exists nothing is written. Returns ``(final_dir, written)``."""
    final = Path(final_dir)
    if final.exists():
        return final, False
    rec = failure_record(ids=ids, failure_class=failure_class, failure_code=failure_code, state=state,
                         module=module, detail=detail, dataset_id=dataset_id, merchant_id=merchant_id)
    header = {k: v for k, v in rec.items() if k != "detail"}
    try:
        with staged(final, CODE_1A) as tmp:
            write_json(rec, tmp / "failure.json")
            write_json(header, tmp / "_FAILED.SENTINEL.json")
    except PublishError:
        return final, False  # a concurrent first failure won; never overwrite it
    return final, True
