"""1B S0 - gate-in and sealing: "No PASS -> no read" (spec 1B 2; 00-core 5.3; decisions 13, 25, 27).

No RNG. In this order (first failure aborts, nothing is published):

1. the 1A validation bundle for (seed, 1A fingerprint) -- folder, ``index.json`` hygiene, ``_passed.flag``
   format and digest -- is verified by :func:`engine.core.bundle.verify_bundle` BEFORE any byte of 1A is
   read (``E_BUNDLE_MISSING``, ``E_INDEX_MISSING``, ``E_INDEX_INVALID``, ``E_PASS_MISSING``,
   ``E_FLAG_FORMAT_INVALID``, ``E_FLAG_HASH_MISMATCH``);
2. the ``outlet_catalogue`` partition of the same (seed, fingerprint) must exist (``E_PARTITION_MISPLACED``)
   and its files must be exactly the bytes 1A S9 validated: the bundle's ``egress_checksums.json`` lists them
   with their SHA-256, and the flag digest covers that file, so a catalogue edited after validation is not
   covered by the PASS (``E_FLAG_HASH_MISMATCH``, detail ``check: egress_checksums``);
3. only now the catalogue is opened: every row's ``manifest_fingerprint`` / ``global_seed`` equal the 1A
   tokens (``E_PATH_EMBED_MISMATCH``);
4. the 1B references and policy are present (``E_REFERENCE_SURFACE_MISSING``) and the configured files
   still hash to this run's 1B identities (``E_ARTIFACT_RACE``);
5. ``sealed_inputs_1B`` then ``s0_gate_receipt_1B`` are published atomically, write-once
   (``E913_ATOMIC_PUBLISH_VIOLATION``, decision 21); the receipt is schema-checked first
   (``E_RECEIPT_SCHEMA_INVALID``).

Every gate failure is a :class:`GateError` whose text begins ``No PASS -> no read:`` and names the bundle
path and what did not match (decision 27).

The receipt records the 1A identities it verified, the flag digest and the digest of the verified catalogue
bytes, and no timestamp (the spec's ``verified_at_utc`` is removed by decision 15), so a re-run publishes
identical bytes (a no-op).

Downstream (S3-S7) gate: :func:`require_receipt` (spec 1B 2 "Downstream gate check": missing or mismatching
receipt -> ``E301_NO_PASS_FLAG``, invalid -> ``E_RECEIPT_SCHEMA_INVALID``); :func:`read_catalogue` reads the
catalogue for S3/S7 and re-checks its bytes against the receipt (hardening the spec allows) and its embedded
tokens. :func:`verified_receipt_exists` serves the CLI's ``--skip-s0``.

:func:`run_rng_anchor` writes the 1B RNG audit row (00-core 3.7) before any 1B draw.

Override of the 1A bundle folder (runbook ``--validation-bundle``): ``segment1b.options.validation_bundle``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.core import bundle, publish
from engine.core.errors import GateError, IdentityError, InputError

SEGMENT = "1B"
STATE = "S0"
PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"
RECEIPT_FILE = "s0_gate_receipt.json"
SEALED_FILE = "sealed_inputs_1B.json"
EGRESS_CHECKSUMS = "egress_checksums.json"
E_NO_PASS = "E301_NO_PASS_FLAG"


# ============================================================================================
# small helpers
# ============================================================================================
def _rel(ctx, p: Path) -> str:
    """Path relative to the data root (POSIX) when under it; else as given (an override outside the root)."""
    try:
        return Path(p).resolve().relative_to(Path(ctx.data_root).resolve()).as_posix()
    except ValueError:
        return Path(p).as_posix()


def partition_files(d: Path) -> list[Path]:
    """Data files of a partition: regular files, recursively, names not starting with ``_`` / ``.``
    (00-core 2.2), in ASCII order of their relative path."""
    out = []
    for p in Path(d).rglob("*"):
        rel = p.relative_to(d)
        if any(part.startswith(("_", ".")) for part in rel.parts) or not p.is_file():
            continue
        out.append(p)
    return sorted(out, key=lambda q: q.relative_to(d).as_posix().encode("ascii", "backslashreplace"))


def file_digests(ctx, files: list[Path]) -> tuple[list[dict], str, int]:
    """Per-file ``{path, sha256_hex, size_bytes}`` (paths relative to the data root) and the directory digest:
    SHA-256 of the concatenated bytes in the given order (spec 1B 2 "directory digest")."""
    comp = hashlib.sha256()
    rows = []
    total = 0
    for p in files:
        h = hashlib.sha256()
        n = 0
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                comp.update(chunk)
                n += len(chunk)
        rows.append({"path": _rel(ctx, p), "sha256_hex": h.hexdigest(), "size_bytes": n})
        total += n
    return rows, comp.hexdigest(), total


def _ids_record(ids) -> dict:
    return {"seed": int(ids.seed), "parameter_hash": ids.parameter_hash,
            "manifest_fingerprint": ids.manifest_fingerprint, "run_id": ids.run_id}


def bundle_dir_1a(ctx) -> Path:
    """The 1A bundle folder: the runbook's ``--validation-bundle`` override, else the dictionary path."""
    override = ((ctx.config.get("segment1b") or {}).get("options") or {}).get("validation_bundle")
    if override:
        p = Path(str(override))
        return p if p.is_absolute() else Path(ctx.data_root) / p
    return Path(ctx.path("validation_bundle_1A", segment="1A"))


def _need_ids_1a(ctx):
    if ctx.ids_1a is None:
        raise IdentityError("E_PARAM_HASH_ABSENT", "1B needs the 1A identities (ctx.ids_1a) to find 1A's outputs")
    return ctx.ids_1a


# ============================================================================================
# the gate (steps 1-3)
# ============================================================================================
def verify_1a(ctx) -> dict:
    """Verify 1A's PASS and the catalogue bytes it covers; returns what the receipt records.

    Nothing of 1A other than the bundle is opened before the flag digest has been verified.
    """
    ids1a = _need_ids_1a(ctx)
    bdir = bundle_dir_1a(ctx)
    digest = bundle.verify_bundle(bdir)  # steps 1-4 of 00-core 5.3; GateError on any failure

    # step 2 of this module: the catalogue partition, and its bytes vs. what the flag covers
    cat_dir = Path(ctx.path("outlet_catalogue", segment="1A"))
    files = [p for p in partition_files(cat_dir) if p.suffix == ".parquet"] if cat_dir.is_dir() else []
    if not files:
        raise GateError("E_PARTITION_MISPLACED",
                        f"bundle {bdir} passed, but outlet_catalogue for seed={ids1a.seed} fingerprint="
                        f"{ids1a.manifest_fingerprint} is absent at {cat_dir}", path=cat_dir)
    try:
        doc = json.loads((bdir / EGRESS_CHECKSUMS).read_bytes())
        want = {str(f["path"]): str(f["sha256_hex"]) for f in doc["files"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GateError("E_INDEX_INVALID", f"bundle {bdir}: {EGRESS_CHECKSUMS} missing or unreadable ({e}); the PASS "
                        "does not say which outlet_catalogue bytes it covers", path=bdir) from None
    if str(doc.get("seed")) != str(ids1a.seed) or doc.get("manifest_fingerprint") != ids1a.manifest_fingerprint:
        raise GateError("E_PATH_EMBED_MISMATCH",
                        f"bundle {bdir}: {EGRESS_CHECKSUMS} is for seed {doc.get('seed')} fingerprint "
                        f"{doc.get('manifest_fingerprint')}, not seed {ids1a.seed} fingerprint "
                        f"{ids1a.manifest_fingerprint}", path=bdir)
    rows, dir_digest, _ = file_digests(ctx, files)
    have = {r["path"]: r["sha256_hex"] for r in rows}
    if have != want:
        diff = ([f"missing: {k}" for k in sorted(set(want) - set(have))]
                + [f"not covered by the PASS: {k}" for k in sorted(set(have) - set(want))]
                + [f"bytes changed: {k}" for k in sorted(set(have) & set(want)) if have[k] != want[k]])
        raise GateError("E_FLAG_HASH_MISMATCH",
                        f"bundle {bdir}: the outlet_catalogue files at {cat_dir} are not the bytes the 1A PASS flag "
                        f"covers ({EGRESS_CHECKSUMS}); re-run 1A or restore the catalogue", path=bdir, rows=diff,
                        detail={"check": "egress_checksums"})

    # step 3: only now open the catalogue; embedded tokens must equal the 1A path tokens
    n_rows = check_catalogue_embed(ctx, files, cat_dir, bdir)
    return {"bundle_dir": bdir, "flag_sha256_hex": digest, "catalogue_dir": cat_dir, "catalogue_files": rows,
            "catalogue_sha256_hex": dir_digest, "catalogue_rows": n_rows}


def token_mismatches(t: pa.Table, fp: str, seed: int) -> tuple[np.ndarray, int, int]:
    """Rows whose ``manifest_fingerprint`` / ``global_seed`` differ from the path tokens: ``(row mask,
    bad_fp, bad_seed)``. Fast path: the distinct values of the (dictionary-read) fingerprint column and the
    seed's min/max; the per-row mask is only built when something differs."""
    fpc, sc = t["manifest_fingerprint"], t["global_seed"]
    fps = [v for v in pc.unique(fpc.cast(pa.string()) if not pa.types.is_dictionary(fpc.type)
                                else fpc.unify_dictionaries().combine_chunks().dictionary).to_pylist()]
    mm = pc.min_max(sc).as_py() if t.num_rows else {"min": seed, "max": seed}
    clean = (set(fps) <= {fp} and fpc.null_count == 0 and sc.null_count == 0
             and (t.num_rows == 0 or (mm["min"] == seed and mm["max"] == seed)))
    if clean:
        return np.zeros(t.num_rows, dtype=bool), 0, 0
    fp_bad = np.asarray(pc.fill_null(pc.not_equal(fpc.cast(pa.string()), pa.scalar(fp)), True)
                        .to_numpy(zero_copy_only=False), dtype=bool)
    seed_bad = np.asarray(pc.fill_null(pc.not_equal(sc, pa.scalar(int(seed), pa.uint64())), True)
                          .to_numpy(zero_copy_only=False), dtype=bool)
    return fp_bad | seed_bad, int(fp_bad.sum()), int(seed_bad.sum())


def read_catalogue_files(files: list[Path], columns: list[str]) -> pa.Table:
    """Catalogue part files concatenated in name order; string columns kept dictionary-encoded as stored."""
    dict_cols = [c for c in columns if c in ("manifest_fingerprint", "legal_country_iso", "home_country_iso")]
    tables = [publish.read_parquet_file(p, columns=columns, read_dictionary=dict_cols) for p in files]
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables([t.unify_dictionaries() for t in tables], promote_options="permissive")


def check_catalogue_embed(ctx, files: list[Path], cat_dir: Path, bdir: Path | None = None) -> int:
    """Every row's ``manifest_fingerprint`` / ``global_seed`` equal the 1A tokens; returns the row count."""
    ids1a = _need_ids_1a(ctx)
    n = 0
    bad_fp = bad_seed = 0
    first: list[str] = []
    for p in files:
        t = read_catalogue_files([p], ["manifest_fingerprint", "global_seed"])
        bad, bf, bs = token_mismatches(t, ids1a.manifest_fingerprint, int(ids1a.seed))
        if bf or bs:
            bad_fp += bf
            bad_seed += bs
            for i in np.flatnonzero(bad)[:5].tolist():
                first.append(f"{p.name} row {i}: manifest_fingerprint={t['manifest_fingerprint'][i].as_py()} "
                             f"global_seed={t['global_seed'][i].as_py()}")
        n += t.num_rows
    if bad_fp or bad_seed:
        raise GateError("E_PATH_EMBED_MISMATCH",
                        f"{cat_dir}: {bad_fp} rows carry another manifest_fingerprint and {bad_seed} rows another "
                        f"global_seed than the path (seed={ids1a.seed}, fingerprint={ids1a.manifest_fingerprint}), "
                        f"although bundle {bdir} passed them",
                        path=cat_dir, rows=first)
    return n


# ============================================================================================
# sealing (steps 4-5)
# ============================================================================================
def _check_references(ctx) -> None:
    cfg = ctx.config
    want = {f"segment1b.inputs.{k}": v for k, v in (cfg["segment1b"].get("inputs") or {}).items()}
    want.update({f"segment1b.parameters.{k}": v for k, v in (cfg["segment1b"].get("parameters") or {}).items()})
    want["segment1a.inputs.iso_table"] = cfg["segment1a"]["inputs"]["iso_table"]
    missing = [f"{k}: {v}" for k, v in sorted(want.items()) if not Path(str(v)).is_file()]
    if missing:
        raise InputError("E_REFERENCE_SURFACE_MISSING", "1B reference files or policies are missing", rows=missing)


def resolve_and_check(ctx):
    """Re-resolve the 1B identities from the configured files; they must equal ``ctx.ids``."""
    from engine.core import identities

    cache = Path(ctx.data_root) / ".snakemake" / "identity-cache.json"
    r = identities.resolve_1b(ctx.config, ctx.repo_root, _need_ids_1a(ctx), cache)
    if (r.parameter_hash, r.manifest_fingerprint, r.run_id) != (
            ctx.ids.parameter_hash, ctx.ids.manifest_fingerprint, ctx.ids.run_id):
        raise IdentityError(
            "E_ARTIFACT_RACE",
            "the configured 1B inputs no longer hash to this run's identities (a file changed after the run was planned)",
            detail={"planned": _ids_record(ctx.ids), "now": _ids_record(r.ids)},
        )
    return r


def sealed_records(ctx, resolved, gate: dict) -> list[dict]:
    """``sealed_inputs_1B.json`` rows, sorted by (asset_id, path) (spec 1B 2)."""
    ids1a = _need_ids_1a(ctx)
    pnames = {e["name"] for e in resolved.param_entries}
    out = []
    for e in resolved.artifact_entries:
        if e["name"] == "1A.manifest_fingerprint":
            kind = "identity"
        elif e["path"] is None:
            kind = "options"
        else:
            kind = "parameter" if e["name"] in pnames else "input"
        out.append({"asset_id": e["name"], "kind": kind, "path": e["name"], "partition": {}, "schema_ref": None,
                    "sha256_hex": e["sha256"], "size_bytes": None if e["path"] is None else int(e["size_bytes"]),
                    "version_tag": None})
    iso_path = Path(ctx.config["segment1a"]["inputs"]["iso_table"])
    iso_rows, iso_digest, iso_size = file_digests(ctx, [iso_path])
    out.append({"asset_id": "iso_table", "kind": "input", "path": "iso_table", "partition": {}, "schema_ref": None,
                "sha256_hex": iso_digest, "size_bytes": iso_size, "version_tag": None})
    tok1a = {"seed": str(ids1a.seed), "manifest_fingerprint": ids1a.manifest_fingerprint}
    out.append({"asset_id": "validation_bundle_1A", "kind": "bundle", "path": _rel(ctx, gate["bundle_dir"]),
                "partition": dict(tok1a), "schema_ref": None, "sha256_hex": gate["flag_sha256_hex"],
                "size_bytes": None, "version_tag": None})
    out.append({"asset_id": "outlet_catalogue", "kind": "dataset", "path": _rel(ctx, gate["catalogue_dir"]),
                "partition": dict(tok1a), "schema_ref": _schema_ref_1a(ctx, "outlet_catalogue"),
                "sha256_hex": gate["catalogue_sha256_hex"],
                "size_bytes": int(sum(r["size_bytes"] for r in gate["catalogue_files"])), "version_tag": None})
    cand_dir = Path(ctx.path("s3_candidate_set", segment="1A"))
    cand_files = partition_files(cand_dir) if cand_dir.is_dir() else []
    if not cand_files:
        raise InputError("E_REFERENCE_SURFACE_MISSING",
                         "1A s3_candidate_set (the only inter-country order authority, sealed for consumers) is absent",
                         path=cand_dir)
    _, cand_digest, cand_size = file_digests(ctx, cand_files)
    out.append({"asset_id": "s3_candidate_set", "kind": "dataset", "path": _rel(ctx, cand_dir),
                "partition": {"parameter_hash": ids1a.parameter_hash, "manifest_fingerprint": ids1a.manifest_fingerprint},
                "schema_ref": _schema_ref_1a(ctx, "s3_candidate_set"), "sha256_hex": cand_digest, "size_bytes": cand_size,
                "version_tag": None})
    out.sort(key=lambda r: (r["asset_id"].encode("ascii"), r["path"].encode("ascii", "backslashreplace")))
    return out


def receipt_record(ctx, gate: dict, sealed: list[dict]) -> dict:
    ids1a = _need_ids_1a(ctx)
    partitions = {
        "outlet_catalogue": ["seed", "manifest_fingerprint"],
        "validation_bundle_1A": ["seed", "manifest_fingerprint"],
        "s3_candidate_set": ["parameter_hash", "manifest_fingerprint"],
    }
    return {
        "segment": SEGMENT,
        "seed": int(ctx.ids.seed),
        "manifest_fingerprint": ctx.ids.manifest_fingerprint,
        "parameter_hash": ctx.ids.parameter_hash,
        "run_id": ctx.ids.run_id,
        "upstream_1A": _ids_record(ids1a),
        "validation_bundle_path": _rel(ctx, gate["bundle_dir"]),
        "flag_sha256_hex": gate["flag_sha256_hex"],
        "outlet_catalogue": {"path": _rel(ctx, gate["catalogue_dir"]), "files": gate["catalogue_files"],
                             "sha256_hex": gate["catalogue_sha256_hex"], "rows": int(gate["catalogue_rows"])},
        "grid_hash": ctx.extra.get("grid_hash"),
        "weights_hash": ctx.extra.get("weights_hash"),
        "code_digest": ctx.extra.get("code_digest"),
        "sealed_inputs": [{"id": r["asset_id"], "partition": partitions.get(r["asset_id"], []),
                           "schema_ref": r["schema_ref"]} for r in sealed],
        "notes": None,
    }


def _schema_ref_1a(ctx, dataset_id: str) -> str:
    """A 1A dataset's ``schema_ref`` as the 1A dataset dictionary names it (recorded in the sealed inputs)."""
    from engine.core import dictionary

    return dictionary.load("1A", ctx.config).schema_ref(dataset_id)


def _validate_receipt(ctx, rec: Any, path: Path | None = None) -> None:
    from engine.core.schema import validate_record

    problems = validate_record(rec, ctx.schema_path("s0_gate_receipt_1B"))
    if problems:
        raise GateError("E_RECEIPT_SCHEMA_INVALID", "s0_gate_receipt_1B does not match its schema", path=path,
                        rows=problems)


def run(ctx) -> None:
    """S0: verify 1A PASS (before reading anything of 1A), seal 1B inputs, publish the receipt."""
    from engine.core import publish
    from engine.core.schema import validate_record

    gate = verify_1a(ctx)  # steps 1-3: raises GateError, nothing written
    _check_references(ctx)
    resolved = resolve_and_check(ctx)
    sealed = sealed_records(ctx, resolved, gate)
    sealed_schema = ctx.schema_path("sealed_inputs_1B")
    problems = [p for r in sealed for p in validate_record(r, sealed_schema)]
    if problems:
        raise GateError("E_RECEIPT_SCHEMA_INVALID", "sealed_inputs_1B does not match its schema", rows=problems)
    rec = receipt_record(ctx, gate, sealed)
    _validate_receipt(ctx, rec)
    with publish.staged(ctx.path("sealed_inputs_1B"), PUBLISH_CODE) as tmp:
        publish.write_json(sealed, Path(tmp) / SEALED_FILE)
    with publish.staged(ctx.path("s0_gate_receipt_1B"), PUBLISH_CODE) as tmp:
        publish.write_json(rec, Path(tmp) / RECEIPT_FILE)


# ============================================================================================
# downstream gate (S3-S7), --skip-s0, RNG anchor
# ============================================================================================
def receipt_path(ctx) -> Path:
    return Path(ctx.path("s0_gate_receipt_1B")) / RECEIPT_FILE


def require_receipt(ctx) -> dict:
    """Load and check this run's gate receipt (spec 1B 2 "Downstream gate check").

    Missing, or recorded for other identities -> ``GateError(E301_NO_PASS_FLAG)``; not matching its schema ->
    ``GateError(E_RECEIPT_SCHEMA_INVALID)``."""
    p = receipt_path(ctx)
    if not p.is_file():
        raise GateError(E_NO_PASS, f"no 1B S0 gate receipt at {p}: run 1B S0 (skip_s0 only works after an earlier "
                        "S0 verified the 1A PASS flag)", path=p)
    try:
        rec = json.loads(p.read_bytes())
    except ValueError as e:
        raise GateError("E_RECEIPT_SCHEMA_INVALID", f"gate receipt is not JSON ({e})", path=p) from None
    _validate_receipt(ctx, rec, p)
    want = {"manifest_fingerprint": ctx.ids.manifest_fingerprint, "parameter_hash": ctx.ids.parameter_hash,
            "seed": int(ctx.ids.seed)}
    got = {k: rec.get(k) for k in want}
    diffs = [f"{k}: receipt {got[k]!r}, run {want[k]!r}" for k in want if got[k] != want[k]]
    if ctx.ids_1a is not None and rec.get("upstream_1A") != _ids_record(ctx.ids_1a):
        diffs.append(f"upstream_1A: receipt {rec.get('upstream_1A')!r}, run {_ids_record(ctx.ids_1a)!r}")
    if diffs:
        raise GateError(E_NO_PASS, f"gate receipt {p} was issued for other identities", path=p, rows=diffs)
    return rec


def verified_receipt_exists(ctx) -> bool:
    """True iff an earlier S0 published a valid receipt for exactly this run's 1B and 1A identities
    (the CLI's ``--skip-s0`` may then skip S0; spec 1B 1)."""
    try:
        require_receipt(ctx)
    except GateError:
        return False
    return (Path(ctx.path("sealed_inputs_1B")) / SEALED_FILE).is_file()


def read_catalogue(ctx, columns: list[str], receipt: dict | None = None, dictionary: bool = False) -> pa.Table:
    """Read ``outlet_catalogue`` after the gate (S3, S7): the partition's files must be byte-identical to those
    S0 verified (recorded in the receipt; else ``E301_NO_PASS_FLAG``) and every row must carry the 1A tokens
    (``E306_TOKEN_MISMATCH``). Returns the requested columns, files concatenated in name order, with the
    types of the file (strings; with ``dictionary=True`` the ISO / fingerprint columns stay dictionary-encoded
    as stored, which saves materialising millions of strings)."""
    rec = receipt if receipt is not None else require_receipt(ctx)
    ids1a = _need_ids_1a(ctx)
    cat_dir = Path(ctx.path("outlet_catalogue", segment="1A"))
    files = [p for p in partition_files(cat_dir) if p.suffix == ".parquet"] if cat_dir.is_dir() else []
    rows, digest, _ = file_digests(ctx, files)
    want = rec["outlet_catalogue"]
    if digest != want["sha256_hex"] or [r["path"] for r in rows] != [f["path"] for f in want["files"]]:
        raise GateError(E_NO_PASS, f"outlet_catalogue at {cat_dir} is not the one S0 verified (digest {digest}, "
                        f"receipt {want['sha256_hex']}); re-run 1B S0", path=cat_dir)
    cols = list(dict.fromkeys(list(columns) + ["manifest_fingerprint", "global_seed"]))
    t = read_catalogue_files(files, cols)
    bad, bf, bs = token_mismatches(t, ids1a.manifest_fingerprint, int(ids1a.seed))
    if bf or bs:
        raise InputError("E306_TOKEN_MISMATCH", f"{bf} outlet_catalogue rows carry another manifest_fingerprint and "
                         f"{bs} another global_seed than the path", path=cat_dir,
                         rows=np.flatnonzero(bad)[:10].tolist())
    t = t.select(list(columns))
    if not dictionary:
        for i, f in enumerate(t.schema):
            if pa.types.is_dictionary(f.type):
                t = t.set_column(i, f.name, t[f.name].cast(f.type.value_type))
    return t


def run_rng_anchor(ctx) -> None:
    """The 1B RNG audit row (00-core 3.7), once per run before any 1B event; requires the gate receipt."""
    from engine.core import rng
    from engine.core.rnglog import RngLogs

    require_receipt(ctx)
    M = rng.master_material(SEGMENT, ctx.ids.fingerprint_bytes, ctx.ids.seed)
    k_root, hi_root, lo_root = rng.root(M)
    code = ctx.extra.get("code_digest")
    if not code:
        raise IdentityError("E_GIT_BYTES", "ctx.extra['code_digest'] (the build_commit of the audit row) is missing")
    logs = RngLogs(ctx.data_root, SEGMENT, ctx.ids, ctx.config)
    logs.write_audit(build_commit=code, code_digest=code, git_commit=ctx.extra.get("git_commit"),
                     rng_key=int(k_root), rng_counter_hi=int(hi_root), rng_counter_lo=int(lo_root),
                     notes="1B: S5 site_tile_assign, S6 in_cell_jitter")


__all__ = [
    "run", "run_rng_anchor", "verify_1a", "require_receipt", "verified_receipt_exists", "read_catalogue",
    "receipt_path", "bundle_dir_1a", "partition_files", "file_digests", "token_mismatches", "load_iso_codes",
]


def load_iso_codes(path: str | Path) -> set[str]:
    """``country_iso`` column of the ISO table (parquet or csv)."""
    p = Path(path)
    if not p.exists():
        raise InputError("E_REFERENCE_SURFACE_MISSING", "ISO table not found", path=p)
    if p.suffix.lower() == ".csv":
        import pyarrow.csv as pcsv

        t = pcsv.read_csv(p, convert_options=pcsv.ConvertOptions(
            column_types={"country_iso": pa.string()}, strings_can_be_null=False, include_columns=["country_iso"]))
    else:
        t = publish.read_parquet_file(p, columns=["country_iso"])
    return {str(v) for v in t.column("country_iso").to_pylist() if v is not None}
