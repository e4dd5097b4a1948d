"""Runbook section 2: run segment 1A (S0..S9) through the Snakemake workflow.

    python -m engine.cli.segment1a --output-dir runs/local_layer1 [--merchant-table my.csv] [--seed 7] ...

Every input flag defaults to the embedded default. Prints parameter_hash, manifest_fingerprint,
the catalogue path and the flag path as JSON; exits non-zero when the run (or S9) fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli._common import abspath, default_config, print_json, run_snakemake
from engine.core import config as engine_config
from engine.core import dictionary, identities
from engine.core.errors import EngineError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.cli.segment1a", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, help="data root (holds data/ and logs/)")
    p.add_argument("--merchant-table", help="merchant table (CSV or Parquet)")
    p.add_argument("--iso-table")
    p.add_argument("--gdp-table")
    p.add_argument("--bucket-table")
    p.add_argument("--param", action="append", default=[], metavar="NAME=PATH",
                   help="replace a governed parameter file (NAME is its basename, e.g. policy.s3.rule_ladder.yaml)")
    p.add_argument("--validation-policy", help="s2_validation_policy.yaml")
    p.add_argument("--numeric-policy")
    p.add_argument("--math-profile")
    p.add_argument("--extra-manifest", action="append", default=[], help="extra artefact sealed into the fingerprint")
    p.add_argument("--seed", type=int)
    p.add_argument("--git-commit", help="recorded as provenance only (never part of an identity)")
    p.add_argument("--s3-priors", action="store_true")
    p.add_argument("--s3-integerisation", action="store_true")
    p.add_argument("--s3-sequencing", action="store_true")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="show what would run (snakemake -n)")
    p.add_argument("--verbose", action="store_true",
                   help="show Snakemake's own output as well as the one progress line per state")
    return p


def config_from_args(a: argparse.Namespace) -> dict:
    cfg = default_config()
    s = cfg["segment1a"]
    for flag, key in (("merchant_table", "merchant_table"), ("iso_table", "iso_table"), ("gdp_table", "gdp_table"),
                      ("bucket_table", "bucket_table"), ("numeric_policy", "numeric_policy"),
                      ("math_profile", "math_profile")):
        v = getattr(a, flag)
        if v:
            s["inputs"][key] = abspath(v)
    for i, extra in enumerate(a.extra_manifest):
        s["inputs"][f"extra_manifest_{i}"] = abspath(extra)
    for item in a.param:
        if "=" not in item:
            raise EngineError("E_CLI_ARGS", f"--param expects NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        if name not in s["parameters"]:
            raise EngineError("E_PARAM_UNKNOWN", f"unknown governed parameter {name!r}",
                              rows=sorted(s["parameters"]))
        s["parameters"][name] = abspath(path)
    if a.validation_policy:
        s["parameters"]["s2_validation_policy.yaml"] = abspath(a.validation_policy)
    if a.seed is not None:
        cfg["seed"] = a.seed
    if a.git_commit:
        cfg["git_commit"] = a.git_commit
    s["options"]["s3_priors"] = bool(a.s3_priors or s["options"].get("s3_priors"))
    s["options"]["s3_integerisation"] = bool(a.s3_integerisation or s["options"].get("s3_integerisation"))
    s["options"]["s3_sequencing"] = bool(a.s3_sequencing or s["options"].get("s3_sequencing"))
    # embedded defaults are relative to the repo: make everything absolute before the workflow sees it
    return engine_config.resolve(cfg)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(a)
        out = Path(a.output_dir).resolve()
        r = identities.resolve_1a(cfg, engine_config.REPO_ROOT, out / ".snakemake" / "identity-cache.json")
        d = dictionary.load("1A", cfg)
        toks = {"seed": r.seed, "parameter_hash": r.parameter_hash,
                "manifest_fingerprint": r.manifest_fingerprint, "run_id": r.run_id}
        catalogue = out / d.path("outlet_catalogue", **toks)
        flag = out / d.path("validation_bundle_1A", **toks) / "_passed.flag"
        engine_config.write_run_config(out / d.path("run_config_1A", **toks), cfg)
    except EngineError as e:
        print(str(e), file=sys.stderr)
        return 2
    extra = ["-n"] if a.dry_run else []
    rc = run_snakemake(out, cfg, ["segment1a"], a.cores, extra, verbose=a.verbose)
    print_json({
        "segment": "1A",
        "seed": r.seed,
        "parameter_hash": r.parameter_hash,
        "manifest_fingerprint": r.manifest_fingerprint,
        "run_id": r.run_id,
        "code_digest": r.code_digest_hex,
        "git_commit": cfg.get("git_commit") or r.git_commit,
        "outlet_catalogue": str(catalogue),
        "flag_path": str(flag),
        "passed": flag.exists(),
        "exit_code": rc,
    })
    return 0 if (rc == 0 and (a.dry_run or flag.exists())) else 1


if __name__ == "__main__":
    sys.exit(main())
