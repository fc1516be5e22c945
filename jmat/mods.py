"""Ready-made mask_mods and score_mods for :func:`jmat.flex_attention` (attention-gym's names).

A thin namespace module: everything lives in ``jmat._src.mods``.
"""

from jmat._src.mods import (
    causal_mask,
    generate_alibi_bias,
    generate_causal_offset,
    generate_doc_mask_mod,
    generate_prefix_lm_mask,
    generate_relative_bias,
    generate_sliding_window,
    generate_tanh_softcap,
)

__all__ = [
    "causal_mask",
    "generate_alibi_bias",
    "generate_causal_offset",
    "generate_doc_mask_mod",
    "generate_prefix_lm_mask",
    "generate_relative_bias",
    "generate_sliding_window",
    "generate_tanh_softcap",
]
