"""Attention, as torch spells it: scores, scaled dot-product, multi-head and flex attention.

A thin namespace module (like ``torch.nn.attention``): everything lives in
``jmat._src``. ``flex_attention`` with ``create_block_mask`` and the mask
combinators is torch's ``torch.nn.attention.flex_attention``; ready-made
mask_mods and score_mods are in :mod:`jmat.mods`. The online-softmax functions
are the building blocks of every kernel, exported for attention over device
meshes. ``PagedAttention`` is torch's page table for flex attention over a
paged key/value cache.
"""

from jmat._src.attention import (
    attention_scores,
    init_multi_head_attention,
    multi_head_attention,
    scaled_dot_product_attention,
)
from jmat._src.backends import kernel_platforms
from jmat._src.block_mask import (
    BlockMask,
    and_masks,
    create_block_mask,
    create_mask,
    noop_mask,
    or_masks,
)
from jmat._src.flex_attention import (
    AuxOutput,
    AuxRequest,
    flex_attention,
    flex_attention_backend,
)
from jmat._src.interop import flax_attention_fn
from jmat._src.online_softmax import (
    online_softmax_finish,
    online_softmax_fold,
    online_softmax_init,
    online_softmax_logsumexp,
    online_softmax_update,
)
from jmat._src.paged import PagedAttention
from jmat._src.varlen import varlen_attn

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BlockMask",
    "PagedAttention",
    "and_masks",
    "attention_scores",
    "create_block_mask",
    "create_mask",
    "flax_attention_fn",
    "flex_attention",
    "flex_attention_backend",
    "init_multi_head_attention",
    "kernel_platforms",
    "multi_head_attention",
    "noop_mask",
    "online_softmax_finish",
    "online_softmax_fold",
    "online_softmax_init",
    "online_softmax_logsumexp",
    "online_softmax_update",
    "or_masks",
    "scaled_dot_product_attention",
    "varlen_attn",
]
