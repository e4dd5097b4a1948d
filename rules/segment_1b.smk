# Segment 1B: S0 gate-in (no PASS, no read) -> S1 tile index -> S2 tile weights -> S3 requirements
#             -> S4 allocation plan -> S5 site->tile -> S6 in-cell jitter -> S7 synthesis
#             -> S8 site_locations -> S9 gate.
# S1 is keyed by the grid (raster grid + polygons) and S2 by grid + weights (basis, dp, raster values),
# so they are computed once and reused by every run on the same spatial inputs (decision 13).

FLAG_1B = p1b("validation_bundle_1B") + "/_passed.flag"
TARGETS_1B = [p1b("site_locations"), FLAG_1B]


rule s1b_s0_gate:
    """S0: verify 1A's bundle and flag before reading anything of 1A; seal 1B inputs; gate receipt."""
    input:
        flag_1a=FLAG_1A,
        catalogue=p1a("outlet_catalogue"),
        sealed=ancient(INPUTS_1B),
    output:
        receipt=directory(p1b("s0_gate_receipt_1B")),
        sealed=directory(p1b("sealed_inputs_1B")),
    log:
        jlog("1B", "s0", IDS_1B),
    params:
        ctx=CTX_1B,
    shell:
        "{RUN_STATE} 1B.S0 {params.ctx:q} 2> {log:q}"


rule s1b_s0_rng_anchor:
    """1B RNG audit row (seed-scoped logs), written before any 1B draw."""
    input:
        receipt=rules.s1b_s0_gate.output.receipt,
    output:
        audit=p1b("rng_audit_log"),
    log:
        jlog("1B", "s0_anchor", IDS_1B),
    params:
        ctx=CTX_1B,
    shell:
        "{RUN_STATE} 1B.S0.anchor {params.ctx:q} 2> {log:q}"


rule s1b_s1_tile_index:
    """S1: tile_index and tile_bounds from the raster grid and the country polygons (grid-scoped)."""
    input:
        ancient(
            [
                CFG["segment1b"]["inputs"]["world_countries"],
                CFG["segment1b"]["inputs"]["population_raster"],
            ]
        ),
    output:
        index=directory(p1b("tile_index")),
        bounds=directory(p1b("tile_bounds")),
    log:
        f"logs/jobs/1B/s1/grid={R1B.grid_hash}.log",
    benchmark:
        f"logs/benchmarks/1B/s1/grid={R1B.grid_hash}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
    params:
        ctx=CTX_1B,
    shell:
        "ENGINE_WORKERS={threads} {RUN_STATE} 1B.S1 {params.ctx:q} 2> {log:q}"


rule s1b_s2_tile_weights:
    """S2: integer tile weights per country summing to 10^dp (grid + weights scoped)."""
    input:
        index=rules.s1b_s1_tile_index.output.index,
        raster=ancient(CFG["segment1b"]["inputs"]["population_raster"]),
    output:
        weights=directory(p1b("tile_weights")),
    log:
        f"logs/jobs/1B/s2/grid={R1B.grid_hash}/weights={R1B.weights_hash}.log",
    benchmark:
        f"logs/benchmarks/1B/s2/grid={R1B.grid_hash}/weights={R1B.weights_hash}.tsv"
    threads: 2
    params:
        ctx=CTX_1B,
    shell:
        "ENGINE_WORKERS={threads} {RUN_STATE} 1B.S2 {params.ctx:q} 2> {log:q}"


rule s1b_s3_requirements:
    """S3: per (merchant, country) site requirements from outlet_catalogue; every country must have tiles."""
    input:
        receipt=rules.s1b_s0_gate.output.receipt,
        weights=rules.s1b_s2_tile_weights.output.weights,
    output:
        requirements=directory(p1b("s3_requirements")),
    log:
        jlog("1B", "s3", IDS_1B),
    benchmark:
        bench("1B", "s3", IDS_1B)
    params:
        ctx=CTX_1B,
    shell:
        "{RUN_STATE} 1B.S3 {params.ctx:q} 2> {log:q}"


rule s1b_s4_alloc_plan:
    """S4: exact integer tile quotas per merchant and country."""
    input:
        requirements=rules.s1b_s3_requirements.output.requirements,
        weights=rules.s1b_s2_tile_weights.output.weights,
    output:
        plan=directory(p1b("s4_alloc_plan")),
    log:
        jlog("1B", "s4", IDS_1B),
    benchmark:
        bench("1B", "s4", IDS_1B)
    params:
        ctx=CTX_1B,
    shell:
        "{RUN_STATE} 1B.S4 {params.ctx:q} 2> {log:q}"


rule s1b_s5_site_tile:
    """S5: one uniform per site on site_tile_assign; quotas honoured exactly."""
    input:
        plan=rules.s1b_s4_alloc_plan.output.plan,
        audit=rules.s1b_s0_rng_anchor.output.audit,
    output:
        assignment=directory(p1b("s5_site_tile_assignment")),
        done=done("1B", "s5", IDS_1B),
    log:
        jlog("1B", "s5", IDS_1B),
    benchmark:
        bench("1B", "s5", IDS_1B)
    params:
        ctx=CTX_1B,
    shell:
        "{RUN_STATE} 1B.S5 {params.ctx:q} {output.done:q} 2> {log:q}"


rule s1b_s6_jitter:
    """S6: uniform point inside the assigned pixel and inside the country (capped resampling)."""
    input:
        assignment=rules.s1b_s5_site_tile.output.assignment,
        s5=rules.s1b_s5_site_tile.output.done,
    output:
        jitter=directory(p1b("s6_site_jitter")),
        done=done("1B", "s6", IDS_1B),
    log:
        jlog("1B", "s6", IDS_1B),
    benchmark:
        bench("1B", "s6", IDS_1B)
    params:
        ctx=CTX_1B,
    shell:
        "{RUN_STATE} 1B.S6 {params.ctx:q} {output.done:q} 2> {log:q}"


rule s1b_s7_synthesis:
    """S7: per-site synthesis and parity with outlet_catalogue."""
    input:
        jitter=rules.s1b_s6_jitter.output.jitter,
    output:
        synthesis=directory(p1b("s7_site_synthesis")),
    log:
        jlog("1B", "s7", IDS_1B),
    benchmark:
        bench("1B", "s7", IDS_1B)
    params:
        ctx=CTX_1B,
    shell:
        "{RUN_STATE} 1B.S7 {params.ctx:q} 2> {log:q}"


rule s1b_s8_site_locations:
    """S8: site_locations egress."""
    input:
        synthesis=rules.s1b_s7_synthesis.output.synthesis,
    output:
        sites=directory(p1b("site_locations")),
    log:
        jlog("1B", "s8", IDS_1B),
    benchmark:
        bench("1B", "s8", IDS_1B)
    params:
        ctx=CTX_1B,
    shell:
        "{RUN_STATE} 1B.S8 {params.ctx:q} 2> {log:q}"


rule s1b_s9_validation:
    """S9: replay validation of 1B; bundle always, _passed.flag only on PASS."""
    input:
        sites=rules.s1b_s8_site_locations.output.sites,
    output:
        flag=FLAG_1B,
    log:
        jlog("1B", "s9", IDS_1B),
    benchmark:
        bench("1B", "s9", IDS_1B)
    params:
        ctx=CTX_1B,
    shell:
        "{RUN_STATE} 1B.S9 {params.ctx:q} 2> {log:q}"
