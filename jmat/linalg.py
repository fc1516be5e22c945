"""``jmat.linalg``: the products of ``torch.linalg`` (a namespace of re-exports).

``jmat.linalg.matmul`` is :func:`jmat.matmul`, ``jmat.linalg.multi_dot`` is
:func:`jmat.multi_dot`; ``vecdot`` lives only here, as in torch.
"""

from jmat._src.family import multi_dot, vecdot
from jmat._src.products import matmul

__all__ = ["matmul", "multi_dot", "vecdot"]
