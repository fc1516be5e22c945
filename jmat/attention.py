"""Attention, as ``torch.nn.functional`` spells it: scores, scaled dot-product and multi-head.

A thin namespace module (like ``torch.linalg``): everything lives in
``jmat._src.attention``. The online-softmax functions are the building blocks
of the blockwise implementation, exported for attention over device meshes.
"""

from jmat._src.attention import (
    attention_scores,
    init_multi_head_attention,
    multi_head_attention,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_update,
    scaled_dot_product_attention,
)
from jmat._src.interop import flax_attention_fn

__all__ = [
    "attention_scores",
    "flax_attention_fn",
    "init_multi_head_attention",
    "multi_head_attention",
    "online_softmax_finish",
    "online_softmax_init",
    "online_softmax_update",
    "scaled_dot_product_attention",
]
