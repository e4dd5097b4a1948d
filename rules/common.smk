# Shared wiring: resolved config, identities, path helpers, and the command every rule runs.
import json

from engine.core import config as engine_config
from engine.core import dictionary, identities
from engine.core.context import RunContext, SegmentIds, context_to_json


wildcard_constraints:
    seed=r"\d+",
    parameter_hash=r"[a-f0-9]{64}",
    manifest_fingerprint=r"[a-f0-9]{64}",
    run_id=r"[a-f0-9]{32}",


CFG = engine_config.resolve(config, REPO)
IDENTITY_CACHE = Path(".snakemake") / "identity-cache.json"
R1A = identities.resolve_1a(CFG, REPO, IDENTITY_CACHE)
R1B = identities.resolve_1b(CFG, REPO, R1A, IDENTITY_CACHE)

IDS_1A = SegmentIds("1A", R1A.seed, R1A.parameter_hash, R1A.manifest_fingerprint, R1A.run_id)
IDS_1B = SegmentIds("1B", R1B.seed, R1B.parameter_hash, R1B.manifest_fingerprint, R1B.run_id)
CODE = {"code_digest": R1A.code_digest_hex, "git_commit": R1A.git_commit}
EXTRA_1B = dict(CODE, grid_hash=R1B.grid_hash, weights_hash=R1B.weights_hash)

D1A = dictionary.load("1A", CFG)
D1B = dictionary.load("1B", CFG)


def p1a(dataset_id, **tokens):
    """Concrete 1A path (no trailing slash) from the 1A dictionary."""
    return D1A.path(dataset_id, **{**IDS_1A.tokens(), **tokens}).rstrip("/")


def p1b(dataset_id, **tokens):
    toks = {**IDS_1B.tokens(), "grid_hash": R1B.grid_hash, "weights_hash": R1B.weights_hash}
    return D1B.path(dataset_id, **{**toks, **tokens}).rstrip("/")


def ev1a(family, part=0):
    return f"{p1a('rng_event', family=family)}/part-{part:05d}.jsonl"


def ev1b(family, part=0):
    return f"{p1b('rng_event', family=family)}/part-{part:05d}.jsonl"


def jlog(segment, state, ids):
    """Snakemake job log (ops only, not a dataset)."""
    return f"logs/jobs/{segment}/{state}/seed={ids.seed}/fingerprint={ids.manifest_fingerprint}.log"


def done(segment, state, ids):
    """Completion marker of a state whose outputs are RNG logs (written by run_state.py on success)."""
    return (f"logs/states/{segment}/{state}/seed={ids.seed}/parameter_hash={ids.parameter_hash}/"
            f"run_id={ids.run_id}/done")


def bench(segment, state, ids):
    return f"logs/benchmarks/{segment}/{state}/seed={ids.seed}/fingerprint={ids.manifest_fingerprint}.tsv"


CTX_1A = context_to_json(RunContext(Path("."), REPO, CFG, IDS_1A, extra=CODE))
CTX_1B = context_to_json(RunContext(Path("."), REPO, CFG, IDS_1B, ids_1a=IDS_1A, extra=EXTRA_1B))
RUN_STATE = f"{sys.executable} {REPO / 'scripts' / 'run_state.py'}"

# Every sealed input is content-addressed into the paths, so touching a file without changing
# its bytes must not rerun anything: inputs are ancient().
INPUTS_1A = sorted(set(CFG["segment1a"]["inputs"].values()) | set(CFG["segment1a"]["parameters"].values()))
INPUTS_1B = sorted(set(CFG["segment1b"]["inputs"].values()) | set(CFG["segment1b"]["parameters"].values()))
OPT_1A = CFG["segment1a"]["options"]

IDENTITIES = {
    "seed": R1A.seed,
    "1A": {
        "parameter_hash": R1A.parameter_hash,
        "manifest_fingerprint": R1A.manifest_fingerprint,
        "run_id": R1A.run_id,
    },
    "1B": {
        "parameter_hash": R1B.parameter_hash,
        "manifest_fingerprint": R1B.manifest_fingerprint,
        "run_id": R1B.run_id,
        "grid_hash": R1B.grid_hash,
        "weights_hash": R1B.weights_hash,
    },
    "code_digest": R1A.code_digest_hex,
}


def run_config_path(ids):
    """Where the resolved configuration of a 1A run is kept (ops record under logs/, read by the 1B CLI)."""
    return Path(p1a("run_config_1A"))


def write_run_config():
    engine_config.write_run_config(run_config_path(IDS_1A), CFG)


onstart:
    write_run_config()
    print("engine identities: " + json.dumps(IDENTITIES, sort_keys=True), file=sys.stderr)


onsuccess:
    summary = dict(IDENTITIES)
    summary["outlet_catalogue"] = p1a("outlet_catalogue")
    summary["flag_1A"] = p1a("validation_bundle_1A") + "/_passed.flag"
    summary["site_locations"] = p1b("site_locations")
    summary["flag_1B"] = p1b("validation_bundle_1B") + "/_passed.flag"
    print("engine run summary: " + json.dumps(summary, sort_keys=True), file=sys.stderr)
