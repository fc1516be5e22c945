"""jmat over a device mesh: ring attention (sequence parallelism), its block helpers and layouts.

Products and :func:`jmat.scaled_dot_product_attention` need no special entry
point to run sharded: give them inputs placed with ``NamedSharding`` and jit's
partitioner splits them (see ``docs/distributed.md``).
"""

from jmat._src.layouts import from_layout, to_layout, work_per_device
from jmat._src.parallel import allgather_attention, block_is_masked, ring_attention

__all__ = [
    "allgather_attention",
    "block_is_masked",
    "from_layout",
    "ring_attention",
    "to_layout",
    "work_per_device",
]
