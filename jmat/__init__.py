"""jmat: PyTorch's matrix-product family and attention as pure, jitted JAX functions.

torch's exact shape, broadcasting and dtype semantics; errors that name the
operation, the shapes and what would be valid; ``jmat.explain`` to see how a
result shape is derived.
"""

from jmat import attention, linalg, mods, parallel
from jmat._src.attention import (
    attention_scores,
    init_multi_head_attention,
    multi_head_attention,
    scaled_dot_product_attention,
)
from jmat._src.block_mask import create_block_mask
from jmat._src.checks import ShapeError
from jmat._src.family import (
    addbmm,
    addmm,
    addmv,
    addr,
    baddbmm,
    chain_matmul,
    inner,
    linear,
    multi_dot,
    outer,
    tensordot,
    vdot,
)
from jmat._src.flex_attention import flex_attention
from jmat._src.products import bmm, dot, matmul, mm, mv
from jmat._src.shapes import explain, matmul_shape
from jmat._src.varlen import varlen_attn

__version__ = "0.1.0"

__all__ = [
    "ShapeError",
    "addbmm",
    "addmm",
    "addmv",
    "addr",
    "attention",
    "attention_scores",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "create_block_mask",
    "dot",
    "explain",
    "flex_attention",
    "init_multi_head_attention",
    "inner",
    "linalg",
    "linear",
    "matmul",
    "matmul_shape",
    "mm",
    "mods",
    "multi_dot",
    "multi_head_attention",
    "mv",
    "outer",
    "parallel",
    "scaled_dot_product_attention",
    "tensordot",
    "varlen_attn",
    "vdot",
]
