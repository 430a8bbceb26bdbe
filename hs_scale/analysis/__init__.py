"""Head analysis of decoder-only LMs: LAHIS importance scores, head ablation, soft head-mask adaptation, plots."""
