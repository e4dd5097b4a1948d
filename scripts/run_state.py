"""Thin entry point for every Snakemake rule: run one engine state.

    python scripts/run_state.py STATE CONTEXT_JSON [DONE_MARKER]

CONTEXT_JSON is a JSON string or a file holding it. DONE_MARKER, when given, is written only after
the state succeeded: rules whose outputs are RNG event logs declare it (an event family may
legitimately have no rows, and the spec forbids zero-row files).

Builds the RunContext (data root = current directory) and calls the state's function.
An EngineError is printed (code, file, offending rows) and the process exits with 2.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.context import context_from_json  # noqa: E402
from engine.core.errors import EngineError  # noqa: E402
from engine.states import resolve  # noqa: E402


def main(argv: list[str]) -> int:
    state, ctx_arg = argv[1], argv[2]
    text = ctx_arg if ctx_arg.lstrip().startswith("{") else Path(ctx_arg).read_text()
    ctx = context_from_json(text, data_root=Path.cwd())
    t0 = time.perf_counter()
    print(f"[{state}] start (seed={ctx.ids.seed} parameter_hash={ctx.ids.parameter_hash[:12]} "
          f"fingerprint={ctx.ids.manifest_fingerprint[:12]})", file=sys.stderr, flush=True)
    try:
        resolve(state)(ctx)
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
    print(f"[{state}] done in {time.perf_counter() - t0:.2f}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
