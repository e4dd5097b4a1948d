"""JSON schemas of datasets and records, their Arrow form, and vectorised table validation.

Schemas live in ``contracts/`` (``schemas/<1A|1B>/<dataset_id>.schema.json``, ``schemas/rng/*.schema.json``).
Each one is a JSON Schema (draft 2020-12) describing ONE row or record, with two project keywords:

* ``x-arrow`` on a property: ``uint64, int64, uint32, int32, uint16, int16, uint8, int8, float64, float32,
  bool, string`` or ``list<T>`` of one of those;
* ``x-column-order`` at the top: the column order of the table (default: ``properties`` order).

A property is nullable when its ``type`` lists ``"null"`` (or it says ``nullable: true``). Tables are closed
unless ``additionalProperties`` is true; a property not in ``required`` may be absent from a table.

API: :func:`load_schema`, :func:`arrow_schema`, :func:`arrow_type`, :func:`columns`,
:func:`validate_table` (vectorised with ``pyarrow.compute``; returns problems naming the first offending
rows), :func:`validate_record` (JSON records; ``jsonschema`` when installed, else a small built-in subset).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.core.errors import EngineError

CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "contracts"
MAX_ROWS = 10

_SCALAR_TYPES: dict[str, pa.DataType] = {
    "uint64": pa.uint64(),
    "int64": pa.int64(),
    "uint32": pa.uint32(),
    "int32": pa.int32(),
    "uint16": pa.uint16(),
    "int16": pa.int16(),
    "uint8": pa.uint8(),
    "int8": pa.int8(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "string": pa.string(),
}
_LIST_RE = re.compile(r"^list<\s*([a-z0-9]+)\s*>$")

_CACHE: dict[tuple[str, int], dict] = {}


# ---------------------------------------------------------------------- loading
def _resolve(ref: str | Path) -> Path:
    """Absolute paths as given; relative refs against contracts/ first, then the working directory."""
    p = Path(ref)
    if p.is_absolute():
        return p
    in_contracts = CONTRACTS_DIR / p
    if in_contracts.exists() or not p.exists():
        return in_contracts
    return p.resolve()


def load_schema(ref_or_path: Any) -> dict:
    """A schema dict from a dict (returned as is), an absolute path, or a ref relative to ``contracts/``
    (``schemas/1A/outlet_catalogue.schema.json``), optionally with a JSON-pointer fragment (``#/a/b``).
    Unresolvable -> ``EngineError("E_SCHEMA_RESOLUTION_FAILED")``."""
    if isinstance(ref_or_path, Mapping):
        return dict(ref_or_path)
    ref = str(ref_or_path)
    file_part, _, fragment = ref.partition("#")
    path = _resolve(file_part)
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        raise EngineError("E_SCHEMA_RESOLUTION_FAILED", f"schema {ref!r} not found", path=path) from None
    doc = _CACHE.get(key)
    if doc is None:
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            raise EngineError("E_SCHEMA_RESOLUTION_FAILED", f"schema {ref!r} unreadable: {exc}", path=path) from None
        _CACHE[key] = doc
    if fragment:
        node: Any = doc
        for tok in fragment.strip("/").split("/"):
            tok = tok.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or tok not in node:
                raise EngineError("E_SCHEMA_RESOLUTION_FAILED", f"fragment {fragment!r} not in schema", path=path)
            node = node[tok]
        return node
    return doc


# ---------------------------------------------------------------------- arrow form
def _types(prop: Mapping) -> list[str]:
    t = prop.get("type", [])
    return list(t) if isinstance(t, list) else [t]


def is_nullable(prop: Mapping) -> bool:
    return "null" in _types(prop) or prop.get("nullable") is True


def arrow_type(prop: Mapping) -> pa.DataType:
    """Arrow type of one property from its ``x-arrow``."""
    name = prop.get("x-arrow")
    if name in _SCALAR_TYPES:
        return _SCALAR_TYPES[name]
    m = _LIST_RE.match(str(name))
    if m and m.group(1) in _SCALAR_TYPES:
        return pa.list_(_SCALAR_TYPES[m.group(1)])
    raise EngineError("E_SCHEMA_RESOLUTION_FAILED", f"unknown x-arrow type {name!r}")


def columns(schema: Any) -> list[str]:
    s = load_schema(schema)
    return list(s.get("x-column-order") or (s.get("properties") or {}).keys())


def arrow_schema(schema: Any) -> pa.Schema:
    """``pa.Schema`` of a row schema: columns in ``x-column-order`` (else ``properties``) order, types from
    ``x-arrow``, nullability from the JSON types. No metadata (byte-stable Parquet)."""
    s = load_schema(schema)
    props = s.get("properties") or {}
    fields = []
    for name in columns(s):
        if name not in props:
            raise EngineError("E_SCHEMA_RESOLUTION_FAILED", f"x-column-order names unknown column {name!r}")
        fields.append(pa.field(name, arrow_type(props[name]), nullable=is_nullable(props[name])))
    return pa.schema(fields)


def _norm_type(t: pa.DataType) -> pa.DataType:
    """Compare types modulo string/large_string and list field names."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_norm_type(t.value_type))
    return t


# ---------------------------------------------------------------------- table validation
def _rows(mask: Any, parent: np.ndarray | None = None) -> tuple[list[int], int]:
    """First offending row indices and the count, from a boolean (Chunked)Array mask (nulls = False)."""
    m = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    idx = np.flatnonzero(m)
    if parent is not None:
        idx = np.unique(parent[idx])
    return idx[:MAX_ROWS].tolist(), int(idx.size)


def _int_info(t: pa.DataType) -> np.iinfo:
    """``np.iinfo`` of an Arrow integer type (``DataType.to_pandas_dtype`` would import pandas, ~0.3 s)."""
    return np.iinfo(np.dtype(f"{'u' if pa.types.is_unsigned_integer(t) else 'i'}{t.bit_width // 8}"))


def _in_range(bound: Any, t: pa.DataType) -> bool:
    if pa.types.is_integer(t) and isinstance(bound, int):
        info = _int_info(t)
        return int(info.min) <= bound <= int(info.max)
    return True


def _bound_scalar(bound: Any, t: pa.DataType) -> pa.Scalar:
    if pa.types.is_integer(t) and isinstance(bound, int):
        return pa.scalar(bound, type=t)
    return pa.scalar(float(bound), type=pa.float64())


def _check_values(name: str, col: Any, prop: Mapping, problems: list[str], parent: np.ndarray | None = None,
                  what: str = "") -> None:
    """Value checks of one column (or the flattened items of a list column)."""
    t = col.type
    label = f"{name}{what}"

    def report(desc: str, mask: Any) -> None:
        rows, n = _rows(mask, parent)
        if n:
            problems.append(f"{label}: {desc} at rows {rows} ({n} rows)")

    if pa.types.is_floating(t):
        report("NaN", pc.is_nan(col))
        if not prop.get("x-allow-infinite"):
            report("infinite value", pc.is_inf(col))
    if "const" in prop:
        enum = [prop["const"]]
    else:
        enum = prop.get("enum")
    if enum is not None:
        vals = [v for v in enum if v is not None]
        try:
            vs = pa.array(vals, type=t)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            vs = None
        if vs is not None:
            report(f"value not in {vals}", pc.invert(pc.is_in(col, value_set=vs)))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if "pattern" in prop:
            report(f"does not match {prop['pattern']}", pc.invert(pc.match_substring_regex(col, prop["pattern"])))
        if "minLength" in prop:
            report(f"shorter than {prop['minLength']}", pc.less(pc.utf8_length(col), prop["minLength"]))
        if "maxLength" in prop:
            report(f"longer than {prop['maxLength']}", pc.greater(pc.utf8_length(col), prop["maxLength"]))
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        for key, fn, desc in (
            ("minimum", pc.less, "below minimum"),
            ("maximum", pc.greater, "above maximum"),
            ("exclusiveMinimum", pc.less_equal, "not above exclusiveMinimum"),
            ("exclusiveMaximum", pc.greater_equal, "not below exclusiveMaximum"),
        ):
            if key not in prop or isinstance(prop[key], bool):
                continue
            bound = prop[key]
            if not _in_range(bound, t):
                # a bound outside the type's range is either vacuous or always violated
                info = _int_info(t)
                vacuous = (key.endswith("inimum") and bound < int(info.min)) or (
                    key.endswith("aximum") and bound > int(info.max))
                if not vacuous:
                    report(f"{desc} {bound}", pc.is_valid(col))
                continue
            c = col if (pa.types.is_integer(t) and isinstance(bound, int)) else pc.cast(col, pa.float64())
            report(f"{desc} {bound}", fn(c, _bound_scalar(bound, c.type)))


def validate_table(table: Any, schema: Any) -> list[str]:
    """Problems of a table against a row schema (empty list = valid): missing required / extra columns,
    Arrow type mismatches, nulls in non-nullable columns, NaN/inf floats, pattern / enum / const /
    minimum / maximum / length violations (list items too). Vectorised; each problem names the first
    offending row indices."""
    s = load_schema(schema)
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    props: Mapping[str, Mapping] = s.get("properties") or {}
    required = list(s.get("required") or [])
    problems: list[str] = []
    names = table.column_names
    if len(set(names)) != len(names):
        problems.append(f"duplicate column names {sorted({n for n in names if names.count(n) > 1})}")
    for r in required:
        if r not in names:
            problems.append(f"missing column {r}")
    if not s.get("additionalProperties", False):
        extra = [n for n in names if n not in props]
        if extra:
            problems.append(f"unexpected columns {extra}")
    for name in names:
        if name not in props:
            continue
        prop = props[name]
        col = table[name]
        try:
            want = arrow_type(prop)
        except EngineError as exc:
            problems.append(f"{name}: {exc.message}")
            continue
        if _norm_type(col.type) != _norm_type(want):
            problems.append(f"{name}: arrow type {col.type}, expected {want}")
            continue
        if col.null_count and not is_nullable(prop):
            rows, n = _rows(pc.is_null(col))
            problems.append(f"{name}: null in non-nullable column at rows {rows} ({n} rows)")
        _check_values(name, col, prop, problems)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lengths = pc.list_value_length(col)
            if "minItems" in prop:
                rows, n = _rows(pc.less(lengths, prop["minItems"]))
                if n:
                    problems.append(f"{name}: fewer than {prop['minItems']} items at rows {rows} ({n} rows)")
            if "maxItems" in prop:
                rows, n = _rows(pc.greater(lengths, prop["maxItems"]))
                if n:
                    problems.append(f"{name}: more than {prop['maxItems']} items at rows {rows} ({n} rows)")
            items = prop.get("items") or {}
            if items:
                combined = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
                flat = pc.list_flatten(combined)
                parent = np.asarray(pc.list_parent_indices(combined).to_numpy(zero_copy_only=False))
                if flat.null_count and not is_nullable(items):
                    rows, n = _rows(pc.is_null(flat), parent)
                    problems.append(f"{name}[]: null item at rows {rows} ({n} rows)")
                _check_values(name, flat, items, problems, parent=parent, what="[]")
    return problems


# ---------------------------------------------------------------------- record validation
def validate_record(obj: Any, schema: Any) -> list[str]:
    """Problems of one JSON record (dict / list) against a JSON schema (empty list = valid)."""
    s = load_schema(schema)
    try:
        import jsonschema  # available through snakemake; optional
    except ImportError:  # pragma: no cover - exercised only without jsonschema
        return _mini_validate(obj, s, "$")
    validator = jsonschema.Draft202012Validator(s)
    out = []
    for err in validator.iter_errors(obj):
        where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        out.append(f"{where}: {err.message}")
    return sorted(out)


def _type_ok(v: Any, t: str) -> bool:
    return {
        "null": v is None,
        "boolean": isinstance(v, bool),
        "integer": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "string": isinstance(v, str),
        "array": isinstance(v, list),
        "object": isinstance(v, dict),
    }.get(t, True)


def _mini_validate(v: Any, s: Mapping, where: str) -> list[str]:  # pragma: no cover - fallback only
    out: list[str] = []
    types = _types(s) if "type" in s else []
    if types and not any(_type_ok(v, t) for t in types):
        return [f"{where}: {v!r} is not of type {types}"]
    if "const" in s and v != s["const"]:
        out.append(f"{where}: {v!r} != const {s['const']!r}")
    if "enum" in s and v not in s["enum"]:
        out.append(f"{where}: {v!r} not in {s['enum']}")
    if isinstance(v, str) and "pattern" in s and not re.search(s["pattern"], v):
        out.append(f"{where}: {v!r} does not match {s['pattern']}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in s and v < s["minimum"]:
            out.append(f"{where}: {v!r} below minimum {s['minimum']}")
        if "maximum" in s and v > s["maximum"]:
            out.append(f"{where}: {v!r} above maximum {s['maximum']}")
        if "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]:
            out.append(f"{where}: {v!r} not above {s['exclusiveMinimum']}")
        if "exclusiveMaximum" in s and v >= s["exclusiveMaximum"]:
            out.append(f"{where}: {v!r} not below {s['exclusiveMaximum']}")
    if isinstance(v, dict):
        props = s.get("properties") or {}
        for r in s.get("required") or []:
            if r not in v:
                out.append(f"{where}: missing required property {r!r}")
        if s.get("additionalProperties") is False:
            for k in v:
                if k not in props:
                    out.append(f"{where}: unexpected property {k!r}")
        for k, sub in props.items():
            if k in v:
                out.extend(_mini_validate(v[k], sub, f"{where}.{k}"))
    if isinstance(v, list) and isinstance(s.get("items"), Mapping):
        for i, item in enumerate(v):
            out.extend(_mini_validate(item, s["items"], f"{where}[{i}]"))
    return out
