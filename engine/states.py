"""Registry: state name -> "module:function" (what each Snakemake rule runs)."""

from __future__ import annotations

import importlib

STATES: dict[str, str] = {
    "1A.S0": "engine.segment1a.s0_foundations:run",
    "1A.S0.anchor": "engine.segment1a.s0_foundations:run_rng_anchor",
    "1A.S1": "engine.segment1a.s1_hurdle:run",
    "1A.S2": "engine.segment1a.s2_nb_outlets:run",
    "1A.S3.candidates": "engine.segment1a.s3_crossborder:run_candidates",
    "1A.S3.lanes": "engine.segment1a.s3_crossborder:run_lanes",
    "1A.S4": "engine.segment1a.s4_ztp:run",
    "1A.S5": "engine.segment1a.s5_currency_weights:run",
    "1A.S6": "engine.segment1a.s6_foreign_selection:run",
    "1A.S7": "engine.segment1a.s7_allocation:run",
    "1A.S8": "engine.segment1a.s8_outlet_catalogue:run",
    "1A.S9": "engine.segment1a.s9_validation:run",
    "1B.S0": "engine.segment1b.s0_gate:run",
    "1B.S0.anchor": "engine.segment1b.s0_gate:run_rng_anchor",
    "1B.S1": "engine.segment1b.s1_tile_index:run",
    "1B.S2": "engine.segment1b.s2_tile_weights:run",
    "1B.S3": "engine.segment1b.s3_requirements:run",
    "1B.S4": "engine.segment1b.s4_alloc_plan:run",
    "1B.S5": "engine.segment1b.s5_site_tile:run",
    "1B.S6": "engine.segment1b.s6_jitter:run",
    "1B.S7": "engine.segment1b.s7_synthesis:run",
    "1B.S8": "engine.segment1b.s8_site_locations:run",
    "1B.S9": "engine.segment1b.s9_validation:run",
}


def resolve(state: str):
    target = STATES[state]
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)
