"""Archival audit of a finished run, from the stored files alone (runbook "Operate, audit, report").

    python -m engine.cli.audit --data-root DIR --fingerprint FP [--seed N] [--recompute] [--scratch DIR]

:func:`audit` takes a data root and one ``manifest_fingerprint`` -- the 1A or the 1B one -- and answers
"are these stored outputs exactly what the sealed inputs and the validators said they were?". Every check
becomes one ``{"check", "passed", "detail", "file"}`` entry of the verdict; ``file`` names the file the check
is about (relative to the data root when it lies under it), so a failure points at what changed.

Locating the run (every path through the dataset dictionaries, ``engine.core.dictionary``):

* ``FP`` is a 1A fingerprint when ``validation_bundle_1A`` has a ``fingerprint=FP`` partition, a 1B one when
  ``s0_gate_receipt_1B`` has; the seed is the only ``seed=`` partition under it unless ``--seed`` is given.
* 1A ``parameter_hash`` comes from the 1A S0 receipt (fingerprint-scoped), ``run_id`` is recomputed
  (decision 15) and both are cross-checked against the bundle's ``MANIFEST.json``.
* The 1B run is found through its S0 gate receipt, which records the 1A identities it verified
  (``upstream_1A``); given a 1B fingerprint, that record names the 1A run.
* The run configuration (``run_config_1A``, an ops record under ``logs/``) gives the file paths of the sealed
  inputs. Without it the inputs cannot be re-hashed (reported, not failed: ``logs/`` is not the product).

Checks, per segment ``S`` in (1A, 1B):

``S.bundle``             :func:`engine.core.bundle.verify_bundle` (index hygiene, flag format, flag digest).
``S.recorded_identities`` every record of the run's identities agrees: path tokens, bundle ``MANIFEST.json``,
                         S0 receipts, ``run_id`` = decision-15 function of (fingerprint, parameter_hash, seed).
``S.dataset_file``       one entry per dataset file the bundle lists (1A ``egress_checksums.json`` ->
                         ``outlet_catalogue``; 1B ``egress_checksums.json`` -> ``site_locations`` and
                         ``MANIFEST.json`` -> ``s7_site_synthesis``): re-hashed, sha256 and size compared; a file
                         in the partition that the bundle does not list fails too.
``S.dataset_composite``  the composite digest (concatenated bytes in path order) recorded beside them.
``S.sealed_records``     ``parameter_hash`` and ``manifest_fingerprint`` recomputed with the pure functions of
                         :mod:`engine.core.identities` from the sealed-input records (names + sha256) and the
                         recorded code digest (decision 3) equal the path tokens; the 1A records equal the
                         flag-covered copies in the bundle (``fingerprint_artifacts.jsonl``).
``S.sealed_input``       one entry per sealed input file: re-hashed from the run config's path, compared with
                         the sealed sha256 (a swapped file fails, naming it); the synthetic options entry is
                         recomputed from the configured options.
``S.identities_from_inputs`` the identities recomputed from the re-hashed bytes (1B: also ``grid_hash`` and
                         ``weights_hash`` from the raster header and polygon bytes, decision 13).
``1B.gate_receipt``      the 1B S0 receipt names exactly this 1A run and the 1A flag digest just verified; the
                         1A bundle and datasets 1B sealed (``outlet_catalogue``, ``s3_candidate_set``) still hash
                         to the sealed digests.
``S.rng_accounting``     :func:`engine.core.rnglog.reconcile` (events vs trace vs audit, budgets, counter
                         chains) over the run's RNG logs.
``recompute``            (``--recompute``) the workflow re-run from the stored run config into a scratch root
                         (:func:`engine.cli._common.run_snakemake`, the same code path as ``snakemake``); every
                         file under ``data/`` of the run's partitions compared byte for byte, one
                         ``recompute.file`` entry per differing, missing or unexpected file.

The engine code of the run is identified by its recorded code digest; identities are re-derived with that
digest, so an audit by a later checkout still verifies the sealed inputs. The verdict reports whether the
current checkout has the same digest (``code``); a recompute needs it to (otherwise the outputs would land
under another fingerprint) and fails up front, saying so, when it does not.

The audit writes nothing under the audited data root (identity hashing runs without the on-disk cache).
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from engine.core import bundle as bundle_mod
from engine.core import dictionary, identities
from engine.core.context import SegmentIds
from engine.core.errors import EngineError, GateError

REPO = Path(__file__).resolve().parents[1]
_HEX64 = re.compile(r"[0-9a-f]{64}")
SEGMENTS = ("1A", "1B")


class AuditError(EngineError):
    """The audit cannot start: no such run, or an ambiguous selection (``E_AUDIT_*``)."""


# ====================================================================== small helpers
@dataclass
class Check:
    check: str
    passed: bool
    detail: str
    file: str | None = None

    def as_dict(self) -> dict:
        return {"check": self.check, "passed": bool(self.passed), "detail": self.detail, "file": self.file}


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def composite_sha256(paths: Iterable[Path]) -> str:
    """SHA-256 of the concatenated bytes of ``paths`` in the given order (the bundles' composite digests)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def partition_files(d: Path) -> list[Path]:
    """Data files of a partition: regular files, recursively, no name part starting with ``_`` or ``.``
    (00-core 2.2), in ASCII order of the relative path."""
    if not d.is_dir():
        return []
    out = [p for p in d.rglob("*")
           if p.is_file() and not any(part.startswith(("_", ".")) for part in p.relative_to(d).parts)]
    return sorted(out, key=lambda q: q.relative_to(d).as_posix().encode("utf-8", "backslashreplace"))


def read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is absent or not JSON."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict] | None:
    try:
        return [json.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


def glob_partitions(data_root: Path, D: dictionary.Dictionary, dataset_id: str, **fixed: Any) -> list[tuple[Path, dict]]:
    """Existing partitions of ``dataset_id`` under ``data_root`` with the given tokens fixed: ``(path, tokens)``.

    The glob is made from the dictionary template (never written here); a match is kept only when the
    dictionary renders exactly its path back from its parsed tokens."""
    pattern = re.sub(r"\{[^{}]+\}", "*", D.wildcard_template(dataset_id, **fixed))
    out = []
    for p in sorted(data_root.glob(pattern)):
        rel = p.relative_to(data_root).as_posix()
        toks = dictionary.parse_tokens(rel)
        try:
            if D.path(dataset_id, **toks) != rel.rstrip("/"):
                continue
        except EngineError:
            continue
        out.append((p, toks))
    return out


def _ids_from(rec: Mapping, segment: str) -> SegmentIds | None:
    try:
        return SegmentIds(segment, int(rec["seed"]), str(rec["parameter_hash"]), str(rec["manifest_fingerprint"]),
                          str(rec["run_id"]))
    except (KeyError, TypeError, ValueError):
        return None


def _config_doc(doc: Any) -> dict | None:
    """A stored config is the config itself or ``{"config": ...}``."""
    if not isinstance(doc, dict):
        return None
    if "segment1a" in doc:
        return doc
    inner = doc.get("config")
    return inner if isinstance(inner, dict) and "segment1a" in inner else None


# ====================================================================== locating the run
@dataclass
class Run:
    """The run under audit, as found from the stored files."""

    data_root: Path
    seed: int
    given: str  # segment of the fingerprint the user passed
    ids_1a: SegmentIds | None
    ids_1b: SegmentIds | None
    receipt_1b: dict | None
    config: dict | None
    config_path: Path | None
    D1A: dictionary.Dictionary
    D1B: dictionary.Dictionary
    notes: list[str] = field(default_factory=list)


def locate(data_root: str | Path, fingerprint: str, seed: int | None = None,
           segments: Iterable[str] = SEGMENTS) -> Run:
    """Find the run of ``fingerprint`` (1A or 1B) under ``data_root``; raises :class:`AuditError`
    (``E_AUDIT_ARGS``, ``E_AUDIT_RUN_NOT_FOUND``, ``E_AUDIT_SEED_AMBIGUOUS``, ``E_AUDIT_1B_AMBIGUOUS``)."""
    root = Path(data_root).resolve()
    segments = tuple(segments)
    fp = str(fingerprint).strip().lower()
    if not _HEX64.fullmatch(fp):
        raise AuditError("E_AUDIT_ARGS", f"--fingerprint must be 64 hex digits: {fingerprint!r}")
    if not root.is_dir():
        raise AuditError("E_AUDIT_RUN_NOT_FOUND", "data root not found", path=root)
    D1A = dictionary.load("1A")
    D1B = dictionary.load("1B")
    fixed = {"manifest_fingerprint": fp}
    if seed is not None:
        fixed["seed"] = seed
    as_1a = glob_partitions(root, D1A, "validation_bundle_1A", **fixed)
    as_1b = glob_partitions(root, D1B, "s0_gate_receipt_1B", **fixed)
    if as_1a:
        given, found = "1A", as_1a
    elif as_1b:
        given, found = "1B", as_1b
    else:
        raise AuditError("E_AUDIT_RUN_NOT_FOUND",
                         f"no 1A validation bundle and no 1B gate receipt under fingerprint={fp}"
                         + ("" if seed is None else f" seed={seed}"), path=root)
    seeds = sorted({int(t["seed"]) for _, t in found})
    if len(seeds) > 1:
        raise AuditError("E_AUDIT_SEED_AMBIGUOUS", f"several seeds under fingerprint={fp}: pass --seed",
                         rows=[str(s) for s in seeds])
    seed = seeds[0]
    notes: list[str] = []
    receipt_1b = None
    ids_1b = None
    if given == "1B":
        receipt_1b = read_json(root / D1B.file("s0_gate_receipt_1B", seed=seed, manifest_fingerprint=fp))
        if not isinstance(receipt_1b, dict):
            raise AuditError("E_AUDIT_RUN_NOT_FOUND", "the 1B gate receipt is unreadable",
                             path=root / D1B.file("s0_gate_receipt_1B", seed=seed, manifest_fingerprint=fp))
        ids_1b = _ids_from(receipt_1b, "1B")
        ids_1a = _ids_from(receipt_1b.get("upstream_1A") or {}, "1A")
        if ids_1b is None or ids_1a is None:
            raise AuditError("E_AUDIT_RUN_NOT_FOUND", "the 1B gate receipt does not record the 1B and 1A identities",
                             path=root / D1B.file("s0_gate_receipt_1B", seed=seed, manifest_fingerprint=fp))
    else:
        ids_1a = _ids_1a_from_store(root, D1A, fp, seed)
    cfg_path = root / D1A.path("run_config_1A", **ids_1a.tokens())
    cfg = _config_doc(read_json(cfg_path))
    if cfg is not None:
        try:
            from engine.core import config as engine_config

            cfg = engine_config.resolve(cfg)
        except EngineError as e:  # keep the stored text; its paths are absolute already
            notes.append(f"stored run config does not validate ({e.code}); used as stored")
        D1B = dictionary.load("1B", cfg)
    else:
        notes.append(f"no run config record at {cfg_path.relative_to(root).as_posix()}: sealed input files "
                     "cannot be located (identities checked against the sealed records only)")
    if given == "1A" and "1B" in segments:
        cands = []
        for p, _t in glob_partitions(root, D1B, "s0_gate_receipt_1B", seed=seed):
            rec = read_json(p / D1B.entry("s0_gate_receipt_1B").files[0])
            up = (rec or {}).get("upstream_1A") or {}
            if up.get("manifest_fingerprint") == fp and str(up.get("seed")) == str(seed):
                cands.append(rec)
        if len(cands) > 1:
            raise AuditError("E_AUDIT_1B_AMBIGUOUS", "several 1B runs consumed this 1A run: pass the 1B fingerprint "
                             "of the one to audit", rows=sorted(str(c.get("manifest_fingerprint")) for c in cands))
        if cands:
            receipt_1b = cands[0]
            ids_1b = _ids_from(receipt_1b, "1B")
    return Run(root, seed, given, ids_1a, ids_1b, receipt_1b, cfg, cfg_path if cfg is not None else None,
               D1A, D1B, notes)


def _ids_1a_from_store(root: Path, D1A: dictionary.Dictionary, fp: str, seed: int) -> SegmentIds:
    """1A identities: parameter_hash from the S0 receipt (else the bundle MANIFEST), run_id by decision 15."""
    ph = None
    rec = read_json(root / D1A.file("s0_gate_receipt_1A", manifest_fingerprint=fp))
    if isinstance(rec, dict):
        ph = rec.get("parameter_hash")
    if not ph:
        man = read_json(root / D1A.path("validation_bundle_1A", seed=seed, manifest_fingerprint=fp) / "MANIFEST.json")
        ph = (man or {}).get("parameter_hash") if isinstance(man, dict) else None
    if not isinstance(ph, str) or not _HEX64.fullmatch(ph):
        raise AuditError("E_AUDIT_RUN_NOT_FOUND", "the 1A parameter_hash is recorded neither in the S0 receipt nor "
                         "in the bundle MANIFEST.json", path=root / D1A.path("validation_bundle_1A", seed=seed,
                                                                              manifest_fingerprint=fp))
    return SegmentIds("1A", seed, ph, fp, identities.run_id("1A", fp, ph, seed))


# ====================================================================== the audit
class Auditor:
    """Runs the checks of one located run and collects the verdict entries."""

    def __init__(self, run: Run):
        self.run = run
        self.root = run.data_root
        self.checks: list[Check] = []
        self.skipped: list[str] = []
        self.flag_digest: dict[str, str | None] = {}
        self.code_recorded: dict[str, str | None] = {}

    # ------------------------------------------------------------------ plumbing
    def rel(self, p: Path | str | None) -> str | None:
        if p is None:
            return None
        p = Path(p)
        try:
            return p.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    def add(self, check: str, passed: bool, detail: str, file: Path | str | None = None) -> Check:
        c = Check(check, bool(passed), detail, self.rel(file) if isinstance(file, Path) else file)
        self.checks.append(c)
        return c

    def path(self, segment: str, dataset_id: str, ids: SegmentIds, **extra: Any) -> Path:
        D = self.run.D1A if segment == "1A" else self.run.D1B
        return self.root / D.path(dataset_id, **{**ids.tokens(), **extra})

    def config_path_of(self, segment: str, name: str) -> Path | None:
        """Where the run config keeps sealed input ``name`` (1B also seals 1A's iso_table)."""
        cfg = self.run.config
        if not cfg:
            return None
        sections = [("segment1a", "inputs"), ("segment1a", "parameters")] if segment == "1A" else \
            [("segment1b", "inputs"), ("segment1b", "parameters"), ("segment1a", "inputs")]
        for seg, sec in sections:
            v = ((cfg.get(seg) or {}).get(sec) or {}).get(name)
            if v:
                return Path(str(v))
        return None

    # ------------------------------------------------------------------ bundles
    def check_bundle(self, segment: str, bdir: Path) -> str | None:
        name = f"{segment}.bundle"
        try:
            digest = bundle_mod.verify_bundle(bdir)
        except GateError as e:
            where = {"E_PASS_MISSING": bdir / bundle_mod.FLAG, "E_FLAG_FORMAT_INVALID": bdir / bundle_mod.FLAG,
                     "E_FLAG_HASH_MISMATCH": bdir / bundle_mod.FLAG, "E_INDEX_MISSING": bdir / bundle_mod.INDEX,
                     "E_INDEX_INVALID": bdir / bundle_mod.INDEX}.get(e.code, bdir)
            extra = "; ".join(str(r) for r in e.rows[:3])
            self.add(name, False, f"{e.code}: {e.message}" + (f" ({extra})" if extra else ""), where)
            self.flag_digest[segment] = None
            return None
        self.add(name, True, f"index.json lists every bundle file; _passed.flag holds their digest {digest}",
                 bdir / bundle_mod.FLAG)
        self.flag_digest[segment] = digest
        return digest

    # ------------------------------------------------------------------ dataset files listed by a bundle
    def check_listed_files(self, segment: str, dataset_id: str, part_dir: Path, listed: list[tuple[Path, str, int | None]],
                           composite: str | None, source: str) -> None:
        """Re-hash every file ``source`` lists for ``dataset_id``; files of the partition it does not list fail."""
        name = f"{segment}.dataset_file"
        if not listed:
            self.add(name, False, f"{source} lists no {dataset_id} file", part_dir)
            return
        for p, sha, size in sorted(listed, key=lambda t: t[0].as_posix().encode("utf-8")):
            if not p.is_file():
                self.add(name, False, f"{dataset_id}: file listed in {source} is missing", p)
                continue
            got, n = sha256_file(p)
            if got != sha or (size is not None and n != size):
                self.add(name, False, f"{dataset_id}: bytes differ from {source} (sha256 {got}, {n} bytes; "
                         f"recorded {sha}" + ("" if size is None else f", {size} bytes") + ")", p)
            else:
                self.add(name, True, f"{dataset_id}: sha256 {got} as recorded in {source}", p)
        want = {p.resolve() for p, _, _ in listed}
        for p in partition_files(part_dir):
            if p.resolve() not in want:
                self.add(name, False, f"{dataset_id}: file in the partition is not covered by {source}", p)
        if composite is not None:
            paths = [p for p, _, _ in sorted(listed, key=lambda t: t[0].as_posix().encode("utf-8"))]
            if all(p.is_file() for p in paths):
                got = composite_sha256(paths)
                self.add(f"{segment}.dataset_composite", got == composite,
                         f"{dataset_id}: composite sha256 {got}" + ("" if got == composite else
                                                                     f" != recorded {composite}") + f" ({source})",
                         part_dir)

    # ------------------------------------------------------------------ identities from sealed records
    def _identity_compare(self, got: dict, want: dict) -> list[str]:
        return [f"{k}: recomputed {got[k]} != recorded {want[k]}" for k in sorted(want) if got.get(k) != want[k]]

    def check_sealed_inputs(self, segment: str, ids: SegmentIds, records: list[dict] | None, code_hex: str | None,
                            input_names: set[str] | None, options_digest: tuple[str, bytes] | None,
                            sealed_path: Path) -> None:
        """``S.sealed_records``, ``S.sealed_input`` (per file) and ``S.identities_from_inputs``."""
        if not isinstance(records, list) or not records:
            self.add(f"{segment}.sealed_records", False, "sealed-input list missing or unreadable", sealed_path)
            return
        if not code_hex or not _HEX64.fullmatch(str(code_hex)):
            self.add(f"{segment}.sealed_records", False, "no recorded code digest (S0 receipt / bundle) to re-derive "
                     "manifest_fingerprint with", sealed_path)
            return
        code32 = bytes.fromhex(code_hex)
        opt_name = identities.OPTIONS_1A_NAME if segment == "1A" else identities.OPTIONS_1B_NAME
        # which records enter which identity (identities.resolve_1a / resolve_1b layouts)
        params, arts, files = [], [], []
        for r in records:
            if not isinstance(r, dict):
                continue
            name, kind, sha = str(r.get("asset_id")), r.get("kind"), str(r.get("sha256_hex"))
            if kind in ("parameter", "options"):
                params.append((name, sha))
                arts.append((name, sha))
            elif kind == "identity":
                arts.append((name, sha))
            elif kind == "input":
                if segment == "1A" or input_names is None or name in input_names:
                    arts.append((name, sha))
            if kind in ("parameter", "input"):
                files.append((name, kind, sha, r.get("size_bytes")))

        def ids_of(digests: dict[str, str]) -> dict:
            ph_hex, ph_b = identities.parameter_hash([(n, bytes.fromhex(digests[n])) for n, _ in params])
            fp_hex, _ = identities.manifest_fingerprint([(n, bytes.fromhex(digests[n])) for n, _ in arts], code32, ph_b)
            return {"parameter_hash": ph_hex, "manifest_fingerprint": fp_hex,
                    "run_id": identities.run_id(segment, fp_hex, ph_hex, ids.seed)}

        want = {"parameter_hash": ids.parameter_hash, "manifest_fingerprint": ids.manifest_fingerprint,
                "run_id": ids.run_id}
        recorded = {n: s for n, s in params + arts}
        try:
            got = ids_of(recorded)
        except EngineError as e:
            self.add(f"{segment}.sealed_records", False, f"{e.code}: {e.message}", sealed_path)
            return
        except ValueError as e:  # a digest that is not hex
            self.add(f"{segment}.sealed_records", False, f"a sealed digest is not hex: {e}", sealed_path)
            return
        bad = self._identity_compare(got, want)
        self.add(f"{segment}.sealed_records", not bad,
                 (f"parameter_hash, manifest_fingerprint and run_id recomputed from {len(arts)} sealed records "
                  f"(code digest {code_hex}) equal the run's path tokens") if not bad else "; ".join(bad), sealed_path)

        # per file: the configured path's bytes vs the sealed digest
        current = dict(recorded)
        swapped: list[str] = []
        absent = 0
        for name, kind, sha, size in sorted(files):
            p = self.config_path_of(segment, name)
            if p is None:
                absent += 1
                self.skipped.append(f"{segment} sealed {kind} {name}: no path (run config record absent)")
                continue
            if not p.is_file():
                absent += 1
                self.skipped.append(f"{segment} sealed {kind} {name}: {p} is absent; not re-hashed")
                continue
            got_sha, n = sha256_file(p)
            if got_sha != sha:
                swapped.append(str(p))
                if name in current:
                    current[name] = got_sha
                self.add(f"{segment}.sealed_input", False, f"{kind} {name}: file bytes changed since the run "
                         f"(sha256 {got_sha}, {n} bytes; sealed {sha}, {size} bytes)", str(p))
            else:
                self.add(f"{segment}.sealed_input", True, f"{kind} {name}: sha256 {got_sha} as sealed", str(p))
        if options_digest is not None:
            src, raw = options_digest
            got_sha = hashlib.sha256(raw).hexdigest()
            ok = recorded.get(opt_name) == got_sha
            if not ok and opt_name in current:
                current[opt_name] = got_sha
            self.add(f"{segment}.sealed_input", ok, f"options {opt_name} = {raw.decode('ascii')} from {src}: sha256 "
                     f"{got_sha}" + ("" if ok else f" != sealed {recorded.get(opt_name)}"), None)
        # identities from the bytes as they are now
        try:
            now = ids_of(current)
        except (EngineError, ValueError) as e:
            self.add(f"{segment}.identities_from_inputs", False, f"{e.code}: {e.message}", None)
            return
        bad = self._identity_compare(now, want)
        scope = "the re-hashed input files" + (f" ({absent} absent: sealed digests used)" if absent else "")
        if bad:
            self.add(f"{segment}.identities_from_inputs", False,
                     f"identities recomputed from {scope} differ: " + "; ".join(bad)
                     + (f"; changed file(s): {', '.join(swapped)}" if swapped else ""),
                     swapped[0] if swapped else None)
        else:
            self.add(f"{segment}.identities_from_inputs", True,
                     f"parameter_hash {now['parameter_hash']} and manifest_fingerprint {now['manifest_fingerprint']} "
                     f"recomputed from {scope}", None)

    # ------------------------------------------------------------------ RNG
    def check_rng(self, segment: str, ids: SegmentIds) -> None:
        from engine.core import rnglog

        name = f"{segment}.rng_accounting"
        try:
            fails = rnglog.reconcile(self.root, ids, chain=True, config=self.run.config, source="jsonl")
        except EngineError as e:
            self.add(name, False, f"{e.code}: {e.message}", e.path)
            return
        except Exception as e:  # noqa: BLE001 - an unreadable log is a finding, not a crash
            self.add(name, False, f"RNG logs unreadable: {type(e).__name__}: {e}",
                     rnglog.trace_path(self.root, ids, self.run.config))
            return
        trace = rnglog.trace_path(self.root, ids, self.run.config)
        if not fails:
            self.add(name, True, "rnglog.reconcile: events, trace and audit rows agree (counters, blocks, draws, "
                     "budgets, substream chains)", trace)
            return
        codes = sorted({str(f.get("code")) for f in fails})
        first = fails[0]
        self.add(name, False, f"rnglog.reconcile: {len(fails)} finding(s), codes {', '.join(codes)}; first: "
                 f"{first.get('family')} {first.get('module')}/{first.get('substream_label')}: {first.get('detail')}",
                 first.get("path") or trace)

    # ------------------------------------------------------------------ 1A
    def audit_1a(self) -> None:
        ids = self.run.ids_1a
        bdir = self.path("1A", "validation_bundle_1A", ids)
        self.check_bundle("1A", bdir)
        man = read_json(bdir / "MANIFEST.json")
        fres = read_json(bdir / "manifest_fingerprint_resolved.json")
        receipt_path = self.root / self.run.D1A.file("s0_gate_receipt_1A", **ids.tokens())
        receipt = read_json(receipt_path)
        code = (fres or {}).get("code_digest") if isinstance(fres, dict) else None
        code_s0 = receipt.get("code_digest") if isinstance(receipt, dict) else None
        self.code_recorded["1A"] = code or code_s0

        # recorded identities agree
        probs = []
        want = {"seed": ids.seed, "parameter_hash": ids.parameter_hash, "manifest_fingerprint": ids.manifest_fingerprint,
                "run_id": ids.run_id}
        for src, doc, keys in (("bundle MANIFEST.json", man, ("seed", "parameter_hash", "manifest_fingerprint", "run_id")),
                               ("bundle manifest_fingerprint_resolved.json", fres, ("manifest_fingerprint", "parameter_hash")),
                               ("S0 receipt", receipt, ("manifest_fingerprint", "parameter_hash"))):
            if not isinstance(doc, dict):
                probs.append(f"{src} missing or unreadable")
                continue
            probs += [f"{src} {k}={doc.get(k)!r} != {want[k]!r}" for k in keys if str(doc.get(k)) != str(want[k])]
        if code and code_s0 and code != code_s0:
            probs.append(f"code digest: bundle {code} != S0 receipt {code_s0}")
        if not rnglog_audit_exists(self.root, ids, self.run.config):
            probs.append("no RNG audit log under this run_id")
        self.add("1A.recorded_identities", not probs,
                 "; ".join(probs) if probs else f"seed {ids.seed}, parameter_hash {ids.parameter_hash}, run_id "
                 f"{ids.run_id} (decision 15) agree across path tokens, bundle and S0 receipt", bdir / "MANIFEST.json")

        # dataset files listed by the bundle
        ck = read_json(bdir / "egress_checksums.json")
        cat_dir = self.path("1A", "outlet_catalogue", ids)
        if not isinstance(ck, dict) or not isinstance(ck.get("files"), list):
            self.add("1A.dataset_file", False, "egress_checksums.json missing or unreadable", bdir / "egress_checksums.json")
        else:
            if str(ck.get("seed")) != str(ids.seed) or ck.get("manifest_fingerprint") != ids.manifest_fingerprint:
                self.add("1A.dataset_file", False, f"egress_checksums.json is for seed {ck.get('seed')} fingerprint "
                         f"{ck.get('manifest_fingerprint')}", bdir / "egress_checksums.json")
            listed = [(self.root / str(f.get("path")), str(f.get("sha256_hex")), f.get("size_bytes"))
                      for f in ck["files"] if isinstance(f, dict)]
            self.check_listed_files("1A", "outlet_catalogue", cat_dir, listed, ck.get("composite_sha256_hex"),
                                    "1A egress_checksums.json")

        # sealed inputs
        sealed_path = self.root / self.run.D1A.file("sealed_inputs_1A", **ids.tokens())
        records = read_json(sealed_path)
        arts_bundle = read_jsonl(bdir / "fingerprint_artifacts.jsonl")
        if isinstance(records, list) and arts_bundle is not None:
            a = sorted((str(r.get("asset_id")), str(r.get("sha256_hex"))) for r in records if isinstance(r, dict))
            b = sorted((str(r.get("path")), str(r.get("sha256"))) for r in arts_bundle)
            if a != b:
                self.add("1A.sealed_records", False, "sealed_inputs_1A differs from the flag-covered "
                         f"fingerprint_artifacts.jsonl of the bundle: {sorted(set(a) ^ set(b))[:4]}", sealed_path)
        opt = None
        if self.run.config:
            try:
                o = identities.normalise_options_1a((self.run.config.get("segment1a") or {}).get("options"))
                opt = ("run config segment1a.options", identities.canonical_json_bytes(o))
            except EngineError as e:
                self.add("1A.sealed_input", False, f"run config options invalid: {e.code}: {e.message}",
                         self.rel(self.run.config_path))
        self.check_sealed_inputs("1A", ids, records, self.code_recorded["1A"], None, opt, sealed_path)
        self.check_rng("1A", ids)

    # ------------------------------------------------------------------ 1B
    def audit_1b(self) -> None:
        ids, ids_1a, rec = self.run.ids_1b, self.run.ids_1a, self.run.receipt_1b or {}
        toks_1b = {**ids.tokens(), "grid_hash": rec.get("grid_hash"), "weights_hash": rec.get("weights_hash")}
        receipt_path = self.root / self.run.D1B.file("s0_gate_receipt_1B", **ids.tokens())
        bdir = self.path("1B", "validation_bundle_1B", ids)
        self.check_bundle("1B", bdir)
        man = read_json(bdir / "MANIFEST.json")
        fres = read_json(bdir / "manifest_fingerprint_resolved.json")
        pres = read_json(bdir / "parameter_hash_resolved.json")
        code = (fres or {}).get("code_digest") if isinstance(fres, dict) else None
        self.code_recorded["1B"] = code or rec.get("code_digest")

        # the gate receipt: this 1A run, the 1A flag just verified
        probs = []
        up = rec.get("upstream_1A") or {}
        want_up = {"seed": ids_1a.seed, "parameter_hash": ids_1a.parameter_hash,
                   "manifest_fingerprint": ids_1a.manifest_fingerprint, "run_id": ids_1a.run_id}
        probs += [f"upstream_1A {k}={up.get(k)!r} != {v!r}" for k, v in want_up.items() if str(up.get(k)) != str(v)]
        d1a = self.flag_digest.get("1A")
        if d1a is None:
            d1a = bundle_mod.read_flag(self.path("1A", "validation_bundle_1A", ids_1a)) if \
                (self.path("1A", "validation_bundle_1A", ids_1a) / bundle_mod.FLAG).is_file() else None
        if rec.get("flag_sha256_hex") != d1a:
            probs.append(f"receipt flag_sha256_hex {rec.get('flag_sha256_hex')} != 1A flag digest {d1a}")
        self.add("1B.gate_receipt", not probs, "; ".join(probs) if probs else
                 f"the 1B S0 receipt verified exactly 1A run {ids_1a.run_id} (flag digest {d1a})", receipt_path)

        # recorded identities agree
        probs = []
        want = {"seed": ids.seed, "parameter_hash": ids.parameter_hash, "manifest_fingerprint": ids.manifest_fingerprint,
                "run_id": ids.run_id}
        if ids.run_id != identities.run_id("1B", ids.manifest_fingerprint, ids.parameter_hash, ids.seed):
            probs.append(f"run_id {ids.run_id} is not the decision-15 value of these identities")
        for src, doc, keys in (("bundle MANIFEST.json", man, ("seed", "parameter_hash", "manifest_fingerprint", "run_id")),
                               ("bundle parameter_hash_resolved.json", pres, ("parameter_hash",)),
                               ("bundle manifest_fingerprint_resolved.json", fres, ("manifest_fingerprint",))):
            if not isinstance(doc, dict):
                probs.append(f"{src} missing or unreadable")
                continue
            probs += [f"{src} {k}={doc.get(k)!r} != {want[k]!r}" for k in keys if str(doc.get(k)) != str(want[k])]
        if isinstance(man, dict) and man.get("upstream_1A") is not None and \
                {k: str(v) for k, v in man["upstream_1A"].items()} != {k: str(v) for k, v in want_up.items()}:
            probs.append(f"bundle MANIFEST.json upstream_1A {man.get('upstream_1A')} != {want_up}")
        if isinstance(fres, dict):
            for k in ("grid_hash", "weights_hash"):
                if fres.get(k) != rec.get(k):
                    probs.append(f"{k}: bundle {fres.get(k)} != S0 receipt {rec.get(k)}")
            if rec.get("code_digest") and code and rec.get("code_digest") != code:
                probs.append(f"code digest: bundle {code} != S0 receipt {rec.get('code_digest')}")
        if not rnglog_audit_exists(self.root, ids, self.run.config):
            probs.append("no RNG audit log under this run_id")
        self.add("1B.recorded_identities", not probs, "; ".join(probs) if probs else
                 f"seed {ids.seed}, parameter_hash {ids.parameter_hash}, run_id {ids.run_id} (decision 15) agree "
                 "across path tokens, bundle and S0 receipt", bdir / "MANIFEST.json")

        # dataset files the bundle lists
        ck = read_json(bdir / "egress_checksums.json")
        s8_dir = self.root / self.run.D1B.path("site_locations", **toks_1b)
        if not isinstance(ck, dict) or not isinstance(ck.get("files"), list):
            self.add("1B.dataset_file", False, "egress_checksums.json missing or unreadable", bdir / "egress_checksums.json")
        else:
            part = ck.get("partition") or {}
            if str(part.get("seed")) != str(ids.seed) or part.get("manifest_fingerprint") != ids.manifest_fingerprint:
                self.add("1B.dataset_file", False, f"egress_checksums.json is for partition {part}",
                         bdir / "egress_checksums.json")
            listed = [(s8_dir / str(f.get("path")), str(f.get("sha256_hex")), None) for f in ck["files"]
                      if isinstance(f, dict)]
            self.check_listed_files("1B", "site_locations", s8_dir, listed, ck.get("composite_sha256_hex"),
                                    "1B egress_checksums.json")
        s7 = ((man or {}).get("inputs") or {}).get("s7_site_synthesis") if isinstance(man, dict) else None
        if isinstance(s7, dict) and isinstance(s7.get("files"), list):
            s7_dir = self.root / self.run.D1B.path("s7_site_synthesis", **toks_1b)
            listed = [(s7_dir / str(f.get("path")), str(f.get("sha256_hex")), None) for f in s7["files"]
                      if isinstance(f, dict)]
            self.check_listed_files("1B", "s7_site_synthesis", s7_dir, listed, s7.get("composite_sha256_hex"),
                                    "1B MANIFEST.json")

        # sealed inputs, and the 1A bundle / datasets 1B sealed
        sealed_path = self.root / self.run.D1B.file("sealed_inputs_1B", **ids.tokens())
        records = read_json(sealed_path)
        if isinstance(records, list):
            self._check_sealed_upstream(records, ids_1a, d1a, sealed_path)
        cfg = self.run.config or {}
        names = set(((cfg.get("segment1b") or {}).get("inputs") or {}).keys()) or None
        if names is None:  # no run config: the engine's required 1B inputs (iso_table is sealed but not hashed in)
            names = set(identities.REQUIRED_INPUTS_1B)
        opts = (pres or {}).get("options") if isinstance(pres, dict) else None
        src = "1B bundle parameter_hash_resolved.json"
        if not isinstance(opts, dict) or "basis" not in opts:
            opts, src = ((cfg.get("segment1b") or {}).get("options") or {}), "run config segment1b.options"
        opt = (src, identities.canonical_json_bytes({"basis": opts.get("basis"), "dp": opts.get("dp")})) \
            if opts.get("basis") is not None else None
        self.check_sealed_inputs("1B", ids, records, self.code_recorded["1B"], names, opt, sealed_path)
        self._check_grid(rec, opts)
        self.check_rng("1B", ids)

    def _check_sealed_upstream(self, records: list[dict], ids_1a: SegmentIds, d1a: str | None, sealed_path: Path) -> None:
        for r in records:
            if not isinstance(r, dict):
                continue
            name, kind, sha = str(r.get("asset_id")), r.get("kind"), str(r.get("sha256_hex"))
            if kind == "identity":
                ok = sha == ids_1a.manifest_fingerprint
                self.add("1B.gate_receipt", ok, f"sealed {name} = {sha}" + ("" if ok else
                         f" != 1A manifest_fingerprint {ids_1a.manifest_fingerprint}"), sealed_path)
            elif kind == "bundle":
                ok = d1a is not None and sha == d1a
                self.add("1B.gate_receipt", ok, f"sealed {name}: flag digest {sha}" + ("" if ok else
                         f" != 1A flag digest {d1a}"), self.root / str(r.get("path")))
            elif kind == "dataset":
                d = self.root / str(r.get("path"))
                files = partition_files(d)
                if not files:
                    self.add("1B.gate_receipt", False, f"sealed dataset {name}: partition is empty or missing", d)
                    continue
                got = composite_sha256(files)
                ok = got == sha
                self.add("1B.gate_receipt", ok, f"sealed dataset {name}: directory digest {got}"
                         + ("" if ok else f" != sealed {sha}"), d)

    def _check_grid(self, rec: dict, opts: Mapping) -> None:
        """grid_hash / weights_hash from the raster header and the polygon / raster bytes (decision 13)."""
        raster = self.config_path_of("1B", "population_raster")
        polys = self.config_path_of("1B", "world_countries")
        if raster is None or polys is None or not raster.is_file() or not polys.is_file():
            self.skipped.append("1B grid_hash / weights_hash: raster or polygons not available; not recomputed")
            return
        try:
            g = identities.read_grid_definition(raster)
            r_sha = bytes.fromhex(sha256_file(raster)[0])
            g_hex, g_b = identities.grid_hash(g["width"], g["height"], g["transform"], g["crs_wkt"],
                                              bytes.fromhex(sha256_file(polys)[0]))
            basis, dp = opts.get("basis"), opts.get("dp")
            w_hex, _ = identities.weights_hash(g_b, basis, int(dp), r_sha if basis == "population" else None)
        except (EngineError, TypeError, ValueError) as e:
            self.add("1B.identities_from_inputs", False, f"grid/weights hash cannot be recomputed: {e}", str(raster))
            return
        bad = [f"{k}: recomputed {v} != recorded {rec.get(k)}" for k, v in (("grid_hash", g_hex), ("weights_hash", w_hex))
               if rec.get(k) != v]
        self.add("1B.identities_from_inputs", not bad, "; ".join(bad) if bad else
                 f"grid_hash {g_hex} and weights_hash {w_hex} recomputed from the raster header and bytes",
                 str(raster) if bad else None)

    # ------------------------------------------------------------------ recompute
    def recompute(self, scratch: str | Path | None = None, cores: int = 2, quiet: bool = False) -> None:
        from engine.cli._common import run_snakemake
        from engine.core import config as engine_config

        run = self.run
        if not run.config:
            self.add("recompute", False, "no run config record: the workflow cannot be re-run", None)
            return
        cfg = json.loads(json.dumps(run.config))
        cfg["seed"] = run.seed
        if run.ids_1b is not None:  # the 1B options the run used (a CLI --basis/--dp is not in the 1A record)
            pres = read_json(self.path("1B", "validation_bundle_1B", run.ids_1b) / "parameter_hash_resolved.json")
            o = (pres or {}).get("options") if isinstance(pres, dict) else None
            if isinstance(o, dict) and o.get("basis") is not None:
                cfg.setdefault("segment1b", {}).setdefault("options", {}).update(basis=o["basis"], dp=o["dp"])
        try:
            cfg = engine_config.resolve(cfg)
            r1a = identities.resolve_1a(cfg, REPO, None)
            r1b = identities.resolve_1b(cfg, REPO, r1a, None) if run.ids_1b is not None else None
        except EngineError as e:
            self.add("recompute", False, f"the stored run config does not resolve: {e.code}: {e.message}", e.path)
            return
        code_now = r1a.code_digest_hex
        mism = []
        if (r1a.parameter_hash, r1a.manifest_fingerprint) != (run.ids_1a.parameter_hash, run.ids_1a.manifest_fingerprint):
            mism.append(f"1A resolves to parameter_hash {r1a.parameter_hash} fingerprint {r1a.manifest_fingerprint}")
        if r1b is not None and (r1b.parameter_hash, r1b.manifest_fingerprint) != (
                run.ids_1b.parameter_hash, run.ids_1b.manifest_fingerprint):
            mism.append(f"1B resolves to parameter_hash {r1b.parameter_hash} fingerprint {r1b.manifest_fingerprint}")
        if mism:
            why = (f"the engine code changed since the run (recorded code digest {self.code_recorded.get('1A')}, "
                   f"this checkout {code_now}): check out the run's code to recompute"
                   if self.code_recorded.get("1A") not in (None, code_now) else
                   "the sealed input files changed since the run")
            self.add("recompute", False, f"cannot reproduce the run's paths: {'; '.join(mism)} ({why})", None)
            return
        own = scratch is None
        sroot = Path(tempfile.mkdtemp(prefix="engine-audit-")) if own else Path(scratch).resolve()
        try:
            if sroot == self.root or self.root in sroot.parents:
                self.add("recompute", False, "--scratch must lie outside the audited data root", str(sroot))
                return
            if (sroot / "data").exists() and any((sroot / "data").iterdir()):
                self.add("recompute", False, "--scratch already holds data/: give an empty directory", str(sroot))
                return
            ids_1a, ids_1b = run.ids_1a, run.ids_1b
            targets = [run.D1A.path("outlet_catalogue", **ids_1a.tokens()),
                       run.D1A.path("validation_bundle_1A", **ids_1a.tokens()) + "/" + bundle_mod.FLAG]
            if ids_1b is not None:
                targets += [run.D1B.path("site_locations", **ids_1b.tokens()),
                            run.D1B.path("validation_bundle_1B", **ids_1b.tokens()) + "/" + bundle_mod.FLAG]
            rc = run_snakemake(sroot, cfg, targets, cores, quiet=quiet)
            allowed = {"seed": {str(run.seed)},
                       "parameter_hash": {ids_1a.parameter_hash} | ({ids_1b.parameter_hash} if ids_1b else set()),
                       "manifest_fingerprint": {ids_1a.manifest_fingerprint}
                       | ({ids_1b.manifest_fingerprint} if ids_1b else set()),
                       "run_id": {ids_1a.run_id} | ({ids_1b.run_id} if ids_1b else set())}
            if ids_1b is not None:
                allowed["grid_hash"] = {r1b.grid_hash}
                allowed["weights_hash"] = {r1b.weights_hash}
            self.compare_trees(sroot, allowed, rc)
        finally:
            if own:
                shutil.rmtree(sroot, ignore_errors=True)

    def compare_trees(self, sroot: Path, allowed: Mapping[str, set[str]], rc: int) -> None:
        """Every ``data/`` file of the run's partitions: audited root vs recomputed root, byte for byte."""
        def files(root: Path) -> dict[str, Path]:
            out = {}
            base = root / "data"
            if not base.is_dir():
                return out
            for p in sorted(base.rglob("*")):
                if not p.is_file():
                    continue
                rel = p.relative_to(root).as_posix()
                toks = dictionary.parse_tokens(rel)
                # a partition of this run: every identity token it carries is one of the run's values
                if all(k in allowed and v in allowed[k] for k, v in toks.items()):
                    out[rel] = p
            return out

        a, b = files(self.root), files(sroot)
        diffs = identical = 0
        for rel in sorted(set(a) | set(b)):
            if rel not in b:
                self.add("recompute.file", False, "present in the audited root but not reproduced by the recompute", rel)
            elif rel not in a:
                self.add("recompute.file", False, "reproduced by the recompute but missing from the audited root", rel)
            elif not filecmp.cmp(a[rel], b[rel], shallow=False):
                self.add("recompute.file", False, "bytes differ from the recomputed file", rel)
            else:
                identical += 1
                continue
            diffs += 1
        ok = rc == 0 and diffs == 0 and bool(b)
        detail = (f"workflow re-run into {sroot} (exit {rc}); {len(b)} files under data/ recomputed: {identical} "
                  f"byte-identical to the audited root, {diffs} differing, missing or unexpected")
        self.add("recompute", ok, detail, None)


def rnglog_audit_exists(root: Path, ids: SegmentIds, config: Mapping | None) -> bool:
    from engine.core import rnglog

    try:
        return rnglog.audit_path(root, ids, config).is_file()
    except EngineError:
        return False


# ====================================================================== entry point
def audit(data_root: str | Path, fingerprint: str, seed: int | None = None, recompute: bool = False,
          scratch: str | Path | None = None, cores: int = 2, segments: Iterable[str] = SEGMENTS,
          quiet: bool = False) -> dict:
    """Audit one run; returns the verdict ``{"passed", "checks", "run", "code", "skipped", "notes"}``.

    Raises :class:`AuditError` when the run cannot be located (see :func:`locate`)."""
    segments = tuple(segments)
    run = locate(data_root, fingerprint, seed, segments)
    a = Auditor(run)
    if "1A" in segments:
        a.audit_1a()
    if "1B" in segments:
        if run.ids_1b is None:
            a.add("1B.locate", False, "no 1B S0 gate receipt names this 1A run (audit 1A alone with --segment 1A)",
                  None)
        else:
            if "1A" not in segments:  # the 1A flag digest the 1B receipt must name
                try:
                    a.flag_digest["1A"] = bundle_mod.verify_bundle(a.path("1A", "validation_bundle_1A", run.ids_1a))
                except GateError:
                    a.flag_digest["1A"] = None
            a.audit_1b()
    if recompute:
        a.recompute(scratch, cores, quiet)
    try:
        current = identities.code_digest(REPO).hex()
    except EngineError:  # pragma: no cover
        current = None
    recorded = {k: v for k, v in a.code_recorded.items()}
    return {
        "passed": bool(a.checks) and all(c.passed for c in a.checks),
        "checks": [c.as_dict() for c in a.checks],
        "run": {
            "data_root": str(run.data_root),
            "fingerprint_given": str(fingerprint),
            "fingerprint_segment": run.given,
            "seed": run.seed,
            "1A": None if run.ids_1a is None else _ids_dict(run.ids_1a),
            "1B": None if run.ids_1b is None else _ids_dict(run.ids_1b),
            "run_config": None if run.config_path is None else a.rel(run.config_path),
        },
        "code": {"recorded": recorded, "current": current,
                 "same": all(v == current for v in recorded.values() if v)},
        "skipped": a.skipped,
        "notes": run.notes,
    }


def _ids_dict(ids: SegmentIds) -> dict:
    return {"seed": ids.seed, "parameter_hash": ids.parameter_hash, "manifest_fingerprint": ids.manifest_fingerprint,
            "run_id": ids.run_id}
