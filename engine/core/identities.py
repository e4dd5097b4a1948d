"""Run identities: ``parameter_hash``, ``manifest_fingerprint``, ``run_id``, code digest, 1B grid/weights hashes.

Spec: 00-core §1 (encodings, algorithms, error codes) as amended by README decisions 3 (code digest instead
of a git commit), 4 (no machine-dependent input), 9 (1B basis/dp in 1B's parameter identity), 13 (identity
scoping) and 15 (deterministic ``run_id``).

Two layers:

* **pure functions** over names and 32-byte digests (no file access), so the upstream golden vectors
  (`parameter_hash = 26b7e7a8...`, `manifest_fingerprint = 991c57a3...`) are testable without the files:
  :func:`parameter_hash`, :func:`manifest_fingerprint`, :func:`run_id`, :func:`commit_bytes32`,
  :func:`grid_hash`, :func:`weights_hash`;
* **resolution from a run configuration** (``config.yaml`` layout): :func:`resolve_1a`, :func:`resolve_1b`
  hash the configured files (through an optional on-disk cache keyed on path, size and ``mtime_ns``) and
  return frozen records that Snakemake and the CLIs pass on.

Byte layouts fixed here (all hashes SHA-256; ``UER(s) = LE32(len) || utf8``; "sorted" = bytewise ASCII):

* ``parameter_hash_bytes = SHA256(t_1 || ... || t_n)``, ``t_i = SHA256(UER(name_i) || digest_i)`` over the
  entries sorted by name (00-core §1.3).
* ``manifest_fingerprint_bytes = SHA256(T_1 || ... || T_k || code32 || parameter_hash_bytes)``, ``T_i`` as above
  over the artefacts sorted by name (00-core §1.4; ``code32`` = the code digest, decision 3).
* ``run_id = hex(SHA256(UER("run_id") || UER(segment) || fingerprint_bytes || parameter_hash_bytes ||
  LE64(seed)))[:32]`` (decision 15).
* ``code_digest = SHA256(concat over files sorted by relative POSIX path of UER(relpath) || SHA256(bytes))``
  over ``engine/**/*.py`` (no ``__pycache__``), ``Snakefile`` and ``rules/*.smk`` (decision 3).
* 1A parameter set = every file of ``segment1a.parameters`` under its config key (the runbook's
  ``--param NAME=PATH``), plus the synthetic entry ``options.1A.json`` whose digest is SHA-256 of the canonical
  JSON (sorted keys, ``(",", ":")``, ASCII) of the normalised ``segment1a.options`` (so the S3 lane switches
  give new ``parameter_hash=`` paths).
* 1A artefacts = every ``segment1a.inputs`` file hashed under its **role name** (the config key:
  ``merchant_table``, ``iso_table``, ``gdp_table``, ``bucket_table``, ``numeric_policy``, ``math_profile``, and
  any extra key a user adds), plus every parameter entry again (00-core §1.4), then the code digest and
  ``parameter_hash_bytes``. Role names make the fingerprint independent of where a user keeps a file.
* 1B parameter set = ``segment1b.parameters`` files + synthetic ``options.1B.json`` = canonical JSON of
  ``{"basis", "dp"}`` (decision 9; other 1B options such as ``skip_s0`` do not change outputs).
* ``grid_hash = SHA256(UER("1B.grid") || LE64(width) || LE64(height) || 6 x binary64-LE affine coefficients
  (a, b, c, d, e, f) || UER(CRS WKT) || SHA256(polygon file bytes) || UER(inclusion_rule))``; the raster header
  is read with rasterio, never its values (decision 13).
* ``weights_hash = SHA256(UER("1B.weights") || grid_hash_bytes || UER(basis) || LE32(dp) || [SHA256(raster
  bytes) iff basis == "population"])`` (decision 13).
* 1B artefacts = ``1A.manifest_fingerprint`` (digest = the 1A fingerprint bytes), each ``segment1b.inputs``
  file under its role name, every 1B parameter entry; then code digest and 1B ``parameter_hash_bytes``.

Nothing here reads the clock, the host or the environment into an identity (decision 4). The git commit is
provenance only (:func:`git_commit`, read from ``.git`` without running git; never fails).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from engine.core.context import SegmentIds
from engine.core.errors import IdentityError
from engine.core.hashing import le32, le64, sha256, uer

__all__ = [
    "OPTIONS_1A_NAME",
    "OPTIONS_1B_NAME",
    "FINGERPRINT_1A_ENTRY",
    "INCLUSION_RULE",
    "DEFAULT_OPTIONS_1A",
    "REQUIRED_INPUTS_1A",
    "REQUIRED_INPUTS_1B",
    "parameter_hash",
    "manifest_fingerprint",
    "run_id",
    "commit_bytes32",
    "code_files",
    "code_digest",
    "git_commit",
    "grid_hash",
    "weights_hash",
    "canonical_json_bytes",
    "required_parameters",
    "HashCache",
    "Resolved1A",
    "Resolved1B",
    "resolve_1a",
    "resolve_1b",
]

OPTIONS_1A_NAME = "options.1A.json"
OPTIONS_1B_NAME = "options.1B.json"
FINGERPRINT_1A_ENTRY = "1A.manifest_fingerprint"
INCLUSION_RULE = "centre+largest_overlap"  # centre rule, plus the one-cell fallback for micro-states; 1B S1 tile inclusion rule (decision 24); part of grid_hash
SEGMENTS = ("1A", "1B")
BASES_1B = ("population", "area_m2", "uniform")

# Normalised 1A options: a key a user leaves out means its default, so omitting a key and writing its
# default give the same parameter_hash.
DEFAULT_OPTIONS_1A: dict[str, Any] = {
    "s3_priors": False,
    "s3_integerisation": False,
    "s3_sequencing": False,
    "drop_unplaceable_merchants": False,
}
REQUIRED_INPUTS_1A = ("merchant_table", "iso_table", "gdp_table", "bucket_table", "numeric_policy", "math_profile")
REQUIRED_INPUTS_1B = ("world_countries", "population_raster")

_ENGINE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = _ENGINE_ROOT / "config.yaml"

_U64 = 1 << 64


# --------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------


def _as_digest(d: Any, name: str, what: str) -> bytes:
    if isinstance(d, (bytes, bytearray, memoryview)) and len(bytes(d)) == 32:
        return bytes(d)
    raise IdentityError(
        "E_BAD_HEX_ENCODING",
        f"{what} {name!r}: digest must be 32 raw SHA-256 bytes (got {type(d).__name__}"
        f"{' of length %d' % len(d) if hasattr(d, '__len__') else ''})",
    )


def _sorted_entries(
    entries: Iterable[tuple[str, bytes]], *, empty: str, nonascii: str, dup: str, what: str
) -> list[tuple[str, bytes]]:
    """Validate names (ASCII, non-empty, unique) and digests; sort bytewise by name (00-core §1.1)."""
    items = list(entries)
    if not items:
        raise IdentityError(empty, f"the {what} set is empty")
    checked: list[tuple[str, bytes]] = []
    for name, digest in items:
        if not isinstance(name, str) or not name or not name.isascii():
            raise IdentityError(nonascii, f"{what} name must be a non-empty ASCII string: {name!r}", rows=[repr(name)])
        checked.append((name, _as_digest(digest, name, what)))
    counts = Counter(n for n, _ in checked)
    dups = sorted(n for n, c in counts.items() if c > 1)
    if dups:
        raise IdentityError(dup, f"duplicate {what} names", rows=dups)
    return sorted(checked, key=lambda e: e[0].encode("ascii"))


def _fold(ordered: list[tuple[str, bytes]]) -> "hashlib._Hash":
    h = hashlib.sha256()
    for name, digest in ordered:
        h.update(sha256(uer(name) + digest))
    return h


def parameter_hash(entries: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """00-core §1.3: ``(hex64, 32 bytes)`` over ``(basename, SHA256(file bytes))`` entries.

    Errors: ``E_PARAM_EMPTY``, ``E_PARAM_NONASCII_NAME``, ``E_PARAM_DUP_BASENAME``, ``E_BAD_HEX_ENCODING``.
    """
    ordered = _sorted_entries(
        entries, empty="E_PARAM_EMPTY", nonascii="E_PARAM_NONASCII_NAME", dup="E_PARAM_DUP_BASENAME", what="parameter"
    )
    b = _fold(ordered).digest()
    return b.hex(), b


def manifest_fingerprint(
    artifacts: list[tuple[str, bytes]], code32: bytes, parameter_hash_bytes: bytes | None
) -> tuple[str, bytes]:
    """00-core §1.4 with decision 3: ``(hex64, 32 bytes)``.

    ``code32`` is the code digest (or, for the upstream golden vector, the commit bytes from
    :func:`commit_bytes32`). Errors: ``E_ARTIFACT_EMPTY``, ``E_ARTIFACT_NONASCII_NAME``,
    ``E_ARTIFACT_DUP_BASENAME``, ``E_GIT_BYTES`` (code32 not 32 raw bytes), ``E_PARAM_HASH_ABSENT``.
    """
    ordered = _sorted_entries(
        artifacts,
        empty="E_ARTIFACT_EMPTY",
        nonascii="E_ARTIFACT_NONASCII_NAME",
        dup="E_ARTIFACT_DUP_BASENAME",
        what="artefact",
    )
    if not isinstance(code32, (bytes, bytearray, memoryview)) or len(bytes(code32)) != 32:
        raise IdentityError(
            "E_GIT_BYTES",
            "code digest / git_32 must be exactly 32 raw bytes (never ASCII hex)",
            detail={"type": type(code32).__name__, "length": len(code32) if hasattr(code32, "__len__") else None},
        )
    if parameter_hash_bytes is None:
        raise IdentityError("E_PARAM_HASH_ABSENT", "parameter_hash_bytes is required for manifest_fingerprint")
    if not isinstance(parameter_hash_bytes, (bytes, bytearray, memoryview)) or len(bytes(parameter_hash_bytes)) != 32:
        raise IdentityError("E_PARAM_HASH_ABSENT", "parameter_hash_bytes must be 32 raw bytes")
    h = _fold(ordered)
    h.update(bytes(code32))
    h.update(bytes(parameter_hash_bytes))
    b = h.digest()
    return b.hex(), b


def _hex32_bytes(hex64: str, what: str) -> bytes:
    if not isinstance(hex64, str) or len(hex64) != 64 or hex64 != hex64.lower():
        raise IdentityError("E_BAD_HEX_ENCODING", f"{what} must be 64 lower-case hex digits: {hex64!r}")
    try:
        return bytes.fromhex(hex64)
    except ValueError as e:
        raise IdentityError("E_BAD_HEX_ENCODING", f"{what} is not hex: {hex64!r}") from e


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _U64:
        raise IdentityError("E_SEED_RANGE", f"seed must be an integer in [0, 2^64): {seed!r}")
    return seed


def run_id(segment: str, manifest_fingerprint_hex: str, parameter_hash_hex: str, seed: int) -> str:
    """Decision 15: 32 hex digits, a pure function of segment, fingerprint, parameter_hash and seed."""
    if segment not in SEGMENTS:
        raise IdentityError("E_SEGMENT_UNKNOWN", f"segment must be one of {SEGMENTS}: {segment!r}")
    fp = _hex32_bytes(manifest_fingerprint_hex, "manifest_fingerprint")
    ph = _hex32_bytes(parameter_hash_hex, "parameter_hash")
    s = _check_seed(seed)
    return sha256(uer("run_id") + uer(segment) + fp + ph + le64(s)).hex()[:32]


def commit_bytes32(commit_hex: str) -> bytes:
    """git_32 of 00-core §1.4 from a commit id: SHA-256 (64 hex) as is, SHA-1 (40 hex) = 12 zero bytes + 20.

    Only for reproducing upstream vectors (the engine itself uses :func:`code_digest`, decision 3).
    """
    if not isinstance(commit_hex, str):
        raise IdentityError("E_GIT_BYTES", f"commit must be a hex string: {commit_hex!r}")
    h = commit_hex.strip().lower()
    try:
        raw = bytes.fromhex(h)
    except ValueError as e:
        raise IdentityError("E_GIT_BYTES", f"commit is not hex: {commit_hex!r}") from e
    if len(raw) == 32:
        return raw
    if len(raw) == 20:
        return bytes(12) + raw
    raise IdentityError("E_GIT_BYTES", f"commit must be 40 (SHA-1) or 64 (SHA-256) hex digits: {commit_hex!r}")


def canonical_json_bytes(obj: Any) -> bytes:
    """Canonical JSON used for synthetic option entries: sorted keys, compact, ASCII, floats by repr."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def grid_hash(
    width: int,
    height: int,
    transform: Iterable[float],
    crs_wkt: str,
    polygons_sha256: bytes,
    inclusion_rule: str = INCLUSION_RULE,
) -> tuple[str, bytes]:
    """Decision 13: hash of the tile grid definition and the polygon set (not of raster values)."""
    t = [float(x) for x in transform]
    if len(t) != 6:
        raise IdentityError("E_GRID_DEFINITION", f"affine transform needs 6 coefficients, got {len(t)}")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise IdentityError("E_GRID_DEFINITION", f"raster width/height must be positive integers: {width} x {height}")
    poly = _as_digest(polygons_sha256, "polygons", "artefact")
    b = sha256(
        uer("1B.grid")
        + le64(width)
        + le64(height)
        + struct.pack("<6d", *t)
        + uer(crs_wkt or "")
        + poly
        + uer(inclusion_rule)
    )
    return b.hex(), b


def weights_hash(grid_hash_bytes: bytes, basis: str, dp: int, raster_sha256: bytes | None) -> tuple[str, bytes]:
    """Decision 13: basis, dp and (for ``basis=population`` only) the raster's bytes, on top of the grid."""
    if basis not in BASES_1B:
        raise IdentityError("E_OPTION_INVALID", f"1B basis must be one of {BASES_1B}: {basis!r}")
    if isinstance(dp, bool) or not isinstance(dp, int) or not 0 <= dp <= 18:
        raise IdentityError("E_OPTION_INVALID", f"1B dp must be an integer in 0..18: {dp!r}")
    g = _as_digest(grid_hash_bytes, "grid_hash", "artefact")
    payload = uer("1B.weights") + g + uer(basis) + le32(dp)
    if basis == "population":
        if raster_sha256 is None:
            raise IdentityError("E_ARTIFACT_IO", "basis=population needs the raster digest")
        payload += _as_digest(raster_sha256, "population_raster", "artefact")
    b = sha256(payload)
    return b.hex(), b


# --------------------------------------------------------------------------------------------------
# code identity (decision 3) and git provenance
# --------------------------------------------------------------------------------------------------


# Files that never shape bytes under data/: the run report (writes under reports/ only), the audit tool
# (reads only) and the CLI layer (parses flags into a config whose effect is hashed through its inputs).
REPORT_ONLY_FILES = {"engine/report.py", "rules/report.smk", "engine/audit.py"}


def code_files(repo_root: str | Path) -> list[str]:
    """Relative POSIX paths of the files in the code digest, sorted bytewise."""
    root = Path(repo_root)
    rels: set[str] = set()
    eng = root / "engine"
    if eng.is_dir():
        for p in eng.rglob("*.py"):
            rel = p.relative_to(root)
            if "__pycache__" in rel.parts or not p.is_file():
                continue
            rels.add(rel.as_posix())
    if (root / "Snakefile").is_file():
        rels.add("Snakefile")
    rules = root / "rules"
    if rules.is_dir():
        for p in rules.glob("*.smk"):
            if p.is_file():
                rels.add(p.relative_to(root).as_posix())
    # Project extension of decision 3: the contracts (dictionaries, schemas) and the one state entry
    # point shape output bytes too, so a change to them gives a new fingerprint, never a
    # write-once conflict under an old one.
    contracts = root / "contracts"
    if contracts.is_dir():
        for p in contracts.rglob("*"):
            if p.is_file() and p.suffix in (".yaml", ".yml", ".json"):
                rels.add(p.relative_to(root).as_posix())
    if (root / "scripts" / "run_state.py").is_file():
        rels.add("scripts/run_state.py")
    # The run report writes only under reports/, never under data/: its code is not part of the identity.
    rels -= REPORT_ONLY_FILES
    rels = {r for r in rels if not r.startswith("engine/cli/")}
    return sorted(rels, key=lambda s: s.encode("utf-8"))


def code_digest(repo_root: str | Path) -> bytes:
    """Decision 3: 32-byte digest of the engine's own source (``engine/**/*.py``, ``Snakefile``, ``rules/*.smk``,
    plus ``contracts/**`` and ``scripts/run_state.py``).

    Layout: ``SHA256(concat_i (UER(relpath_i) || SHA256(bytes_i)))`` over the sorted relative POSIX paths.
    Docs, tests, configs and ``__pycache__`` do not count.
    """
    root = Path(repo_root)
    files = code_files(root)
    if not files:
        raise IdentityError("E_CODE_DIGEST_EMPTY", "no engine source files found for the code digest", path=root)
    h = hashlib.sha256()
    for rel in files:
        try:
            data = (root / rel).read_bytes()
        except OSError as e:  # pragma: no cover - filesystem failure
            raise IdentityError("E_CODE_DIGEST_IO", f"cannot read engine source: {e}", path=root / rel) from e
        h.update(uer(rel) + sha256(data))
    return h.digest()


def git_commit(repo_root: str | Path) -> str | None:
    """The checkout's commit id (hex) read from ``.git`` without running git; ``None`` when unknown.

    Provenance only: no identity reads it (decision 3). Never raises.
    """
    try:
        root = Path(repo_root)
        gitdir = root / ".git"
        if gitdir.is_file():  # worktree / submodule: "gitdir: <path>"
            txt = gitdir.read_text(encoding="utf-8").strip()
            if not txt.startswith("gitdir:"):
                return None
            gitdir = Path(txt[len("gitdir:") :].strip())
            if not gitdir.is_absolute():
                gitdir = (root / gitdir).resolve()
        head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
        if head.startswith("ref:"):
            ref = head[4:].strip()
            commondir = gitdir
            cd = gitdir / "commondir"
            if cd.is_file():
                commondir = (gitdir / cd.read_text(encoding="utf-8").strip()).resolve()
            for base in (gitdir, commondir):
                rf = base / ref
                if rf.is_file():
                    val = rf.read_text(encoding="utf-8").strip()
                    return val if _is_commit_hex(val) else None
            for base in (gitdir, commondir):
                packed = base / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text(encoding="utf-8").splitlines():
                        parts = line.strip().split(" ")
                        if len(parts) == 2 and parts[1] == ref and _is_commit_hex(parts[0]):
                            return parts[0]
            return None
        return head if _is_commit_hex(head) else None
    except Exception:  # noqa: BLE001 - provenance must never fail a run
        return None


def _is_commit_hex(s: str) -> bool:
    return len(s) in (40, 64) and all(c in "0123456789abcdef" for c in s)


# --------------------------------------------------------------------------------------------------
# file hashing with a (path, size, mtime_ns) cache
# --------------------------------------------------------------------------------------------------

# Files modified less than this long before hashing are hashed but not cached: a write landing in the
# same mtime tick after hashing could otherwise leave a stale digest with a matching (size, mtime_ns).
_RACY_WINDOW_NS = 2_000_000_000
_CHUNK = 1 << 20


def _hash_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.digest()


class HashCache:
    """SHA-256 of files, cached as JSON ``{abs_path: {"size", "mtime_ns", "sha256"}}`` at ``path``.

    A dry run (Snakemake parses the Snakefile often) then re-hashes only files whose size or mtime changed.
    Every file is stat-ed before and after hashing; a change means it was written while being hashed
    (``race_code``). ``path=None`` disables persistence. The cache only ever saves work: a missing,
    unreadable or foreign cache file is ignored, and a stale entry is never used because its key no longer
    matches.
    """

    VERSION = 1

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        self._dirty = False
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.is_file():
            try:
                obj = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(obj, dict) and obj.get("version") == self.VERSION and isinstance(obj.get("files"), dict):
                    self.entries = {
                        k: v
                        for k, v in obj["files"].items()
                        if isinstance(v, dict) and {"size", "mtime_ns", "sha256"} <= set(v)
                    }
            except (OSError, ValueError):
                self.entries = {}

    def digest(self, path: str | Path, *, key: str, io_code: str, race_code: str) -> tuple[bytes, int]:
        """``(sha256 bytes, size)`` of ``path``; ``key`` names the config entry in error messages."""
        p = Path(path)
        try:
            st = os.stat(p)
        except OSError as e:
            raise IdentityError(io_code, f"{key}: cannot read {p}: {e.strerror or e}", path=p, detail={"key": key}) from e
        if not p.is_file():
            raise IdentityError(io_code, f"{key}: not a regular file: {p}", path=p, detail={"key": key})
        k = str(p)
        e = self.entries.get(k)
        if e is not None and e["size"] == st.st_size and e["mtime_ns"] == st.st_mtime_ns:
            try:
                d = bytes.fromhex(e["sha256"])
                if len(d) == 32:
                    self.hits += 1
                    return d, st.st_size
            except (TypeError, ValueError):
                pass
        try:
            d = _hash_file(p)
        except OSError as ex:
            raise IdentityError(io_code, f"{key}: cannot read {p}: {ex.strerror or ex}", path=p, detail={"key": key}) from ex
        try:
            st2 = os.stat(p)
        except OSError as ex:
            raise IdentityError(race_code, f"{key}: file vanished while being hashed: {p}", path=p) from ex
        if (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise IdentityError(
                race_code,
                f"{key}: file changed while being hashed: {p}",
                path=p,
                detail={"key": key, "before": [st.st_size, st.st_mtime_ns], "after": [st2.st_size, st2.st_mtime_ns]},
            )
        self.misses += 1
        if time.time_ns() - st.st_mtime_ns >= _RACY_WINDOW_NS:
            self.entries[k] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": d.hex()}
            self._dirty = True
        return d, st.st_size

    def save(self) -> None:
        """Write the cache atomically (temp file in the same folder + rename), keys sorted."""
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            body = json.dumps(
                {"version": self.VERSION, "files": self.entries}, sort_keys=True, indent=1, ensure_ascii=True
            )
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="ascii") as f:
                f.write(body + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:  # pragma: no cover - a cache that cannot be written only costs time
            pass


# --------------------------------------------------------------------------------------------------
# resolution from a configuration
# --------------------------------------------------------------------------------------------------


def _default_config() -> dict:
    import yaml

    from engine.core.dictionary import SAFE_LOADER

    with open(DEFAULT_CONFIG_PATH, "rb") as f:
        return yaml.load(f, Loader=SAFE_LOADER) or {}


def required_parameters(segment: str) -> tuple[str, ...]:
    """Governed parameter names a run must supply: the keys of the engine's default ``config.yaml``."""
    cfg = _default_config()
    key = {"1A": "segment1a", "1B": "segment1b"}[segment]
    return tuple(sorted((cfg.get(key, {}).get("parameters") or {}).keys(), key=lambda s: s.encode("utf-8")))


def _abs(p: str | Path, repo_root: Path) -> Path:
    q = Path(str(p))
    return q if q.is_absolute() else (repo_root / q)


def _entry(name: str, path: Path | None, digest: bytes, size: int) -> dict:
    return {"name": name, "path": None if path is None else str(path), "sha256": digest.hex(), "size_bytes": size}


def _check_names(given: Mapping[str, Any], required: tuple[str, ...], segment: str) -> None:
    missing = [n for n in required if n not in given]
    if missing:
        raise IdentityError(
            "E_PARAM_MISSING",
            f"segment{segment.lower()}.parameters lacks required governed file(s)",
            rows=missing,
            detail={"required": list(required)},
        )
    unknown = sorted(n for n in given if n not in required)
    if unknown:
        raise IdentityError(
            "E_PARAM_UNKNOWN",
            f"segment{segment.lower()}.parameters names file(s) the engine does not know",
            rows=unknown,
            detail={"required": list(required)},
        )


def _hash_params(
    params: Mapping[str, Any], repo_root: Path, cache: HashCache, segment: str
) -> list[tuple[str, Path, bytes, int]]:
    out = []
    for name in sorted(params, key=lambda s: s.encode("utf-8")):
        val = params[name]
        if not isinstance(val, (str, Path)) or not str(val):
            raise IdentityError("E_PARAM_IO", f"segment{segment.lower()}.parameters.{name}: no path given", detail={"key": name})
        p = _abs(val, repo_root)
        d, size = cache.digest(p, key=f"segment{segment.lower()}.parameters.{name}", io_code="E_PARAM_IO", race_code="E_PARAM_RACE")
        out.append((name, p, d, size))
    return out


def _hash_inputs(
    inputs: Mapping[str, Any], required: tuple[str, ...], repo_root: Path, cache: HashCache, segment: str
) -> list[tuple[str, Path, bytes, int]]:
    missing = [n for n in required if not inputs.get(n)]
    if missing:
        raise IdentityError(
            "E_ARTIFACT_IO", f"segment{segment.lower()}.inputs lacks required input(s)", rows=missing
        )
    out = []
    for name in sorted(inputs, key=lambda s: s.encode("utf-8")):
        val = inputs[name]
        if not isinstance(val, (str, Path)) or not str(val):
            raise IdentityError("E_ARTIFACT_IO", f"segment{segment.lower()}.inputs.{name}: no path given", detail={"key": name})
        p = _abs(val, repo_root)
        d, size = cache.digest(p, key=f"segment{segment.lower()}.inputs.{name}", io_code="E_ARTIFACT_IO", race_code="E_ARTIFACT_RACE")
        out.append((name, p, d, size))
    return out


def normalise_options_1a(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``DEFAULT_OPTIONS_1A`` overlaid with the configured options (unknown keys kept: they are hashed too)."""
    opts = dict(DEFAULT_OPTIONS_1A)
    for k, v in (options or {}).items():
        opts[str(k)] = v
    for k in DEFAULT_OPTIONS_1A:
        if not isinstance(opts[k], bool):
            raise IdentityError("E_OPTION_INVALID", f"segment1a.options.{k} must be true or false: {opts[k]!r}")
    return opts


@dataclass(frozen=True)
class Resolved1A:
    """1A identities of a configured run plus what went into them (for receipts and sealed-input lists).

    ``param_entries`` / ``artifact_entries``: dicts ``{name, path (absolute str, None for the synthetic
    options entry), sha256 (hex), size_bytes}`` sorted by name; ``artifact_entries`` include the parameter
    entries again (00-core §1.4).
    """

    seed: int
    parameter_hash: str
    parameter_hash_bytes: bytes
    manifest_fingerprint: str
    fingerprint_bytes: bytes
    run_id: str
    code_digest_hex: str
    git_commit: str | None
    param_entries: list[dict]
    artifact_entries: list[dict]
    options: dict

    segment = "1A"

    @property
    def ids(self) -> SegmentIds:
        return SegmentIds("1A", self.seed, self.parameter_hash, self.manifest_fingerprint, self.run_id)

    def to_record(self) -> dict:
        """JSON-serialisable summary (hex strings; no bytes)."""
        return {
            "segment": "1A",
            "seed": self.seed,
            "parameter_hash": self.parameter_hash,
            "manifest_fingerprint": self.manifest_fingerprint,
            "run_id": self.run_id,
            "code_digest": self.code_digest_hex,
            "git_commit": self.git_commit,
            "options": dict(self.options),
            "param_entries": [dict(e) for e in self.param_entries],
            "artifact_entries": [dict(e) for e in self.artifact_entries],
        }


@dataclass(frozen=True)
class Resolved1B:
    """1B identities (decisions 9, 13): own parameter_hash / fingerprint / run_id plus grid and weights hashes."""

    seed: int
    parameter_hash: str
    parameter_hash_bytes: bytes
    manifest_fingerprint: str
    fingerprint_bytes: bytes
    run_id: str
    grid_hash: str
    weights_hash: str
    code_digest_hex: str
    git_commit: str | None
    param_entries: list[dict]
    artifact_entries: list[dict]
    options: dict
    grid: dict
    ids_1a: SegmentIds = field(default=None)  # type: ignore[assignment]

    segment = "1B"

    @property
    def ids(self) -> SegmentIds:
        return SegmentIds("1B", self.seed, self.parameter_hash, self.manifest_fingerprint, self.run_id)

    @property
    def extra(self) -> dict:
        """Extra path tokens for ``RunContext.extra``."""
        return {"grid_hash": self.grid_hash, "weights_hash": self.weights_hash}

    def to_record(self) -> dict:
        return {
            "segment": "1B",
            "seed": self.seed,
            "parameter_hash": self.parameter_hash,
            "manifest_fingerprint": self.manifest_fingerprint,
            "run_id": self.run_id,
            "grid_hash": self.grid_hash,
            "weights_hash": self.weights_hash,
            "code_digest": self.code_digest_hex,
            "git_commit": self.git_commit,
            "options": dict(self.options),
            "grid": dict(self.grid),
            "ids_1a": None
            if self.ids_1a is None
            else {
                "seed": self.ids_1a.seed,
                "parameter_hash": self.ids_1a.parameter_hash,
                "manifest_fingerprint": self.ids_1a.manifest_fingerprint,
                "run_id": self.ids_1a.run_id,
            },
            "param_entries": [dict(e) for e in self.param_entries],
            "artifact_entries": [dict(e) for e in self.artifact_entries],
        }


def _section(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    sec = config.get(key)
    if not isinstance(sec, Mapping):
        raise IdentityError("E_CONFIG_INVALID", f"configuration has no '{key}' section")
    return sec


def _provenance_commit(config: Mapping[str, Any], repo_root: Path) -> str | None:
    c = config.get("git_commit")
    return str(c) if c else git_commit(repo_root)


def resolve_1a(config: Mapping[str, Any], repo_root: str | Path, cache_path: str | Path | None = None) -> Resolved1A:
    """Resolve the 1A identities of ``config`` (``config.yaml`` layout; relative paths = under ``repo_root``).

    Errors (``IdentityError``): ``E_SEED_RANGE``, ``E_PARAM_MISSING`` / ``E_PARAM_UNKNOWN`` (names differ from
    the default config's), ``E_PARAM_IO`` / ``E_ARTIFACT_IO`` (file missing or unreadable; message names the
    config key and path), ``E_PARAM_RACE`` / ``E_ARTIFACT_RACE``, ``E_OPTION_INVALID`` and the pure functions'.
    """
    root = Path(repo_root).resolve()
    seed = _check_seed(config.get("seed"))
    s1a = _section(config, "segment1a")
    params = s1a.get("parameters") or {}
    inputs = s1a.get("inputs") or {}
    if not isinstance(params, Mapping) or not params:
        raise IdentityError("E_PARAM_EMPTY", "segment1a.parameters is empty")
    if not isinstance(inputs, Mapping):
        raise IdentityError("E_ARTIFACT_EMPTY", "segment1a.inputs is not a mapping")
    _check_names(params, required_parameters("1A"), "1A")
    options = normalise_options_1a(s1a.get("options"))

    cache = HashCache(cache_path)
    try:
        hashed_params = _hash_params(params, root, cache, "1A")
        hashed_inputs = _hash_inputs(inputs, REQUIRED_INPUTS_1A, root, cache, "1A")
    finally:
        cache.save()

    opt_bytes = canonical_json_bytes(options)
    param_entries = [_entry(n, p, d, s) for n, p, d, s in hashed_params]
    param_entries.append(_entry(OPTIONS_1A_NAME, None, sha256(opt_bytes), len(opt_bytes)))
    param_entries.sort(key=lambda e: e["name"].encode("utf-8"))
    ph_hex, ph_bytes = parameter_hash([(e["name"], bytes.fromhex(e["sha256"])) for e in param_entries])

    artifact_entries = [_entry(n, p, d, s) for n, p, d, s in hashed_inputs] + [dict(e) for e in param_entries]
    artifact_entries.sort(key=lambda e: e["name"].encode("utf-8"))
    code32 = code_digest(root)
    fp_hex, fp_bytes = manifest_fingerprint(
        [(e["name"], bytes.fromhex(e["sha256"])) for e in artifact_entries], code32, ph_bytes
    )
    return Resolved1A(
        seed=seed,
        parameter_hash=ph_hex,
        parameter_hash_bytes=ph_bytes,
        manifest_fingerprint=fp_hex,
        fingerprint_bytes=fp_bytes,
        run_id=run_id("1A", fp_hex, ph_hex, seed),
        code_digest_hex=code32.hex(),
        git_commit=_provenance_commit(config, root),
        param_entries=param_entries,
        artifact_entries=artifact_entries,
        options=options,
    )


def read_grid_definition(raster_path: str | Path) -> dict:
    """Width, height, affine transform and CRS WKT of a raster, read from its header (no pixel values)."""
    try:
        import rasterio

        with rasterio.open(raster_path) as ds:
            t = ds.transform
            crs = ds.crs
            return {
                "width": int(ds.width),
                "height": int(ds.height),
                "transform": [float(t.a), float(t.b), float(t.c), float(t.d), float(t.e), float(t.f)],
                "crs_wkt": crs.to_wkt() if crs is not None else "",
            }
    except IdentityError:
        raise
    except Exception as e:  # rasterio raises its own error types
        raise IdentityError(
            "E_ARTIFACT_IO", f"segment1b.inputs.population_raster: cannot read raster header: {e}", path=raster_path
        ) from e


def _ids_1a(resolved_1a: Any) -> SegmentIds:
    if isinstance(resolved_1a, SegmentIds):
        return resolved_1a
    ids = getattr(resolved_1a, "ids", None)
    if isinstance(ids, SegmentIds):
        return ids
    raise IdentityError("E_PARAM_HASH_ABSENT", "resolve_1b needs the 1A identities (Resolved1A or SegmentIds)")


def resolve_1b(
    config: Mapping[str, Any],
    repo_root: str | Path,
    resolved_1a: Resolved1A | SegmentIds,
    cache_path: str | Path | None = None,
) -> Resolved1B:
    """Resolve the 1B identities (decisions 9, 13) on top of the 1A identities it consumes.

    ``resolved_1a`` may be a :class:`Resolved1A` or the ``SegmentIds`` a user passed on the command line
    (runbook ``segment1b run --parameter-hash --manifest-fingerprint --seed``); 1B uses its seed.
    """
    root = Path(repo_root).resolve()
    ids1a = _ids_1a(resolved_1a)
    seed = _check_seed(ids1a.seed)
    fp1a = _hex32_bytes(ids1a.manifest_fingerprint, "1A manifest_fingerprint")
    s1b = _section(config, "segment1b")
    params = s1b.get("parameters") or {}
    inputs = s1b.get("inputs") or {}
    if not isinstance(params, Mapping) or not isinstance(inputs, Mapping):
        raise IdentityError("E_CONFIG_INVALID", "segment1b.parameters / inputs must be mappings")
    _check_names(params, required_parameters("1B"), "1B")
    opts_in = s1b.get("options") or {}
    basis = opts_in.get("basis")
    dp = opts_in.get("dp")
    if basis not in BASES_1B:
        raise IdentityError("E_OPTION_INVALID", f"segment1b.options.basis must be one of {BASES_1B}: {basis!r}")
    if isinstance(dp, bool) or not isinstance(dp, int) or not 0 <= dp <= 18:
        raise IdentityError("E_OPTION_INVALID", f"segment1b.options.dp must be an integer in 0..18: {dp!r}")
    identity_options = {"basis": basis, "dp": dp}

    cache = HashCache(cache_path)
    try:
        hashed_params = _hash_params(params, root, cache, "1B")
        hashed_inputs = _hash_inputs(inputs, REQUIRED_INPUTS_1B, root, cache, "1B")
    finally:
        cache.save()
    by_name = {n: (p, d) for n, p, d, _ in hashed_inputs}
    raster_path, raster_sha = by_name["population_raster"]
    _, poly_sha = by_name["world_countries"]

    grid = read_grid_definition(raster_path)
    g_hex, g_bytes = grid_hash(grid["width"], grid["height"], grid["transform"], grid["crs_wkt"], poly_sha)
    w_hex, _ = weights_hash(g_bytes, basis, dp, raster_sha if basis == "population" else None)

    opt_bytes = canonical_json_bytes(identity_options)
    param_entries = [_entry(n, p, d, s) for n, p, d, s in hashed_params]
    param_entries.append(_entry(OPTIONS_1B_NAME, None, sha256(opt_bytes), len(opt_bytes)))
    param_entries.sort(key=lambda e: e["name"].encode("utf-8"))
    ph_hex, ph_bytes = parameter_hash([(e["name"], bytes.fromhex(e["sha256"])) for e in param_entries])

    artifact_entries = (
        [{"name": FINGERPRINT_1A_ENTRY, "path": None, "sha256": fp1a.hex(), "size_bytes": 32}]
        + [_entry(n, p, d, s) for n, p, d, s in hashed_inputs]
        + [dict(e) for e in param_entries]
    )
    artifact_entries.sort(key=lambda e: e["name"].encode("utf-8"))
    # the same tree was just digested for 1A: reuse it rather than hashing every source file again
    code32 = (bytes.fromhex(resolved_1a.code_digest_hex) if isinstance(resolved_1a, Resolved1A)
              else code_digest(root))
    fp_hex, fp_bytes = manifest_fingerprint(
        [(e["name"], bytes.fromhex(e["sha256"])) for e in artifact_entries], code32, ph_bytes
    )
    return Resolved1B(
        seed=seed,
        parameter_hash=ph_hex,
        parameter_hash_bytes=ph_bytes,
        manifest_fingerprint=fp_hex,
        fingerprint_bytes=fp_bytes,
        run_id=run_id("1B", fp_hex, ph_hex, seed),
        grid_hash=g_hex,
        weights_hash=w_hex,
        code_digest_hex=code32.hex(),
        git_commit=_provenance_commit(config, root),
        param_entries=param_entries,
        artifact_entries=artifact_entries,
        options={**{k: v for k, v in opts_in.items()}, **identity_options},
        grid={**grid, "inclusion_rule": INCLUSION_RULE},
        ids_1a=ids1a,
    )
