# Run report (issue "Operate, audit, report"): figures and a summary page read from the final outputs of this
# run, shown by `snakemake --report report.html` with the captions of report/*.rst.
#
# Presentation only: every file goes under reports/ of the data root, never under data/ (nothing here is a
# dataset, nothing is sealed). The plotting lives in engine/report.py (pure functions + a small CLI); the path
# templates are written only in engine.report.REPORT_PATHS. The 1A figures read only after 1A's _passed.flag,
# the site map and the summary only after 1B's (no PASS, no read); the tile-weights map is grid/weights
# scoped like tile_weights itself (decision 13), so it is drawn once per (grid, weights).
import json as _json
import shlex as _shlex

from engine.report import report_path as _report_path

_RPT_1A = {"seed": IDS_1A.seed, "manifest_fingerprint": IDS_1A.manifest_fingerprint}
_RPT_1B = {"seed": IDS_1B.seed, "manifest_fingerprint": IDS_1B.manifest_fingerprint}
_RPT_GRID = {"grid_hash": R1B.grid_hash, "weights_hash": R1B.weights_hash}

REPORT_FILES = {
    "outlets_per_merchant": _report_path("outlets_per_merchant", **_RPT_1A),
    "single_vs_multi": _report_path("single_vs_multi", **_RPT_1A),
    "countries_per_merchant": _report_path("countries_per_merchant", **_RPT_1A),
    "top_legal_countries": _report_path("top_legal_countries", **_RPT_1A),
    "site_map": _report_path("site_map", **_RPT_1B),
    "tile_weights_map": _report_path("tile_weights_map", **_RPT_GRID),
    "run_summary": _report_path("run_summary", **_RPT_1B),
}
REPORT_TARGETS = list(REPORT_FILES.values())

# `python -m engine.report` from the data root: the checkout goes in front of any PYTHONPATH of the caller
REPORT_CMD = (f"PYTHONPATH={_shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}} "
              f"{_shlex.quote(sys.executable)} -m engine.report")
_POLYGONS = CFG["segment1b"]["inputs"]["world_countries"]
_RUN_1A = f"seed={IDS_1A.seed} fp={IDS_1A.manifest_fingerprint[:12]}"
_RUN_1B = f"seed={IDS_1B.seed} fp={IDS_1B.manifest_fingerprint[:12]}"
_CAT_1A = "1A outlets"
_CAT_1B = "1B site locations"
_CAT_RUN = "Run identities and S9"


rule report_1a_figures:
    """Outlets per merchant, single vs multi-site share against mean(pi), countries per merchant, top countries."""
    input:
        flag=FLAG_1A,
        catalogue=p1a("outlet_catalogue"),
        pi=p1a("hurdle_pi_probs"),
    output:
        outlets=report(REPORT_FILES["outlets_per_merchant"], caption="../report/outlets_per_merchant.rst",
                       category=_CAT_1A, labels={"figure": "outlets per merchant", "run": _RUN_1A}),
        share=report(REPORT_FILES["single_vs_multi"], caption="../report/single_vs_multi.rst",
                     category=_CAT_1A, labels={"figure": "single vs multi-site share", "run": _RUN_1A}),
        countries=report(REPORT_FILES["countries_per_merchant"], caption="../report/countries_per_merchant.rst",
                         category=_CAT_1A, labels={"figure": "countries per merchant", "run": _RUN_1A}),
        top=report(REPORT_FILES["top_legal_countries"], caption="../report/top_legal_countries.rst",
                   category=_CAT_1A, labels={"figure": "top legal countries", "run": _RUN_1A}),
    log:
        f"logs/jobs/report/1A/seed={IDS_1A.seed}/fingerprint={IDS_1A.manifest_fingerprint}.log",
    params:
        seed=IDS_1A.seed,
        parameter_hash=IDS_1A.parameter_hash,
        fingerprint=IDS_1A.manifest_fingerprint,
        tag=f"seed={IDS_1A.seed}  1A manifest_fingerprint={IDS_1A.manifest_fingerprint}",
    shell:
        "{REPORT_CMD} segment1a --catalogue {input.catalogue:q} --pi {input.pi:q} --outlets {output.outlets:q}"
        " --share {output.share:q} --countries {output.countries:q} --top-countries {output.top:q}"
        " --tag {params.tag:q} 2> {log:q}"


rule report_site_map:
    """World map of site_locations coloured by legal country, over the run's country outlines."""
    input:
        flag=FLAG_1B,
        sites=p1b("site_locations"),
        polygons=ancient(_POLYGONS),
    output:
        png=report(REPORT_FILES["site_map"], caption="../report/site_map.rst", category=_CAT_1B,
                   labels={"figure": "site map", "run": _RUN_1B}),
    log:
        f"logs/jobs/report/1B/site_map/seed={IDS_1B.seed}/fingerprint={IDS_1B.manifest_fingerprint}.log",
    params:
        seed=IDS_1B.seed,
        fingerprint=IDS_1B.manifest_fingerprint,
        tag=f"seed={IDS_1B.seed}  1B manifest_fingerprint={IDS_1B.manifest_fingerprint}",
    shell:
        "{REPORT_CMD} sites --sites {input.sites:q} --polygons {input.polygons:q} --out {output.png:q}"
        " --tag {params.tag:q} 2> {log:q}"


rule report_tile_weights_map:
    """Map of the S2 tile weights (grid + weights scoped, like tile_weights)."""
    input:
        index=p1b("tile_index"),
        weights=p1b("tile_weights"),
        polygons=ancient(_POLYGONS),
    output:
        png=report(REPORT_FILES["tile_weights_map"], caption="../report/tile_weights_map.rst", category=_CAT_1B,
                   labels={"figure": "tile weights map", "run": f"grid={R1B.grid_hash[:12]}"}),
    log:
        f"logs/jobs/report/1B/tile_weights/grid={R1B.grid_hash}/weights={R1B.weights_hash}.log",
    params:
        grid_hash=R1B.grid_hash,
        weights_hash=R1B.weights_hash,
        basis=CFG["segment1b"]["options"].get("basis"),
        dp=CFG["segment1b"]["options"].get("dp"),
        tag=f"grid={R1B.grid_hash}  weights={R1B.weights_hash}",
    shell:
        "{REPORT_CMD} tile-weights --tile-index {input.index:q} --tile-weights {input.weights:q}"
        " --polygons {input.polygons:q} --out {output.png:q} --tag {params.tag:q} 2> {log:q}"


rule report_run_summary:
    """Identities of both segments and the S9 results of both validation bundles (one HTML page)."""
    input:
        flag_1a=FLAG_1A,
        flag_1b=FLAG_1B,
    output:
        html=report(REPORT_FILES["run_summary"], caption="../report/run_summary.rst", category=_CAT_RUN,
                    labels={"figure": "identities and S9 results", "run": _RUN_1B}),
    log:
        f"logs/jobs/report/run/seed={IDS_1B.seed}/fingerprint={IDS_1B.manifest_fingerprint}.log",
    params:
        identities=_json.dumps(IDENTITIES, sort_keys=True),
        ids=IDENTITIES,
        bundle_1a=p1a("validation_bundle_1A"),
        bundle_1b=p1b("validation_bundle_1B"),
    shell:
        "{REPORT_CMD} summary --identities {params.identities:q} --bundle 1A={params.bundle_1a:q}"
        " --bundle 1B={params.bundle_1b:q} --out {output.html:q} 2> {log:q}"
