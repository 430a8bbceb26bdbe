"""hs_scale: distributed training with per-language / per-domain attention head selection.

Gong et al., "Pay Better Attention to Attention: Head Selection in Multilingual and Multi-Domain Sequence
Modeling" (NeurIPS 2021). Every attention layer owns a pool of H' heads; each task (language or domain) uses H.
"""

__version__ = "0.1.0"
