# Segment 1A: S0 foundations -> S1 hurdle -> S2 NB count -> S3 candidates -> S4 ZTP target
#             -> S5 currency weights -> S6 Gumbel selection -> S7 allocation -> S8 outlet_catalogue -> S9 gate.
# Each rule runs one engine state through scripts/run_state.py; the rule body holds no logic.

S3_LANES = bool(OPT_1A.get("s3_integerisation")) or bool(OPT_1A.get("s3_sequencing"))
S3_PRIORS = bool(OPT_1A.get("s3_priors"))

FLAG_1A = p1a("validation_bundle_1A") + "/_passed.flag"
TARGETS_1A = [p1a("outlet_catalogue"), FLAG_1A]


rule s1a_s0_foundations:
    """S0: validate ingress, design matrices, eligibility, pi, sealed inputs and receipt (no RNG)."""
    input:
        ancient(INPUTS_1A),
    output:
        sealed=directory(p1a("sealed_inputs_1A")),
        receipt=directory(p1a("s0_gate_receipt_1A")),
        design=directory(p1a("hurdle_design_matrix")),
        pi=directory(p1a("hurdle_pi_probs")),
        eligibility=directory(p1a("crossborder_eligibility_flags")),
        features=directory(p1a("crossborder_features")),
    log:
        jlog("1A", "s0", IDS_1A),
    benchmark:
        bench("1A", "s0", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S0 {params.ctx:q} 2> {log:q}"


rule s1a_s0_rng_anchor:
    """S0 RNG anchor: the run's audit row and the non-consuming anchor event (seed-scoped logs)."""
    input:
        receipt=rules.s1a_s0_foundations.output.receipt,
    output:
        audit=p1a("rng_audit_log"),
        done=done("1A", "s0_anchor", IDS_1A),
    log:
        jlog("1A", "s0_anchor", IDS_1A),
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S0.anchor {params.ctx:q} {output.done:q} 2> {log:q}"


rule s1a_s1_hurdle:
    """S1: one Bernoulli per merchant (single vs multi-site)."""
    input:
        pi=rules.s1a_s0_foundations.output.pi,
        design=rules.s1a_s0_foundations.output.design,
        audit=rules.s1a_s0_rng_anchor.output.audit,
    output:
        done=done("1A", "s1", IDS_1A),
    log:
        jlog("1A", "s1", IDS_1A),
    benchmark:
        bench("1A", "s1", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S1 {params.ctx:q} {output.done:q} 2> {log:q}"


rule s1a_s2_nb_outlets:
    """S2: negative-binomial outlet count N >= 2 for multi-site merchants."""
    input:
        hurdle=rules.s1a_s1_hurdle.output.done,
        design=rules.s1a_s0_foundations.output.design,
    output:
        done=done("1A", "s2", IDS_1A),
    log:
        jlog("1A", "s2", IDS_1A),
    benchmark:
        bench("1A", "s2", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S2 {params.ctx:q} {output.done:q} 2> {log:q}"


rule s1a_s3_candidates:
    """S3: cross-border candidate set and ranks (+ base-weight priors when enabled); no RNG, no N."""
    input:
        eligibility=rules.s1a_s0_foundations.output.eligibility,
        design=rules.s1a_s0_foundations.output.design,
    output:
        candidates=directory(p1a("s3_candidate_set")),
        priors=directory(p1a("s3_base_weight_priors")) if S3_PRIORS else [],
    log:
        jlog("1A", "s3_candidates", IDS_1A),
    benchmark:
        bench("1A", "s3_candidates", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S3.candidates {params.ctx:q} 2> {log:q}"


if S3_LANES:

    rule s1a_s3_lanes:
        """S3 optional lanes that need N: integerised counts and site sequence."""
        input:
            candidates=rules.s1a_s3_candidates.output.candidates,
            final=rules.s1a_s2_nb_outlets.output.done,
        output:
            counts=(
                directory(p1a("s3_integerised_counts"))
                if OPT_1A.get("s3_integerisation")
                else []
            ),
            sequence=(
                directory(p1a("s3_site_sequence")) if OPT_1A.get("s3_sequencing") else []
            ),
        log:
            jlog("1A", "s3_lanes", IDS_1A),
        params:
            ctx=CTX_1A,
        shell:
            "{RUN_STATE} 1A.S3.lanes {params.ctx:q} 2> {log:q}"


rule s1a_s4_ztp:
    """S4: zero-truncated Poisson foreign-count target K_target (logs only)."""
    input:
        final=rules.s1a_s2_nb_outlets.output.done,
        candidates=rules.s1a_s3_candidates.output.candidates,
        features=rules.s1a_s0_foundations.output.features,
        eligibility=rules.s1a_s0_foundations.output.eligibility,
    output:
        metrics=p1a("s4_metrics_log"),
        done=done("1A", "s4", IDS_1A),
    log:
        jlog("1A", "s4", IDS_1A),
    benchmark:
        bench("1A", "s4", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S4 {params.ctx:q} {output.done:q} 2> {log:q}"


rule s1a_s5_currency_weights:
    """S5: currency -> country weights (parameter-scoped) and merchant_currency."""
    input:
        receipt=rules.s1a_s0_foundations.output.receipt,
    output:
        weights=directory(p1a("ccy_country_weights_cache")),
        sparse=directory(p1a("sparse_flag")),
        merchant_currency=directory(p1a("merchant_currency")),
    log:
        jlog("1A", "s5", IDS_1A),
    benchmark:
        bench("1A", "s5", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S5 {params.ctx:q} 2> {log:q}"


rule s1a_s6_foreign_selection:
    """S6: Gumbel-top-k selection of K foreign countries."""
    input:
        ztp=rules.s1a_s4_ztp.output.done,
        candidates=rules.s1a_s3_candidates.output.candidates,
        weights=rules.s1a_s5_currency_weights.output.weights,
        merchant_currency=rules.s1a_s5_currency_weights.output.merchant_currency,
    output:
        done=done("1A", "s6", IDS_1A),
        membership=directory(p1a("s6_membership")),
        receipt=directory(p1a("s6_receipt")),
    log:
        jlog("1A", "s6", IDS_1A),
    benchmark:
        bench("1A", "s6", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S6 {params.ctx:q} {output.done:q} 2> {log:q}"


rule s1a_s7_allocation:
    """S7: integer allocation of N over home and selected foreign countries."""
    input:
        membership=rules.s1a_s6_foreign_selection.output.membership,
        final=rules.s1a_s2_nb_outlets.output.done,
        weights=rules.s1a_s5_currency_weights.output.weights,
    output:
        done=done("1A", "s7", IDS_1A),
        allocation=directory(p1a("s7_integer_allocation")),
    log:
        jlog("1A", "s7", IDS_1A),
    benchmark:
        bench("1A", "s7", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S7 {params.ctx:q} {output.done:q} 2> {log:q}"


rule s1a_s8_outlet_catalogue:
    """S8: materialise outlet_catalogue (egress)."""
    input:
        allocation=rules.s1a_s7_allocation.output.allocation,
    output:
        catalogue=directory(p1a("outlet_catalogue")),
        done=done("1A", "s8", IDS_1A),
    log:
        jlog("1A", "s8", IDS_1A),
    benchmark:
        bench("1A", "s8", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S8 {params.ctx:q} {output.done:q} 2> {log:q}"


rule s1a_s9_validation:
    """S9: replay validation; the bundle always, _passed.flag only on PASS (the declared output)."""
    input:
        catalogue=rules.s1a_s8_outlet_catalogue.output.catalogue,
        s8=rules.s1a_s8_outlet_catalogue.output.done,
        counts=rules.s1a_s3_lanes.output if S3_LANES else [],
    output:
        flag=FLAG_1A,
    log:
        jlog("1A", "s9", IDS_1A),
    benchmark:
        bench("1A", "s9", IDS_1A)
    params:
        ctx=CTX_1A,
    shell:
        "{RUN_STATE} 1A.S9 {params.ctx:q} 2> {log:q}"
