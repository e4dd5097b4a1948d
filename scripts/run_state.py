"""Thin entry point for every Snakemake rule: run one engine state.

    python scripts/run_state.py STATE CONTEXT_JSON [DONE_MARKER]

CONTEXT_JSON is a JSON string or a file holding it. DONE_MARKER, when given, is written only after
the state succeeded: rules whose outputs are RNG event logs declare it (an event family may
legitimately have no rows, and the spec forbids zero-row files).

Builds the RunContext (data root = current directory) and calls the state's function.
An EngineError is printed (code, file, offending rows) and the process exits with 2.

On success one final progress line goes to the job log (engine.core.progress format, parsed by the CLIs):
the rows written when known - a count or a report with ``rows_emitted`` returned by the state, else the
rows of the Parquet partitions the state produces (dataset dictionary ``produced_by``, read from the file
footers) - otherwise a plain done line for the state:

    [progress] 1A.S8 rows 56120/56120 (100.0%) 33,012.9/s elapsed 1.7s done
    [progress] 1A.S1 state 1/1 (100.0%) 0.3/s elapsed 3.2s done
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.context import context_from_json  # noqa: E402
from engine.core.errors import EngineError  # noqa: E402
from engine.core.progress import report  # noqa: E402
from engine.states import resolve  # noqa: E402

# states whose datasets are not named by their own produced_by (suffixed states share S0 / S3's entries)
STATE_DATASETS = {
    "1A.S0.anchor": (),
    "1B.S0.anchor": (),
    "1A.S3.candidates": ("s3_candidate_set", "s3_base_weight_priors"),
    "1A.S3.lanes": ("s3_integerised_counts", "s3_site_sequence"),
}


def rows_written(state: str, ctx, result) -> int | None:
    """Rows the state wrote (module docstring), or None when that is not known."""
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    if isinstance(result, dict):
        for key in ("rows_emitted", "rows_written", "rows"):
            v = result.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    import pyarrow.parquet as pq

    from engine.core import dictionary

    try:
        d = dictionary.load(ctx.segment, ctx.config)
        ids = STATE_DATASETS.get(state)
        if ids is None:
            ids = tuple(i for i in d.ids() if d.entry(i).produced_by == state)
        total, seen = 0, False
        for ds in ids:
            if ds not in d or d.entry(ds).format != "parquet":
                continue
            part = ctx.path(ds)
            for f in sorted(part.glob("*.parquet")) if part.is_dir() else []:
                total += pq.ParquetFile(f).metadata.num_rows
                seen = True
        return total if seen else None
    except (EngineError, OSError, ValueError, KeyError):
        # the count only decorates a log line: a state that succeeded never fails over it
        return None


def main(argv: list[str]) -> int:
    state, ctx_arg = argv[1], argv[2]
    text = ctx_arg if ctx_arg.lstrip().startswith("{") else Path(ctx_arg).read_text()
    ctx = context_from_json(text, data_root=Path.cwd())
    t0 = time.perf_counter()
    print(f"[{state}] start (seed={ctx.ids.seed} parameter_hash={ctx.ids.parameter_hash[:12]} "
          f"fingerprint={ctx.ids.manifest_fingerprint[:12]})", file=sys.stderr, flush=True)
    try:
        result = resolve(state)(ctx)
    except EngineError as e:
        print(f"[{state}] FAILED\n{e}", file=sys.stderr, flush=True)
        return 2
    if len(argv) > 3:
        marker = Path(argv[3])
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name("." + marker.name + ".tmp")
        tmp.write_text(f"{state} seed={ctx.ids.seed} parameter_hash={ctx.ids.parameter_hash} "
                       f"fingerprint={ctx.ids.manifest_fingerprint} run_id={ctx.ids.run_id}\n")
        tmp.replace(marker)
    elapsed = time.perf_counter() - t0
    rows = rows_written(state, ctx, result)
    if rows is None:
        report(state, 1, unit="state", elapsed_s=elapsed)
    else:
        report(state, rows, unit="rows", elapsed_s=elapsed)
    print(f"[{state}] done in {elapsed:.2f}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
