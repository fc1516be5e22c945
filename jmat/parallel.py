"""jmat over a device mesh: ring attention (sequence parallelism) and its block helpers.

Products and :func:`jmat.scaled_dot_product_attention` need no special entry
point to run sharded: give them inputs placed with ``NamedSharding`` and jit's
partitioner splits them (see ``docs/distributed.md``).
"""

from jmat._src.parallel import allgather_attention, block_is_masked, ring_attention

__all__ = ["allgather_attention", "block_is_masked", "ring_attention"]
