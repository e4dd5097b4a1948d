"""Dataset dictionaries: the one place path templates live (spec README decision 26).

``contracts/dataset_dictionary.layer1.1A.yaml`` and ``contracts/dataset_dictionary.layer1.1B.yaml`` hold,
per dataset id, the path template (relative to the data root), its partition tokens, format, writer sort,
schema reference, producer, fixed file names and a description. The 1A file also holds a ``shared``
section (identity tokens, the RNG log datasets ``rng_event`` / ``rng_trace_log`` / ``rng_audit_log`` and
the RNG family table); the 1B file declares ``inherits: dataset_dictionary.layer1.1A.yaml#shared`` and
gets the same entries, so every RNG log template is written exactly once for both segments.

API
---
* :func:`load` ``(segment, config=None) -> Dictionary`` (cached; ``config["segment1b"]["dictionary"]`` --
  the runbook's ``--dictionary`` -- replaces the 1B file; ``config["segment1a"]["dictionary"]`` likewise).
* :meth:`Dictionary.path` ``(dataset_id, **tokens) -> str`` -- rendered template, relative to the data root;
  directory templates are returned without their trailing ``/``. Extra tokens are ignored; a missing or
  malformed token raises ``EngineError("E_DICTIONARY_RESOLUTION_FAILED")``.
* :meth:`Dictionary.file` -- a fixed file inside a directory partition (``files[0]`` by default).
* :meth:`Dictionary.entry`, :meth:`Dictionary.ids`, :meth:`Dictionary.families`, :meth:`Dictionary.family`,
  :meth:`Dictionary.wildcard_template` (Snakemake ``{token}`` wildcards), :meth:`Dictionary.schema_path`.
* :func:`parse_tokens` ``(path) -> dict[str, str]`` and :func:`check_embed` (path<->embed equality, 00-core 2.3).
* Module-level :func:`wildcard_template` and :func:`families` for callers without a Dictionary at hand.

Token forms (00-core 1.1, 1.2, 1.5): ``seed`` decimal u64; ``parameter_hash``, ``manifest_fingerprint``,
``grid_hash``, ``weights_hash`` 64 lower-case hex; ``run_id`` 32 lower-case hex; ``family`` a key of the
RNG family table. Directory names come from the token table (decision 1: ``fingerprint=``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml

from engine.core.errors import EngineError

# libyaml's parser when PyYAML has it (same documents, ~10x faster: every state process reads the dictionaries)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACTS_DIR = REPO_ROOT / "contracts"
DEFAULT_FILES = {
    "1A": "dataset_dictionary.layer1.1A.yaml",
    "1B": "dataset_dictionary.layer1.1B.yaml",
}
FORMATS = ("parquet", "json", "jsonl", "bundle")
CODE = "E_DICTIONARY_RESOLUTION_FAILED"
U64_MAX = (1 << 64) - 1

_TOKEN_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FORM_RE = {
    "hex64": re.compile(r"^[a-f0-9]{64}$"),
    "hex32": re.compile(r"^[a-f0-9]{32}$"),
    "u64_decimal": re.compile(r"^(0|[1-9][0-9]{0,19})$"),
    "family": re.compile(r"^[a-z0-9_]+$"),
}
_WILDCARD_RE = {
    "hex64": "[a-f0-9]{64}",
    "hex32": "[a-f0-9]{32}",
    "u64_decimal": "[0-9]+",
    "family": "[a-z0-9_]+",
}


def _fail(message: str, path: Any = None, detail: dict | None = None) -> EngineError:
    return EngineError(CODE, message, path=path, detail=detail)


@dataclass(frozen=True)
class Entry:
    """One dataset of a dictionary."""

    id: str
    path: str  # template, as written (directory templates end with "/")
    partitioning: tuple[str, ...]
    format: str
    writer_sort: tuple[str, ...]
    schema_ref: str | None
    produced_by: str
    files: tuple[str, ...]
    description: str
    shared: bool = False
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_dir(self) -> bool:
        return self.path.endswith("/")

    @property
    def tokens(self) -> tuple[str, ...]:
        """Token names used by the template, in order of appearance."""
        return tuple(_TOKEN_RE.findall(self.path))


class Dictionary:
    """A loaded (and linted) dataset dictionary of one segment."""

    def __init__(self, segment: str, source: Path, doc: dict, shared: dict, shared_source: Path):
        self.segment = segment
        self.source = source
        self.shared_source = shared_source
        self.tokens: dict[str, dict] = dict(shared.get("tokens") or {})
        self.token_order: tuple[str, ...] = tuple(shared.get("token_order") or ())
        self._families: dict[str, dict] = dict(shared.get("rng_families") or {})
        self._entries: dict[str, Entry] = {}
        for section, is_shared, src in (
            (shared.get("datasets") or {}, True, shared_source),
            (doc.get("datasets") or {}, False, source),
        ):
            for ds_id, raw in section.items():
                if ds_id in self._entries:
                    raise _fail(f"dataset id {ds_id!r} defined twice (shared and segment sections)", src)
                self._entries[ds_id] = self._make_entry(ds_id, raw, is_shared, src)
        self._lint()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _make_entry(ds_id: str, raw: Any, is_shared: bool, src: Path) -> Entry:
        if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
            raise _fail(f"dataset {ds_id!r}: entry must be a mapping with a string 'path'", src)
        return Entry(
            id=ds_id,
            path=raw["path"],
            partitioning=tuple(raw.get("partitioning") or ()),
            format=str(raw.get("format", "")),
            writer_sort=tuple(raw.get("writer_sort") or ()),
            schema_ref=raw.get("schema_ref"),
            produced_by=str(raw.get("produced_by", "")),
            files=tuple(raw.get("files") or ()),
            description=str(raw.get("description", "")),
            shared=is_shared,
            raw=dict(raw),
        )

    def _lint(self) -> None:
        """Reject templates that break the path law (decisions 1, 2, 13): known tokens, the token table's
        directory names, identity tokens in the fixed order, partitioning == identity tokens in the path."""
        dir_of = {name: spec.get("dir") for name, spec in self.tokens.items()}
        for name, spec in self.tokens.items():
            if spec.get("form") not in _FORM_RE:
                raise _fail(f"token {name!r}: unknown form {spec.get('form')!r}", self.source)
        order_rank = {t: i for i, t in enumerate(self.token_order)}
        problems: list[str] = []
        for e in self._entries.values():
            if e.format not in FORMATS:
                problems.append(f"{e.id}: format {e.format!r} not in {FORMATS}")
            if e.path.startswith("/") or ".." in PurePosixPath(e.path).parts:
                problems.append(f"{e.id}: path must be relative to the data root: {e.path!r}")
            used = e.tokens
            for t in used:
                if t not in self.tokens:
                    problems.append(f"{e.id}: unknown token {{{t}}} in {e.path!r}")
            if "family" in used and e.id != "rng_event":
                problems.append(f"{e.id}: token {{family}} is reserved for rng_event")
            identity: list[str] = []
            for part in e.path.rstrip("/").split("/"):
                toks = _TOKEN_RE.findall(part)
                if "=" in part:
                    key, _, value = part.partition("=")
                    m = _TOKEN_RE.fullmatch(value)
                    if not m or len(toks) != 1:
                        problems.append(f"{e.id}: directory {part!r} must be <dir>={{token}}")
                        continue
                    tok = m.group(1)
                    if dir_of.get(tok) != key:
                        problems.append(
                            f"{e.id}: directory {part!r} must be named {dir_of.get(tok)!r}= (decision 1)")
                    identity.append(tok)
                elif toks and not (toks == ["family"] and part == "{family}"):
                    problems.append(f"{e.id}: token outside a key=value directory in {part!r}")
            ranked = [order_rank[t] for t in identity if t in order_rank]
            if ranked != sorted(ranked):
                problems.append(f"{e.id}: identity tokens out of order {identity} (order {list(self.token_order)})")
            if tuple(identity) != e.partitioning:
                problems.append(f"{e.id}: partitioning {list(e.partitioning)} != path tokens {identity}")
            if len(set(identity)) != len(identity):
                problems.append(f"{e.id}: a token appears twice in {e.path!r}")
        for fam, spec in self._families.items():
            for key in ("segment", "streams", "consuming", "budget"):
                if key not in spec:
                    problems.append(f"rng family {fam}: missing {key!r}")
        if problems:
            raise _fail("dictionary violates the path law", self.source, detail={"problems": problems})

    # ------------------------------------------------------------------ lookup
    def ids(self) -> list[str]:
        """All dataset ids (shared ones included), sorted."""
        return sorted(self._entries)

    def entry(self, dataset_id: str) -> Entry:
        try:
            return self._entries[dataset_id]
        except KeyError:
            raise _fail(f"unknown dataset id {dataset_id!r} in the {self.segment} dictionary", self.source,
                        detail={"known": self.ids()}) from None

    def __contains__(self, dataset_id: object) -> bool:
        return dataset_id in self._entries

    def template(self, dataset_id: str) -> str:
        return self.entry(dataset_id).path

    def families(self) -> dict[str, dict]:
        """The RNG family table (shared section): family -> {segment, streams, consuming, budget, ...}."""
        return {k: dict(v) for k, v in self._families.items()}

    def family(self, name: str) -> dict:
        try:
            return dict(self._families[name])
        except KeyError:
            raise _fail(f"unknown RNG event family {name!r}", self.shared_source,
                        detail={"known": sorted(self._families)}) from None

    # ------------------------------------------------------------------ rendering
    def _token_value(self, dataset_id: str, name: str, value: Any) -> str:
        form = self.tokens[name]["form"]
        if value is None:
            raise _fail(f"{dataset_id}: token {name!r} is missing", self.source)
        if form == "u64_decimal":
            if isinstance(value, bool):
                raise _fail(f"{dataset_id}: token {name}={value!r} is not a u64")
            if isinstance(value, str):
                s = value
            else:
                try:
                    iv = int(value)
                except (TypeError, ValueError):
                    raise _fail(f"{dataset_id}: token {name}={value!r} is not a u64") from None
                if iv != value:
                    raise _fail(f"{dataset_id}: token {name}={value!r} is not an integer")
                s = str(iv)
            if not _FORM_RE[form].fullmatch(s) or int(s) > U64_MAX:
                raise _fail(f"{dataset_id}: token {name}={value!r} is not a decimal u64")
            return s
        if not isinstance(value, str) or not _FORM_RE[form].fullmatch(value):
            raise _fail(f"{dataset_id}: token {name}={value!r} is not {form}")
        if form == "family" and value not in self._families:
            raise _fail(f"{dataset_id}: unknown RNG event family {value!r}",
                        detail={"known": sorted(self._families)})
        return value

    def path(self, dataset_id: str, **tokens: Any) -> str:
        """The dataset's path relative to the data root (no trailing '/'); extra tokens are ignored."""
        e = self.entry(dataset_id)

        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name not in tokens:
                raise _fail(f"{dataset_id}: token {name!r} is missing (template {e.path!r})", self.source)
            return self._token_value(dataset_id, name, tokens[name])

        return _TOKEN_RE.sub(sub, e.path).rstrip("/")

    def file(self, dataset_id: str, name: str | None = None, **tokens: Any) -> str:
        """A fixed file of a directory partition (default: the entry's first ``files`` name)."""
        e = self.entry(dataset_id)
        base = self.path(dataset_id, **tokens)
        if not e.is_dir:
            if name is not None and name != PurePosixPath(base).name:
                raise _fail(f"{dataset_id} is a single file ({e.path!r}); no member {name!r}")
            return base
        if name is None:
            if not e.files:
                raise _fail(f"{dataset_id} has no fixed file names (parts are part-*.parquet/jsonl)")
            name = e.files[0]
        return f"{base}/{name}"

    def wildcard_template(self, dataset_id: str, constrained: bool = False, **fixed: Any) -> str:
        """The template with Snakemake wildcards ``{seed}`` etc. (no trailing '/'). Tokens given in
        ``fixed`` are substituted (validated); ``constrained=True`` writes ``{seed,[0-9]+}`` forms."""
        e = self.entry(dataset_id)

        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name in fixed:
                return self._token_value(dataset_id, name, fixed[name])
            if constrained:
                return "{%s,%s}" % (name, _WILDCARD_RE[self.tokens[name]["form"]])
            return "{%s}" % name

        return _TOKEN_RE.sub(sub, e.path).rstrip("/")

    def schema_ref(self, dataset_id: str, **tokens: Any) -> str | None:
        """The entry's schema_ref with ``{family}`` substituted when given."""
        ref = self.entry(dataset_id).schema_ref
        if ref and "{family}" in ref:
            fam = tokens.get("family")
            if fam is None:
                raise _fail(f"{dataset_id}: schema_ref needs the family token")
            ref = ref.replace("{family}", self._token_value(dataset_id, "family", fam))
        return ref

    def schema_path(self, dataset_id: str, **tokens: Any) -> Path:
        """Absolute path of the dataset's JSON schema (relative refs resolve against contracts/)."""
        ref = self.schema_ref(dataset_id, **tokens)
        if not ref:
            raise _fail(f"{dataset_id}: no schema_ref")
        return CONTRACTS_DIR / ref

    def token_dirs(self) -> dict[str, str]:
        """Directory name -> token name (``fingerprint`` -> ``manifest_fingerprint``)."""
        return {spec["dir"]: name for name, spec in self.tokens.items() if spec.get("dir")}

    def __repr__(self) -> str:  # pragma: no cover
        return f"Dictionary({self.segment}, {self.source})"


# ---------------------------------------------------------------------- loading
_CACHE: dict[tuple, Dictionary] = {}


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            doc = yaml.load(f, Loader=SAFE_LOADER)
    except FileNotFoundError:
        raise _fail("dataset dictionary not found", path) from None
    except yaml.YAMLError as exc:
        raise _fail(f"dataset dictionary is not valid YAML: {exc}", path) from None
    if not isinstance(doc, dict):
        raise _fail("dataset dictionary must be a mapping", path)
    return doc


def _resolve_inherit(ref: str, source: Path) -> tuple[Path, str]:
    name, _, section = ref.partition("#")
    section = section or "shared"
    for cand in (source.parent / name, CONTRACTS_DIR / name):
        if cand.is_file():
            return cand, section
    raise _fail(f"inherited dictionary {name!r} not found next to {source.name} nor in contracts/", source)


def _config_override(segment: str, config: Mapping | None) -> Path | None:
    if not config:
        return None
    key = {"1A": "segment1a", "1B": "segment1b"}.get(segment)
    p = (config.get(key) or {}).get("dictionary") if key else None
    if not p:
        return None
    p = Path(p)
    return p if p.is_absolute() else REPO_ROOT / p


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return -1


def load(segment: str, config: Mapping | None = None) -> Dictionary:
    """Load (and lint) the dictionary of ``segment`` ("1A" or "1B"); cached per file and mtime."""
    if segment not in DEFAULT_FILES:
        raise _fail(f"unknown segment {segment!r}")
    source = (_config_override(segment, config) or CONTRACTS_DIR / DEFAULT_FILES[segment]).resolve()
    key0 = (segment, str(source), _mtime(source))
    cached = _CACHE.get(key0)
    if cached is not None and _mtime(cached.shared_source) == cached._shared_mtime:  # type: ignore[attr-defined]
        return cached
    doc = _read_yaml(source)
    if doc.get("segment") not in (None, segment):
        raise _fail(f"dictionary declares segment {doc.get('segment')!r}, expected {segment!r}", source)
    if "inherits" in doc:
        shared_source, section = _resolve_inherit(str(doc["inherits"]), source)
        shared = _read_yaml(shared_source).get(section)
        if not isinstance(shared, dict):
            raise _fail(f"inherited section {section!r} missing in {shared_source.name}", source)
    else:
        shared_source = source
        shared = doc.get("shared") or {}
    d = Dictionary(segment, source, doc, shared, shared_source)
    d._shared_mtime = _mtime(shared_source)  # type: ignore[attr-defined]
    _CACHE[key0] = d
    return d


def wildcard_template(dataset_id: str, segment: str | None = None, config: Mapping | None = None,
                      constrained: bool = False, **fixed: Any) -> str:
    """Snakemake template of a dataset; the segment is found from the id when not given (1A first)."""
    if segment is None:
        for seg in ("1A", "1B"):
            d = load(seg, config)
            if dataset_id in d:
                return d.wildcard_template(dataset_id, constrained=constrained, **fixed)
        raise _fail(f"unknown dataset id {dataset_id!r}")
    return load(segment, config).wildcard_template(dataset_id, constrained=constrained, **fixed)


def families(config: Mapping | None = None) -> dict[str, dict]:
    """The RNG family table (written once, in the 1A dictionary's shared section)."""
    return load("1A", config).families()


# ---------------------------------------------------------------------- path <-> embed
def parse_tokens(path: str | Path) -> dict[str, str]:
    """Identity tokens carried by a path: ``{'seed': '42', 'manifest_fingerprint': '...'}`` (string values,
    as compared by 00-core 2.3). Directory names map through the token table (``fingerprint=`` ->
    ``manifest_fingerprint``); under ``.../rng/events/<family>/`` the family is returned too. Unknown
    ``key=value`` directories are ignored; a token seen twice with different values raises
    ``EngineError("E_PARTITION_MISPLACED")``."""
    dirs = load("1A").token_dirs()
    out: dict[str, str] = {}
    parts = str(path).replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        if "=" in part:
            key, _, value = part.partition("=")
            tok = dirs.get(key)
            if tok is None:
                continue
            if tok in out and out[tok] != value:
                raise EngineError("E_PARTITION_MISPLACED", f"token {tok} appears twice with different values",
                                  path=path)
            out[tok] = value
        elif part == "events" and i >= 1 and parts[i - 1] == "rng" and i + 1 < len(parts):
            nxt = parts[i + 1]
            if nxt and "=" not in nxt:
                out["family"] = nxt
    return out


def _first_rows(mask_np, limit: int = 10) -> list[int]:
    import numpy as np

    return np.flatnonzero(mask_np)[:limit].tolist()


def check_embed(path: str | Path, table_or_record: Any, mapping: Mapping[str, str]) -> list[str]:
    """Path<->embed equality (00-core 2.3): for each ``token -> column`` in ``mapping`` the embedded
    value (every row of a table, or the field of a record) must equal the path token as a string
    (``str(seed)``, lower-case hex). Returns problems (empty = equal), naming the first offending rows."""
    toks = parse_tokens(path)
    problems: list[str] = []
    is_record = isinstance(table_or_record, Mapping)
    table = None
    if not is_record:
        import pyarrow as pa

        table = table_or_record
        if not isinstance(table, pa.Table):
            try:
                table = pa.Table.from_pandas(table, preserve_index=False)
            except Exception as exc:  # pragma: no cover - defensive
                return [f"cannot read embedded values: {exc}"]
    for token, column in mapping.items():
        if token not in toks:
            problems.append(f"path {path} carries no {token} token")
            continue
        want = toks[token]
        if is_record:
            if column not in table_or_record:
                problems.append(f"field {column} missing (path {token}={want})")
                continue
            got = table_or_record[column]
            if isinstance(got, bool) or got is None or str(got) != want:
                problems.append(f"field {column}={got!r} != path token {token}={want}")
            continue
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        if column not in table.column_names:
            problems.append(f"column {column} missing (path {token}={want})")
            continue
        col = table[column]
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            if pa.types.is_integer(col.type):
                col = pc.cast(col, pa.string())
            else:
                problems.append(f"column {column} has type {col.type}; cannot compare with path token {token}")
                continue
        neq = pc.fill_null(pc.not_equal(col, pa.scalar(want, col.type)), True)
        mask = np.asarray(neq.to_numpy(zero_copy_only=False), dtype=bool)
        if mask.any():
            rows = _first_rows(mask)
            vals = [col[i].as_py() for i in rows[:3]]
            problems.append(f"column {column} != path token {token}={want} at rows {rows} "
                            f"({int(mask.sum())} rows; e.g. {vals})")
    return problems
