"""Runbook section 3: run segment 1B (S0..S9) on the outputs of a 1A run, and re-validate it.

    python -m engine.cli.segment1b run --data-root runs/local_layer1 \\
        --parameter-hash <1A parameter_hash> --manifest-fingerprint <1A manifest_fingerprint> --seed <seed> \\
        [--dictionary my.1B.yaml] [--basis population|area_m2|uniform] [--dp N] [--skip-s0] [--cores N]

    python -m engine.cli.segment1b validate-s9 --data-root runs/local_layer1 \\
        --parameter-hash <ph> --manifest-fingerprint <fp> --seed <seed> --run-id <1B run_id>

``run`` takes the identities segment1a printed (decision 13), finds the configuration of that 1A run
(``<data_root>/logs/config/1A/fingerprint=<fp>/seed=<seed>/config.json`` when the 1A CLI stored it, else the
default ``config.yaml``), checks that it resolves to exactly these identities (``E_IDENTITY_MISMATCH``
otherwise), applies the 1B options, and runs the one Snakemake workflow up to the 1B ``_passed.flag``. It prints
a JSON summary (the 1A identities consumed, the 1B identities, the paths of ``site_locations``, the bundle, the
flag and the stage log, row counts, S9 failure codes, ``passed``) and exits non-zero unless S9 passed. It keeps
a record of the resolved 1B run (``logs/config/1B/fingerprint=<fp_1B>/seed=<seed>/segment1b_run.json``; 1B S9
writes it too, so runs made with snakemake directly have one) so ``validate-s9`` can find the run again, even
after an engine code change.

``validate-s9`` re-runs the S9 checks in-process from the stored files (nothing is re-published; an existing
bundle is compared byte for byte) and prints exactly ``{"passed", "failure_codes", "bundle_path", "flag_path",
"stage_log_path"}``. It accepts the 1A identities (as the runbook does) or the 1B identities that ``run`` printed;
``--run-id`` must be the 1B run_id (``E_RUN_ID_MISMATCH`` otherwise). Exit status 0 iff passed.

``--skip-s0`` (runbook: "only with a verified PASS flag") requires a verified 1B S0 receipt for these
identities (``E301_NO_PASS_FLAG`` otherwise); S0 is then left out of the workflow (``--allowed-rules``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from engine.cli._common import REPO, abspath, default_config, print_json, run_snakemake
from engine.core import config as engine_config
from engine.core import identities
from engine.core.context import RunContext, SegmentIds
from engine.core.errors import EngineError, IdentityError, GateError

# Ops records under logs/ (not datasets, never read by a state): where the CLIs keep the resolved configuration
# of a run so a later command can find it from the run's identities.


def _ops_path(segment: str, dataset_id: str, fp: str, seed) -> str:
    """Ops record path from the dictionary; fp/seed may be '*' for a glob."""
    from engine.core import dictionary as _d

    t = _d.load(segment).template(dataset_id)
    return t.replace("{manifest_fingerprint}", str(fp)).replace("{seed}", str(seed))


def CONFIG_1A_path(fp: str, seed) -> str:
    return _ops_path("1A", "run_config_1A", fp, seed)


def RECORD_1B_path(fp: str, seed) -> str:
    return _ops_path("1B", "run_record_1B", fp, seed)
S0_RULE = "s1b_s0_gate"
BASES = ("population", "area_m2", "uniform")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.cli.segment1b", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def ids_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-root", required=True, help="data root (holds data/ and logs/)")
        sp.add_argument("--parameter-hash", required=True)
        sp.add_argument("--manifest-fingerprint", required=True)
        sp.add_argument("--seed", required=True, type=int)
        sp.add_argument("--dictionary", help="1B dataset dictionary YAML (replaces contracts/...1B.yaml)")

    r = sub.add_parser("run", help="run 1B S0..S9 on a 1A run (identities as printed by segment1a)")
    ids_args(r)
    r.add_argument("--basis", choices=BASES, help="S2 mass basis (part of the 1B parameter identity)")
    r.add_argument("--dp", type=int, help="S2 fixed-decimal precision (part of the 1B parameter identity)")
    r.add_argument("--skip-s0", action="store_true", help="do not run S0 (needs a verified S0 receipt)")
    r.add_argument("--cores", type=int, default=2)
    r.add_argument("--dry-run", action="store_true", help="show what would run (snakemake -n)")
    r.add_argument("--verbose", action="store_true",
                   help="show Snakemake's own output as well as the one progress line per state")
    v = sub.add_parser("validate-s9", help="re-run the S9 checks of a 1B run without re-publishing")
    ids_args(v)
    v.add_argument("--run-id", required=True, help="the 1B run_id (printed by `run`)")
    return p


# ====================================================================== identity resolution
def _cache(data_root: Path) -> Path:
    return data_root / ".snakemake" / "identity-cache.json"


def _config_doc(doc: dict) -> dict:
    """A stored config file holds the config itself or ``{"config": ...}``."""
    return doc if "segment1a" in doc else doc.get("config", doc)


def load_1a_config(data_root: Path, fp: str, seed: int) -> tuple[dict, str]:
    """The configuration of the 1A run (stored by the 1A workflow when present, else the default)."""
    p = data_root / CONFIG_1A_path(fp, seed)
    if p.is_file():
        try:
            cfg = _config_doc(json.loads(p.read_text()))
        except ValueError as exc:
            raise EngineError("E_CONFIG_INVALID", f"stored 1A config unreadable: {exc}", path=p) from None
        source = str(p)
    else:
        cfg, source = default_config(), "default config.yaml"
    cfg = dict(cfg)
    cfg["seed"] = seed
    return engine_config.resolve(cfg), source


def resolve_1a_checked(data_root: Path, ph: str, fp: str, seed: int):
    """(config, Resolved1A, source); ``E_IDENTITY_MISMATCH`` unless the config gives exactly these identities."""
    cfg, source = load_1a_config(data_root, fp, seed)
    r1a = identities.resolve_1a(cfg, REPO, _cache(data_root))
    if (r1a.parameter_hash, r1a.manifest_fingerprint) != (ph, fp):
        what = "the default inputs" if source.startswith("default") else f"the inputs recorded in {source}"
        raise IdentityError(
            "E_IDENTITY_MISMATCH",
            f"these identities were not produced by {what} (with this engine code); run segment1a first / pass "
            "the same inputs",
            detail={"given": {"parameter_hash": ph, "manifest_fingerprint": fp, "seed": seed},
                    "resolved": {"parameter_hash": r1a.parameter_hash,
                                 "manifest_fingerprint": r1a.manifest_fingerprint},
                    "config_source": source})
    return cfg, r1a, source


def apply_1b_options(cfg: dict, dictionary: str | None = None, basis: str | None = None, dp: int | None = None,
                     skip_s0: bool = False) -> dict:
    cfg = json.loads(json.dumps(cfg))
    s = cfg.setdefault("segment1b", {})
    opts = s.setdefault("options", {})
    if dictionary:
        p = Path(abspath(dictionary))
        if not p.is_file():
            raise EngineError("E_DICTIONARY_RESOLUTION_FAILED", "--dictionary file not found", path=p)
        s["dictionary"] = str(p)
    if basis:
        opts["basis"] = basis
    if dp is not None:
        opts["dp"] = dp
    if skip_s0:
        opts["skip_s0"] = True
    return engine_config.resolve(cfg)


def make_context(data_root: Path, cfg: dict, r1a_ids: SegmentIds, ids_1b: SegmentIds, extra: dict) -> RunContext:
    return RunContext(data_root, REPO, cfg, ids_1b, ids_1a=r1a_ids, extra=dict(extra))


def write_record(ctx: RunContext) -> Path:
    """Keep the resolved 1B run (config + identities) for validate-s9 (S9 writes the same record)."""
    from engine.segment1b.s9_validation import write_run_record

    return write_run_record(ctx)


def _ids_from(d: dict, segment: str) -> SegmentIds:
    return SegmentIds(segment, int(d["seed"]), d["parameter_hash"], d["manifest_fingerprint"], d["run_id"])


def _candidate_configs(data_root: Path, fp: str, seed: int):
    """Stored 1A configurations for ``seed`` (the one at ``fp`` first), then the default configuration."""
    paths = sorted(data_root.glob(CONFIG_1A_path("*", seed)))
    first = data_root / CONFIG_1A_path(fp, seed)
    paths.sort(key=lambda p: p != first)
    for p in paths:
        try:
            cfg = dict(_config_doc(json.loads(p.read_text())))
            cfg["seed"] = seed
            yield engine_config.resolve(cfg), str(p)
        except (ValueError, EngineError):
            continue
    yield engine_config.resolve({**default_config(), "seed": seed}), "default config.yaml"


def resolve_for_validate(data_root: Path, ph: str, fp: str, seed: int, run_id: str,
                         dictionary: str | None = None) -> RunContext:
    """The RunContext of the 1B run named by 1A or 1B identities (module docstring)."""
    candidates = []
    if True:
        for rec in sorted(data_root.glob(RECORD_1B_path("*", seed))):
            try:
                doc = json.loads(rec.read_text())
            except ValueError:
                continue
            for seg in ("ids_1b", "ids_1a"):
                i = doc.get(seg) or {}
                if (i.get("parameter_hash"), i.get("manifest_fingerprint")) == (ph, fp):
                    candidates.append(doc)
                    break
    if candidates:
        match = [d for d in candidates if d["ids_1b"]["run_id"] == run_id]
        if not match:
            raise IdentityError("E_RUN_ID_MISMATCH", "--run-id is not the 1B run_id of the run with these "
                                "identities", rows=sorted({d["ids_1b"]["run_id"] for d in candidates}),
                                detail={"given": run_id})
        doc = match[0]
        cfg = apply_1b_options(doc["config"], dictionary)
        return make_context(data_root, cfg, _ids_from(doc["ids_1a"], "1A"), _ids_from(doc["ids_1b"], "1B"),
                            doc.get("extra") or {})
    # no record (e.g. a run made with snakemake directly): try the 1A configurations stored for this seed, then
    # the default configuration; the given identities may be the 1A ones or the 1B ones of that configuration
    found = None
    causes: list[str] = []
    for cfg1a, source in _candidate_configs(data_root, fp, seed):
        try:
            r1a = identities.resolve_1a(cfg1a, REPO, _cache(data_root))
            is_1a = (r1a.parameter_hash, r1a.manifest_fingerprint) == (ph, fp)
            r1b = identities.resolve_1b(cfg1a, REPO, r1a, _cache(data_root))
        except EngineError as exc:
            causes.append(f"{source}: {exc.code}: {exc.message}")
            continue
        if is_1a or (r1b.parameter_hash, r1b.manifest_fingerprint) == (ph, fp):
            found = (cfg1a, r1a, r1b)
            break
    if found is None:
        raise IdentityError(
            "E_IDENTITY_MISMATCH", "these identities are neither the 1A nor the 1B identities of a recorded run, of a "
            "stored 1A configuration or of the default inputs; pass the identities that segment1a / segment1b run "
            "printed", detail={"given": {"parameter_hash": ph, "manifest_fingerprint": fp, "seed": seed},
                               "unresolvable": causes})
    cfg1a, r1a, r1b = found
    if r1b.run_id != run_id:
        raise IdentityError("E_RUN_ID_MISMATCH", "--run-id is not the 1B run_id of these identities",
                            rows=[r1b.run_id], detail={"given": run_id})
    cfg = apply_1b_options(cfg1a, dictionary)
    extra = {**r1b.extra, "code_digest": r1b.code_digest_hex}
    return make_context(data_root, cfg, r1a.ids, r1b.ids, extra)


# ====================================================================== run
def require_verified_receipt(ctx: RunContext) -> None:
    """--skip-s0 only with a verified 1B S0 receipt for these identities (spec 1B 1), else E301."""
    try:
        from engine.segment1b import s0_gate

        ok = bool(s0_gate.verified_receipt_exists(ctx))
    except ImportError:
        ok = False
    if not ok:
        raise GateError("E301_NO_PASS_FLAG", "--skip-s0 needs a verified 1B S0 gate receipt for these identities "
                        "(1A's _passed.flag checked by an earlier S0 run); run without --skip-s0 first",
                        path=ctx.path("s0_gate_receipt_1B"))


def rule_names() -> list[str]:
    names: list[str] = []
    for f in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        names += re.findall(r"^rule\s+(\w+)\s*:", f.read_text(), flags=re.M)
    return sorted(set(names))


def _rows(directory: Path) -> int | None:
    import pyarrow.parquet as pq

    if not directory.is_dir():
        return None
    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(directory.glob("part-*.parquet")))


def s9_outcome(ctx: RunContext) -> dict:
    from engine.core import bundle

    bdir = Path(ctx.path("validation_bundle_1B"))
    flag = bdir / bundle.FLAG
    codes: list[str] = []
    summary = bdir / "s9_summary.json"
    if summary.is_file():
        try:
            codes = list(json.loads(summary.read_text()).get("failure_codes") or [])
        except ValueError:
            codes = ["E909_INDEX_INVALID"]
    passed = False
    if flag.is_file():
        try:
            bundle.verify_bundle(bdir)
            passed = not codes
        except GateError as exc:
            codes = sorted(set(codes) | {"E910_FLAG_BAD_OR_MISSING"})
            print(str(exc), file=sys.stderr)
    return {"bundle_path": str(bdir), "flag_path": str(flag), "stage_log_path": str(ctx.path("s9_stage_log")),
            "passed": passed, "failure_codes": codes}


def cmd_run(a: argparse.Namespace) -> int:
    data_root = Path(a.data_root).expanduser().resolve()
    try:
        cfg, r1a, source = resolve_1a_checked(data_root, a.parameter_hash, a.manifest_fingerprint, a.seed)
        cfg = apply_1b_options(cfg, a.dictionary, a.basis, a.dp, a.skip_s0)
        r1b = identities.resolve_1b(cfg, REPO, r1a, _cache(data_root))
        extra = {**r1b.extra, "code_digest": r1b.code_digest_hex}
        ctx = make_context(data_root, cfg, r1a.ids, r1b.ids, extra)
        extra_args: list[str] = ["-n"] if a.dry_run else []
        if a.skip_s0:
            require_verified_receipt(ctx)
            allowed = [r for r in rule_names() if r != S0_RULE]
            # --allowed-rules takes several values: close it with a repeated option before the targets
            extra_args += ["--allowed-rules", *allowed, "--rerun-triggers", "mtime"]
        targets = [str(Path(ctx.path(d)).relative_to(data_root)) for d in ("site_locations",)]
        targets.append(str((Path(ctx.path("validation_bundle_1B")) / "_passed.flag").relative_to(data_root)))
    except EngineError as e:
        print(str(e), file=sys.stderr)
        return 2
    if not a.dry_run:
        write_record(ctx)
    rc = run_snakemake(data_root, cfg, targets, a.cores, extra_args, verbose=a.verbose)
    s9 = s9_outcome(ctx)
    passed = bool(rc == 0 and s9["passed"])
    print_json({
        "segment": "1B",
        "seed": r1b.seed,
        "consumed_1A": {"parameter_hash": r1a.parameter_hash, "manifest_fingerprint": r1a.manifest_fingerprint,
                        "run_id": r1a.run_id, "config_source": source,
                        "outlet_catalogue": str(ctx.path("outlet_catalogue", segment="1A")),
                        "flag_path": str(Path(ctx.path("validation_bundle_1A", segment="1A")) / "_passed.flag")},
        "parameter_hash": r1b.parameter_hash,
        "manifest_fingerprint": r1b.manifest_fingerprint,
        "run_id": r1b.run_id,
        "grid_hash": r1b.grid_hash,
        "weights_hash": r1b.weights_hash,
        "code_digest": r1b.code_digest_hex,
        "options": {"basis": cfg["segment1b"]["options"]["basis"], "dp": cfg["segment1b"]["options"]["dp"],
                    "skip_s0": bool(a.skip_s0)},
        "dictionary": cfg["segment1b"].get("dictionary"),
        "site_locations": str(ctx.path("site_locations")),
        "bundle_path": s9["bundle_path"],
        "flag_path": s9["flag_path"],
        "stage_log_path": s9["stage_log_path"],
        "rows": {"outlet_catalogue": _rows(Path(ctx.path("outlet_catalogue", segment="1A"))),
                 "site_locations": _rows(Path(ctx.path("site_locations")))},
        "failure_codes": s9["failure_codes"],
        "passed": passed,
        "exit_code": rc,
        "s9": s9,
    })
    if a.dry_run:
        return 0 if rc == 0 else 1
    return 0 if passed else 1


def cmd_validate(a: argparse.Namespace) -> int:
    data_root = Path(a.data_root).expanduser().resolve()
    try:
        ctx = resolve_for_validate(data_root, a.parameter_hash, a.manifest_fingerprint, a.seed, a.run_id,
                                   a.dictionary)
        from engine.segment1b import s9_validation

        r = s9_validation.revalidate(ctx)
    except EngineError as e:
        print(str(e), file=sys.stderr)
        return 2
    for f in r.get("failures") or []:
        print(f"{f.get('code')}: {f.get('message')}", file=sys.stderr)
    print_json({k: r[k] for k in ("passed", "failure_codes", "bundle_path", "flag_path", "stage_log_path")})
    return 0 if r["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "run":
        return cmd_run(a)
    return cmd_validate(a)


if __name__ == "__main__":
    sys.exit(main())
