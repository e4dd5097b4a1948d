"""Extract tests/data/rng/upstream_nb_events.json from the original engine's real RNG logs.

Source (see /work/shared/upstream-data/MANIFEST.md; runbook-era run ``local_layer1_regen``, seed
123456789, manifest_fingerprint 4fbffd99..., which keyed merchants by raw LE64(merchant_id),
00-core section 8 #2): the ``gamma_component`` and ``poisson_component`` event files of S2.

Selection (deterministic): every event of the merchants that (a) are among the first 100
merchants in file order of the gamma log, or (b) have a gamma event with more than 2 blocks
(Marsaglia-Tsang rejections), or (c) have a Poisson event with lambda >= 10 (kept for chain
continuity; not replayed) or with k >= 10. Columns keep the log's values unchanged.

    .venv/bin/python tests/data/rng/extract_upstream_nb_events.py [UPSTREAM_DATA_ROOT]
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

RUN = "runs/local_layer1_regen/logs/rng/events"
PART = ("seed=123456789/parameter_hash=276e407172e7240131ee8e5d8942023b6a61160c0e427a4f173156cfe69b1757/"
        "run_id=d4a2369d225281dd39b51bd3bf7cae8f/part-00000.jsonl.gz")
FAMILIES = {"gamma_component": ("alpha", "gamma_value"), "poisson_component": ("lambda", "k")}


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/upstream-data")
    logs, meta = {}, {}
    for fam in FAMILIES:
        rel = f"{RUN}/{fam}/{PART}"
        raw = (root / rel).read_bytes()
        logs[fam] = [json.loads(line) for line in gzip.decompress(raw).decode().splitlines() if line.strip()]
        meta[fam] = {"source": rel, "sha256": hashlib.sha256(raw).hexdigest(), "events_in_source": len(logs[fam])}
    order = []
    for r in logs["gamma_component"]:
        if r["merchant_id"] not in order:
            order.append(r["merchant_id"])
    keep = set(order[:100])
    keep |= {r["merchant_id"] for r in logs["gamma_component"] if r["blocks"] > 2}
    keep |= {r["merchant_id"] for r in logs["poisson_component"] if r["lambda"] >= 10 or r["k"] >= 10}
    out = {
        "note": "Extracted by extract_upstream_nb_events.py; values exactly as logged upstream.",
        "seed": 123456789,
        "manifest_fingerprint": logs["gamma_component"][0]["manifest_fingerprint"],
        "segment": "1A",
        "merchant_ids_keyed_as": "raw LE64(merchant_id) (00-core section 8 #2)",
        "families": {},
    }
    for fam, (pname, vname) in FAMILIES.items():
        rows = [r for r in logs[fam] if r["merchant_id"] in keep]
        cols = {k: [] for k in ("merchant_id", "label", "param", "value", "before_hi", "before_lo",
                                "after_hi", "after_lo", "blocks", "draws")}
        for r in rows:
            cols["merchant_id"].append(r["merchant_id"])
            cols["label"].append(r["substream_label"])
            cols["param"].append(r[pname])
            cols["value"].append(r[vname])
            cols["before_hi"].append(r["rng_counter_before_hi"])
            cols["before_lo"].append(r["rng_counter_before_lo"])
            cols["after_hi"].append(r["rng_counter_after_hi"])
            cols["after_lo"].append(r["rng_counter_after_lo"])
            cols["blocks"].append(r["blocks"])
            cols["draws"].append(r["draws"])
        out["families"][fam] = dict(meta[fam], param=pname, value=vname, events=len(rows), columns=cols)
    dst = Path(__file__).with_name("upstream_nb_events.json")
    # one line per column keeps the file small and diff-able
    text = json.dumps(out, sort_keys=True, separators=(",", ":"))
    text = text.replace(',"columns":{', ',\n"columns":{\n').replace('],"', '],\n"')
    dst.write_text(text + "\n")
    print(dst, {f: out["families"][f]["events"] for f in FAMILIES}, dst.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
