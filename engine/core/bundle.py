"""Validation bundles, ``index.json``, ``_passed.flag`` and the consumer gate (00-core 5.1-5.3; 1B 11).

* :func:`write_bundle` writes every file, ``index.json`` (a JSON array of ``{artifact_id, kind, path,
  mime}`` sorted by ``path``, listing every non-flag file INCLUDING itself, HEAD form) and, only when
  ``passed``, ``_passed.flag`` = ``sha256_hex = <hex>\\n``; the whole folder is staged and published in
  one atomic rename (write-once; an existing flag-less FAIL bundle may be replaced, 1B 11).
* :func:`flag_digest` -- SHA-256 over the raw bytes of the files listed in ``index.json`` (flag excluded),
  concatenated in ASCII order of ``path``; no names, no separators (00-core 5.2).
* :func:`verify_bundle` -- "No PASS -> no read" (00-core 5.3 steps 1-4): raises ``GateError`` with
  ``E_BUNDLE_MISSING``, ``E_INDEX_MISSING``, ``E_INDEX_INVALID``, ``E_PASS_MISSING``,
  ``E_FLAG_FORMAT_INVALID`` or ``E_FLAG_HASH_MISMATCH``; ``str(err)`` begins ``No PASS -> no read:`` and
  names the bundle path and what did not match (decision 27). Returns the verified digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from engine.core.errors import GateError
from engine.core.publish import canonical_json_bytes, staged

INDEX = "index.json"
FLAG = "_passed.flag"
KINDS = ("plot", "table", "diff", "text", "summary")
_ID_RE = re.compile(r"[A-Za-z0-9._-]+")  # used with fullmatch
_FLAG_RE = re.compile(r"sha256_hex = ([a-f0-9]{64})")  # used with fullmatch: no \n slips through
_MIME = {
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".parquet": "application/vnd.apache.parquet",
    ".csv": "text/csv",
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
_KIND_BY_EXT = {".json": "summary", ".jsonl": "table", ".parquet": "table", ".csv": "table",
                ".txt": "text", ".md": "text", ".png": "plot", ".svg": "plot", ".diff": "diff"}


def _path_problem(p: Any) -> str | None:
    """Why ``p`` is not a valid index path: relative POSIX, ASCII, no leading '/', no '..' (00-core 5.1)."""
    if not isinstance(p, str) or not p:
        return "path must be a non-empty string"
    if not p.isascii():
        return "path must be ASCII"
    if p.startswith("/") or "\\" in p:
        return "path must be relative POSIX"
    parts = PurePosixPath(p).parts
    if ".." in parts or "." in parts or p.endswith("/") or "//" in p:
        return "path must be normalised (no '..', '.', empty segments)"
    return None


def _artifact_ids(paths: list[str]) -> dict[str, str]:
    """artifact_id per path: the path without its extension, '/' -> '.' (HEAD ids: MANIFEST, index, ...);
    the full path (with extension) where that would collide."""
    base = {p: str(PurePosixPath(p).with_suffix("")).replace("/", ".") for p in paths}
    counts: dict[str, int] = {}
    for v in base.values():
        counts[v] = counts.get(v, 0) + 1
    out = {p: (v if counts[v] == 1 else p.replace("/", ".")) for p, v in base.items()}
    for p, v in out.items():
        if not _ID_RE.fullmatch(v):
            raise ValueError(f"cannot derive a valid artifact_id from {p!r}")
    if len(set(out.values())) != len(out):
        raise ValueError("artifact ids collide")
    return out


def digest_files(root: Path, paths: list[str]) -> str:
    """SHA-256 over the raw bytes of ``paths`` under ``root`` in ASCII byte order of the path."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda s: s.encode("ascii")):
        with open(root / p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def build_index(paths: list[str], kinds: Mapping[str, str] | None = None,
                notes: Mapping[str, str] | None = None) -> list[dict]:
    """index.json entries for ``paths`` plus ``index.json`` itself, sorted by path."""
    all_paths = sorted(set(paths) | {INDEX}, key=lambda s: s.encode("ascii"))
    ids = _artifact_ids(all_paths)
    entries = []
    for p in all_paths:
        ext = PurePosixPath(p).suffix.lower()
        kind = (kinds or {}).get(p) or ("summary" if p == INDEX else _KIND_BY_EXT.get(ext, "text"))
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} of {p!r} not in {KINDS}")
        e = {"artifact_id": ids[p], "kind": kind, "path": p}
        if ext in _MIME:
            e["mime"] = _MIME[ext]
        if notes and p in notes:
            e["notes"] = str(notes[p])
        entries.append(e)
    return entries


def write_bundle(final_dir: str | Path, files: Mapping[str, Any], kinds: Mapping[str, str] | None = None,
                 passed: bool = False, code: str = "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL",
                 notes: Mapping[str, str] | None = None) -> str:
    """Write a validation bundle and publish it atomically; returns the bundle digest (the flag's value,
    also when no flag is written because ``passed`` is False).

    ``files``: relative path -> bytes (a non-bytes value is written as canonical JSON). ``index.json`` and
    ``_passed.flag`` are made here and may not be given. ``kinds``: path -> plot|table|diff|text|summary
    (default by extension). ``code``: the write-once code (1A ``E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL``,
    1B ``E913_ATOMIC_PUBLISH_VIOLATION``). An existing bundle without ``_passed.flag`` (a FAIL bundle) may be
    replaced by different bytes; a PASS bundle never is."""
    payload: dict[str, bytes] = {}
    for p, data in files.items():
        problem = _path_problem(p)
        if problem:
            raise ValueError(f"bundle file {p!r}: {problem}")
        if p in (INDEX, FLAG):
            raise ValueError(f"{p} is written by write_bundle itself")
        payload[p] = data if isinstance(data, (bytes, bytearray)) else canonical_json_bytes(data)
    index_bytes = canonical_json_bytes(build_index(list(payload), kinds, notes))
    payload[INDEX] = index_bytes
    h = hashlib.sha256()
    for p in sorted(payload, key=lambda s: s.encode("ascii")):
        h.update(payload[p])
    digest = h.hexdigest()
    with staged(final_dir, code, replace_if=lambda d: not (d / FLAG).exists()) as tmp:
        for p in sorted(payload):
            target = tmp / p
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                f.write(payload[p])
        if passed:
            with open(tmp / FLAG, "wb") as f:
                f.write(f"sha256_hex = {digest}\n".encode("ascii"))
    return digest


# ---------------------------------------------------------------------- consumer side
def _gate(code: str, bundle: Path, what: str, rows: list | None = None) -> GateError:
    return GateError(code, f"bundle {bundle}: {what}", path=bundle, rows=rows)


def _read_index(bundle: Path) -> list[dict]:
    idx = bundle / INDEX
    if not idx.is_file():
        raise _gate("E_INDEX_MISSING", bundle, f"{INDEX} is missing")
    try:
        entries = json.loads(idx.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _gate("E_INDEX_INVALID", bundle, f"{INDEX} is not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _gate("E_INDEX_INVALID", bundle, f"{INDEX} must be a JSON array of objects")
    return entries


def _listed_files(bundle: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(bundle):
        dirnames.sort()
        rel = Path(dirpath).relative_to(bundle)
        for f in filenames:
            out.append((rel / f).as_posix())
    return sorted(out)


def index_problems(bundle: Path, entries: list[dict]) -> list[str]:
    """Index hygiene (00-core 5.3 step 2): ids unique and well-formed, kinds known, paths relative ASCII,
    every non-flag file listed exactly once (index.json included), every listed file present."""
    problems: list[str] = []
    ids: set[str] = set()
    paths: list[str] = []
    for i, e in enumerate(entries):
        aid, kind, p = e.get("artifact_id"), e.get("kind"), e.get("path")
        if not isinstance(aid, str) or not _ID_RE.fullmatch(aid):
            problems.append(f"entry {i}: artifact_id {aid!r} invalid")
        elif aid in ids:
            problems.append(f"entry {i}: artifact_id {aid!r} duplicated")
        else:
            ids.add(aid)
        if kind not in KINDS:
            problems.append(f"entry {i}: kind {kind!r} not in {KINDS}")
        extra = set(e) - {"artifact_id", "kind", "path", "mime", "notes"}
        if extra:
            problems.append(f"entry {i}: unexpected keys {sorted(extra)}")
        for k in ("mime", "notes"):
            if k in e and e[k] is not None and not isinstance(e[k], str):
                problems.append(f"entry {i}: {k} must be a string")
        why = _path_problem(p)
        if why:
            problems.append(f"entry {i}: {why} ({p!r})")
            continue
        if p == FLAG:
            problems.append(f"entry {i}: {FLAG} must not be listed")
        paths.append(p)
    dup = sorted({p for p in paths if paths.count(p) > 1})
    if dup:
        problems.append(f"paths listed more than once: {dup}")
    present = [f for f in _listed_files(bundle) if f != FLAG]
    unlisted = sorted(set(present) - set(paths))
    missing = sorted(set(paths) - set(present) - {FLAG})
    if unlisted:
        problems.append(f"files present but not listed: {unlisted[:10]}")
    if missing:
        problems.append(f"files listed but absent: {missing[:10]}")
    if INDEX not in paths:
        problems.append(f"{INDEX} does not list itself")
    return problems


def flag_digest(bundle: str | Path) -> str:
    """Digest of a bundle per its index.json (the value a valid ``_passed.flag`` holds)."""
    b = Path(bundle)
    entries = _read_index(b)
    paths = [e["path"] for e in entries if isinstance(e.get("path"), str) and e["path"] != FLAG]
    return digest_files(b, paths)


def read_flag(bundle: str | Path) -> str:
    """The hex digest in ``_passed.flag`` (format checked; at most one trailing newline, 00-core 8 #18)."""
    b = Path(bundle)
    f = b / FLAG
    if not f.is_file():
        raise _gate("E_PASS_MISSING", b, f"{FLAG} is missing (the producing validation did not pass)")
    raw = f.read_bytes()
    text = raw[:-1] if raw.endswith(b"\n") else raw
    try:
        m = _FLAG_RE.fullmatch(text.decode("ascii"))
    except UnicodeDecodeError:
        m = None
    if not m:
        raise _gate("E_FLAG_FORMAT_INVALID", b,
                    f"{FLAG} content {raw[:90]!r} does not match 'sha256_hex = <64 lower-case hex>'")
    return m.group(1)


def verify_bundle(bundle: str | Path) -> str:
    """No PASS -> no read (00-core 5.3 steps 1-4). Returns the verified digest; raises ``GateError``."""
    b = Path(bundle)
    if not b.is_dir():
        raise _gate("E_BUNDLE_MISSING", b, "validation bundle folder not found")
    entries = _read_index(b)
    problems = index_problems(b, entries)
    if problems:
        raise _gate("E_INDEX_INVALID", b, f"{INDEX} is invalid: " + "; ".join(problems[:3]), rows=problems)
    expected = read_flag(b)
    actual = digest_files(b, [e["path"] for e in entries])
    if actual != expected:
        raise _gate("E_FLAG_HASH_MISMATCH", b,
                    f"{FLAG} says {expected} but the files listed in {INDEX} hash to {actual}")
    return actual
