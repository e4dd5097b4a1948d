# Layer-1 engine: segment 1A (merchants -> outlet_catalogue) and 1B (outlets -> site_locations).
#
# Identities (parameter_hash, manifest_fingerprint, run_id, grid/weights hashes) are resolved at
# parse time from the bytes of the sealed inputs, so every output path is known before any job runs
# and an unchanged state is skipped. Paths come from contracts/dataset_dictionary.layer1.*.yaml only.
from pathlib import Path
import sys

from snakemake.utils import min_version

min_version("9.0")

REPO = Path(workflow.basedir).resolve()
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


configfile: str(REPO / "config.yaml")


include: "rules/common.smk"
include: "rules/segment_1a.smk"
include: "rules/segment_1b.smk"
include: "rules/report.smk"


report: "report/workflow.rst"


rule all:
    default_target: True
    input:
        TARGETS_1A + TARGETS_1B + REPORT_TARGETS,


rule segment1a:
    input:
        TARGETS_1A,
