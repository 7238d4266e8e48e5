"""alignscan.science — the alignment on trial: small ViMs trained here (no download), pruned
with no fine-tuning in every mode, with the factors that could explain a difference isolated
and paired tests on the same images.

    alignscan zero-shot [--quick]      # science.zero_shot
    alignscan zero-shot --confirmatory # the pre-registered test (design.CONFIRMATORY)
    alignscan visualize                # science.visualize

Modules: ``digits`` (the data and the training of the small ViMs), ``distance_task`` (a task
where the distance along the scan decides the label), ``design`` (the factors and levels),
``stats`` (paired tests, intervals, Holm's correction), ``zero_shot`` (the run), ``confirmatory``
(the pre-registered test's analysis), ``gap_decay`` (how much a gap's alignment decays the state
against the dense model), ``report`` (tables and figures from a result), ``visualize`` (kept
tokens and hidden attention).
"""
