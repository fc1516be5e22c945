"""Ready-made mask_mods and score_mods for flex attention, named as in torch's attention-gym.

Each ``generate_*`` function returns a scalar function written exactly as a
torch user would write it, with ``jnp``: a ``mask_mod(b, h, q_idx, kv_idx)``
for :func:`jmat.create_block_mask`, or a ``score_mod(score, b, h, q_idx,
kv_idx)`` for :func:`jmat.flex_attention`. Combine masks with
:func:`jmat.attention.and_masks` / :func:`jmat.attention.or_masks`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jmat._src.block_mask import MaskMod, ScoreMod
from jmat._src.block_sparse import causal


def causal_mask(b: Any, h: Any, q_idx: ArrayLike, kv_idx: ArrayLike) -> jax.Array:
  """Causal (top-left): query ``i`` sees keys ``j <= i``; as SDPA's ``is_causal``.

  Example:
    >>> mask = jmat.attention.create_mask(jmat.mods.causal_mask, None, None, 2, 3)
    >>> print(mask[0, 0].astype(int))
    [[1 0 0]
     [1 1 0]]
  """
  del b, h
  return causal(jnp.asarray(q_idx), jnp.asarray(kv_idx))


def generate_causal_offset(offset: ArrayLike) -> MaskMod:
  """Causal with queries shifted by ``offset``: query ``i`` sees keys ``j <= i + offset``.

  For decoding and chunked prefill against a KV cache, where the ``L`` new
  queries are the last ``L`` of the ``S`` positions: ``offset = S - L`` is the
  bottom-right-aligned causal mask. ``offset`` may be an array (a cache
  position that changes every step).

  Example:
    >>> bottom_right = jmat.mods.generate_causal_offset(3 - 2)  # L = 2 queries, S = 3 keys
    >>> print(jmat.attention.create_mask(bottom_right, None, None, 2, 3)[0, 0].astype(int))
    [[1 1 0]
     [1 1 1]]
  """

  def causal_offset(b, h, q_idx, kv_idx):
    del b, h
    return causal(q_idx + offset, kv_idx)

  return causal_offset


def generate_sliding_window(window_size: int) -> MaskMod:
  """Causal sliding window: query ``i`` sees keys ``i - window_size <= j <= i``.

  attention-gym's definition (``window_size + 1`` keys, the query's own
  included); ``jax.nn.dot_product_attention``'s ``local_window_size=(w, 0)``
  is ``generate_sliding_window(w)``. Mistral and Gemma use it.

  Example:
    >>> window = jmat.mods.generate_sliding_window(1)
    >>> print(jmat.attention.create_mask(window, None, None, 4, 4)[0, 0].astype(int))
    [[1 0 0 0]
     [1 1 0 0]
     [0 1 1 0]
     [0 0 1 1]]
  """

  def sliding_window(b, h, q_idx, kv_idx):
    del b, h
    return causal(q_idx, kv_idx) & (q_idx - kv_idx <= window_size)

  return sliding_window


def generate_doc_mask_mod(
    mask_mod: MaskMod, document_id: ArrayLike, kv_document_id: ArrayLike | None = None
) -> MaskMod:
  """``mask_mod`` within each document of a packed sequence; no attention across documents.

  Positions passed to ``mask_mod`` are relative to the start of the document,
  so ``causal_mask`` becomes causal per document. ``document_id`` gives each
  position's document (non-decreasing, as packing produces; attention-gym takes
  offsets instead: ``document_id = jnp.repeat(jnp.arange(n), lengths)``).

  Args:
    mask_mod: the mask inside a document (e.g. :func:`causal_mask`).
    document_id: ``(L,)`` int array, the document of every query position.
    kv_document_id: ``(S,)`` the document of every key; defaults to ``document_id``.

  Returns:
    The mask_mod.

  Example:
    >>> ids = jnp.array([0, 0, 1, 1, 1])
    >>> docs = jmat.mods.generate_doc_mask_mod(jmat.mods.causal_mask, ids)
    >>> print(jmat.attention.create_mask(docs, None, None, 5, 5)[0, 0].astype(int))
    [[1 0 0 0 0]
     [1 1 0 0 0]
     [0 0 1 0 0]
     [0 0 1 1 0]
     [0 0 1 1 1]]
  """
  q_docs = jnp.asarray(document_id)
  kv_docs = q_docs if kv_document_id is None else jnp.asarray(kv_document_id)
  q_starts = _document_starts(q_docs)
  kv_starts = _document_starts(kv_docs)

  def doc_mask(b, h, q_idx, kv_idx):
    same = q_docs[q_idx] == kv_docs[kv_idx]
    inner = mask_mod(b, h, q_idx - q_starts[q_idx], kv_idx - kv_starts[kv_idx])
    return same & inner

  return doc_mask


def _document_starts(document_id: jax.Array) -> jax.Array:
  """Per position, the first position of its document (ids non-decreasing)."""
  positions = jnp.arange(document_id.shape[0])
  first = jnp.searchsorted(document_id, document_id, side="left")
  return jnp.minimum(first, positions)


def generate_prefix_lm_mask(prefix_length: ArrayLike) -> MaskMod:
  """Prefix-LM: the first ``prefix_length`` positions attend to each other, the rest causally.

  Example:
    >>> prefix = jmat.mods.generate_prefix_lm_mask(2)
    >>> print(jmat.attention.create_mask(prefix, None, None, 4, 4)[0, 0].astype(int))
    [[1 1 0 0]
     [1 1 0 0]
     [1 1 1 0]
     [1 1 1 1]]
  """

  def prefix_lm(b, h, q_idx, kv_idx):
    del b, h
    return (kv_idx < prefix_length) | causal(q_idx, kv_idx)

  return prefix_lm


def generate_tanh_softcap(soft_cap: float, approx: bool = False) -> ScoreMod:
  """Logit soft-capping (Gemma 2): ``score -> soft_cap * tanh(score / soft_cap)``.

  ``approx`` is accepted for attention-gym compatibility; JAX's ``tanh`` is
  used either way (XLA picks the fast form).

  Example:
    >>> cap = jmat.mods.generate_tanh_softcap(2.0)
    >>> round(float(cap(jnp.float32(100.0), 0, 0, 0, 0)), 4)
    2.0
  """
  del approx

  def tanh_softcap(score, b, h, q_idx, kv_idx):
    del b, h, q_idx, kv_idx
    return soft_cap * jnp.tanh(score / soft_cap)

  return tanh_softcap


def generate_alibi_bias(num_heads: int) -> ScoreMod:
  """ALiBi (Press et al. 2022): head ``h`` adds ``slope_h * (kv_idx - q_idx)`` to the score.

  ``slope_h = 2 ** (-8 (h + 1) / num_heads)``, attention-gym's formula.

  Example:
    >>> alibi = jmat.mods.generate_alibi_bias(8)
    >>> float(alibi(jnp.float32(0.0), 0, 0, 5, 3))  # head 0, slope 1/2, distance -2
    -1.0
  """

  def alibi(score, b, h, q_idx, kv_idx):
    del b
    # In the score's dtype throughout (no float64 from Python floats under jax_enable_x64,
    # which a TPU kernel could not lower).
    dtype = jnp.result_type(score)
    slope = jnp.exp2((jnp.asarray(h) + 1).astype(dtype) * (-8.0 / num_heads))
    return score + slope * (jnp.asarray(kv_idx) - jnp.asarray(q_idx)).astype(dtype)

  return alibi


def generate_relative_bias(table: ArrayLike) -> ScoreMod:
  """A learnable relative-position bias: adds ``table[h, kv_idx - q_idx + D]``.

  ``table`` has shape ``(H, 2 D + 1)``: one entry per head and relative
  distance ``-D .. D`` (``D = L - 1`` covers every pair of a length-``L``
  sequence). Gradients reach ``table`` through :func:`jmat.flex_attention`.

  Example:
    >>> table = jnp.arange(10.0).reshape(2, 5)  # 2 heads, distances -2..2 for L = S = 3
    >>> bias = jmat.mods.generate_relative_bias(table)
    >>> float(bias(jnp.float32(0.0), 0, 1, 0, 2))  # head 1, distance +2 -> table[1, 4]
    9.0
  """
  table = jnp.asarray(table)
  middle = (table.shape[-1] - 1) // 2

  def relative_bias(score, b, h, q_idx, kv_idx):
    del b
    return score + table[h, kv_idx - q_idx + middle].astype(jnp.result_type(score))

  return relative_bias
