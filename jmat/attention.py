"""Attention, as ``torch.nn.functional`` spells it: scores, scaled dot-product and multi-head.

A thin namespace module (like ``torch.linalg``): everything lives in
``jmat._src.attention``.
"""

from jmat._src.attention import (
    online_softmax_finish,
    online_softmax_init,
    online_softmax_update,
)

__all__ = [
    "online_softmax_finish",
    "online_softmax_init",
    "online_softmax_update",
]
