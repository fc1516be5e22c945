"""torch.nn.functional's attention: scores = q @ k^T, scaled dot-product and multi-head.

Two implementations of :func:`scaled_dot_product_attention`: dense (the whole
``(L, S)`` score matrix, for short sequences, dropout and returned weights) and
blockwise, a user of the block-sparse kernel (:mod:`jmat._src.block_sparse`)
that flex attention and ring attention share: causal is a block map, dense
masks are sliced per block, and memory stays O(L * E).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jmat._src import backends, block_sparse, checks, online_softmax
from jmat._src.family import linear
from jmat._src.products import matmul, operands

Implementation = Literal["dense", "blockwise", "pallas", "cudnn"] | None


# --- scores ---------------------------------------------------------------------------------

_NAMES = ("query", "key", "value")
_SDPA = "scaled_dot_product_attention"


def _scores(query: jax.Array, key: jax.Array, scale: ArrayLike | None, dtype: DTypeLike):
  """``scale * query @ key^T``, the heart of attention: one jmat.matmul, in ``dtype``."""
  scores = matmul(query, jnp.swapaxes(key, -2, -1), preferred_element_type=dtype)
  return scores if scale is None else scores * jnp.asarray(scale, dtype)


@jax.jit
def attention_scores(
    query: ArrayLike, key: ArrayLike, /, *, scale: ArrayLike | None = None
) -> jax.Array:
  """The attention scores ``query @ key^T`` (times ``scale`` when given).

  Each query vector is compared with each key vector by a dot product: entry
  ``[..., i, j]`` is ``sum_e query[..., i, e] * key[..., j, e]``. Leading
  (batch, head) dims broadcast as in :func:`jmat.matmul`, which computes it.

  Args:
    query: array of shape ``(..., L, E)``.
    key: array of shape ``(..., S, E)``, of the same dtype.
    scale: optional factor applied to the product, e.g. ``1 / sqrt(E)``.

  Returns:
    Array of shape ``(..., L, S)`` and the inputs' dtype.

  Raises:
    ShapeError: if an input is not at least 2-D, the ``E`` differ or the leading
      dims do not broadcast.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> q = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> k = jnp.array([[1.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    >>> print(jmat.attention_scores(q, k))
    [[1. 3. 0.]
     [2. 0. 2.]]
    >>> jmat.attention_scores(jnp.ones((2, 8, 5, 4)), jnp.ones((1, 8, 7, 4)), scale=0.5).shape
    (2, 8, 5, 7)
  """
  query, key = operands("attention_scores", query, key, names=_NAMES[:2])
  checks.check_scores_shapes("attention_scores", query.shape, key.shape)
  if scale is not None:
    checks.check_attention_scale("attention_scores", scale)
  return _scores(query, key, scale, query.dtype)


# --- the two implementations, on one canonical layout -----------------------------------------
#
# q (*lead, G, L, E), k (*lead, S, E), v (*lead, S, Ev): G query heads share each key/value
# head (G = 1 without grouped-query attention). allowed (bool) and bias (float) have the rank
# of q's scores (*lead, G, L, S), with size-1 dims wherever they broadcast.


def _positions_allowed(
    q_start: ArrayLike, q_len: int, k_start: ArrayLike, k_len: int, keys: int, is_causal: bool
) -> jax.Array:
  """Which (query, key) pairs of a block exist and, if causal, are at or below the diagonal.

  Causal is torch's top-left-aligned ``tril(ones(L, S))``: query ``i`` sees keys ``j <= i``.
  """
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (q_len, k_len), 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (q_len, k_len), 1)
  allowed = jnp.less(k_pos, keys)
  return jnp.logical_and(allowed, block_sparse.causal(q_pos, k_pos)) if is_causal else allowed


def _softmax_weights(scores: jax.Array, allowed: jax.Array | None) -> jax.Array:
  """softmax over the last axis with masked entries at 0 and all-masked rows 0 (not NaN)."""
  if allowed is not None:
    scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True, initial=-jnp.inf))
  p = jnp.exp(scores - jnp.where(jnp.isneginf(row_max), 0.0, row_max))
  row_sum = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(row_sum > 0, row_sum, 1.0)


def _dense(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: jax.Array | None,
    bias: jax.Array | None,
    scale: ArrayLike,
    is_causal: bool,
    dropout_p: float,
    dropout_rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
  """Attention with the whole ``(L, S)`` score matrix: returns (output, weights after dropout)."""
  dtype = online_softmax.compute_dtype(q.dtype)
  length, keys = q.shape[-2], k.shape[-2]
  scores = _scores(q, k[..., None, :, :], scale, dtype)
  if bias is not None:
    scores = scores + bias.astype(dtype)
  if is_causal or allowed is not None:
    causal = _positions_allowed(0, length, 0, keys, keys, is_causal)
    allowed = causal if allowed is None else allowed & causal
  weights = _softmax_weights(scores, allowed)
  dropped = weights
  if dropout_p == 1.0:
    dropped = jnp.zeros_like(weights)
  elif dropout_p > 0.0:
    keep = jax.random.bernoulli(cast(jax.Array, dropout_rng), 1.0 - dropout_p, weights.shape)
    dropped = jnp.where(keep, weights / (1.0 - dropout_p), 0.0)
  out = matmul(dropped, v[..., None, :, :].astype(dtype))
  return out.astype(q.dtype), dropped


# --- scaled_dot_product_attention -------------------------------------------------------------

# implementation=None switches to the blockwise kernel once the (L, S) scores of all batch and
# head dims would pass this many elements (1 MiB at float32). Measured on a 2-core CPU (H=8,
# D=64, causal): below it both take the same time and dense compiles in half the time; above
# it blockwise is faster, forward and backward (1.2x at L=256, 2-4x from L=1024 on, where the
# dense scores leave the caches), and its memory stays O(L * E). README: attention section.
DENSE_MAX_SCORES = 1 << 18


def _canonical_mask(mask: jax.Array, lead: tuple[int, ...], enable_gqa: bool,
                    kv_heads: int) -> jax.Array:
  """Reshapes a mask broadcastable to ``(*lead, L, S)`` to the canonical ``(*lead', G', L, S)``."""
  mask = mask.reshape((1,) * (len(lead) + 2 - mask.ndim) + mask.shape)
  if not enable_gqa:
    return mask[..., None, :, :]
  heads = mask.shape[-3]
  split = (kv_heads, heads // kv_heads) if heads > 1 else (1, 1)
  return mask.reshape(mask.shape[:-3] + split + mask.shape[-2:])


def _flat_lead(x: jax.Array, lead: tuple[int, ...]) -> jax.Array:
  """``(*lead, G, A, B)`` -> ``(N, G, A, B)``: one batch dim (1 if ``x`` broadcasts over all
  of ``lead``)."""
  head, rest = x.shape[:len(lead)], x.shape[len(lead):]
  if all(d == 1 for d in head):
    return x.reshape((1,) + rest)
  return jnp.broadcast_to(x, lead + rest).reshape((math.prod(lead),) + rest)


def _attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    lead: tuple[int, ...],
    allowed: jax.Array | None,
    bias: jax.Array | None,
    scale: ArrayLike,
    is_causal: bool,
    enable_gqa: bool,
    dropout_p: float,
    dropout_rng: jax.Array | None,
    implementation: Implementation,
    need_weights: bool = False,
    block_size: tuple[int, int] = (512, 512),
    options: backends.KernelOptions = backends.DEFAULT,
) -> tuple[jax.Array, jax.Array | None]:
  """Attention on checked inputs; masks broadcastable to ``(*lead, L, S)``.

  Returns:
    ``(output (*lead, L, Ev), weights (*lead, L, S) or None)``.
  """
  length, dim = query.shape[-2:]
  keys, v_dim = value.shape[-2:]
  if enable_gqa:
    batch, heads = lead[:-1], lead[-1]
    if key.shape[-3] != value.shape[-3]:
      # torch also accepts different key and value head counts: repeat both to query's.
      key = jnp.repeat(key, heads // key.shape[-3], axis=-3)
      value = jnp.repeat(value, heads // value.shape[-3], axis=-3)
    kv_heads = key.shape[-3]
    group = heads // kv_heads
    q = jnp.broadcast_to(query, batch + (heads, length, dim))
    q = q.reshape(batch + (kv_heads, group, length, dim))
    k = jnp.broadcast_to(key, batch + (kv_heads, keys, dim))
    v = jnp.broadcast_to(value, batch + (kv_heads, keys, v_dim))
  else:
    kv_heads = 1
    q = jnp.broadcast_to(query, lead + (length, dim))[..., None, :, :]
    k = jnp.broadcast_to(key, lead + (keys, dim))
    v = jnp.broadcast_to(value, lead + (keys, v_dim))
  if allowed is not None:
    allowed = _canonical_mask(allowed, lead, enable_gqa, kv_heads)
  if bias is not None:
    bias = _canonical_mask(bias, lead, enable_gqa, kv_heads)
  if implementation is None:
    scores = math.prod(lead) * length * keys
    dense = need_weights or dropout_p > 0.0 or scores <= DENSE_MAX_SCORES
    implementation = "dense" if dense else "blockwise"
  weights = None
  if implementation == "dense" or length == 0 or keys == 0:  # nothing to block when empty
    out, weights = _dense(q, k, v, allowed, bias, scale, is_causal, dropout_p, dropout_rng)
    weights = weights.reshape(lead + (length, keys)) if need_weights else None
  else:
    # One flat batch dim: the kernel's (M=1, R=N, G, L, E) layout.
    kv_lead = k.shape[:-2]
    batch = math.prod(kv_lead)
    q, allowed, bias = (None if x is None else _flat_lead(x, kv_lead)[None]
                        for x in (q, allowed, bias))
    k = k.reshape((1, batch) + k.shape[-2:])
    v = v.reshape((1, batch) + v.shape[-2:])
    call = _blockwise(cast(jax.Array, q), k, v, allowed, bias, scale, is_causal, block_size)
    override = None
    if implementation == "cudnn" or (implementation is None and options.backend == "AUTO"):
      override = _cudnn_or(call, allowed, bias, is_causal, required=implementation == "cudnn")
    if implementation == "pallas":
      options = dataclasses.replace(options, backend="PALLAS")
    out = backends.attend(_SDPA, call, options, override=override)[0]
  return out.reshape(lead + (length, v_dim)), weights


def _cudnn_reason(call: block_sparse.Call, allowed, bias, is_causal: bool) -> str | None:
  """Why ``jax.nn.dot_product_attention(implementation="cudnn")`` cannot run ``call``, or None."""
  length, keys, dim = call.q.shape[-2], call.k.shape[-2], call.q.shape[-1]
  if call.q.dtype not in (jnp.float16, jnp.bfloat16):
    return f"cuDNN takes float16 or bfloat16, the inputs are {call.q.dtype}"
  if allowed is not None or bias is not None:
    return "jmat hands cuDNN causal or unmasked attention only, not an attn_mask"
  if is_causal and length != keys:
    return f"cuDNN's causal mask is not torch's top-left one when L ({length}) != S ({keys})"
  if dim % 8 or dim > 128 or call.v.shape[-1] != dim:
    return f"cuDNN needs E = Ev, a multiple of 8 up to 128 (E = {dim}, Ev = {call.v.shape[-1]})"
  return None


def _cudnn_or(call: block_sparse.Call, allowed, bias, is_causal: bool, *, required: bool):
  """The platform branches that run cuDNN: on cuda when it can (``required``: everywhere, or
  refused with the reason); None when it cannot."""
  reason = _cudnn_reason(call, allowed, bias, is_causal)
  if reason is not None:
    if required:
      checks.refuse_backend(_SDPA, "cudnn", reason)
    return None

  def cudnn(call: block_sparse.Call):
    # (1, N, G, L, E) -> jax.nn's (N, L, heads, E): the G query heads share one key/value head.
    q = jnp.swapaxes(call.q[0], 1, 2)
    k, v = (x[0][:, :, None, :] for x in (call.k, call.v))
    # The scale goes into the queries: cuDNN takes it as a static attribute, jmat's may be traced.
    q = (q * call.scale).astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=is_causal,
                                       implementation="cudnn")
    return (jnp.swapaxes(out, 1, 2)[None],)

  try:  # cuDNN absent (a CPU machine lowering for cuda): jax says so at trace time
    jax.eval_shape(cudnn, call)
  except RuntimeError as error:
    if required:
      raise checks.cudnn_absent(_SDPA, error) from None
    return None
  if required:
    return {platform: cudnn for platform in backends.PLATFORMS}
  return {"cuda": cudnn}


def _blockwise(q, k, v, allowed, bias, scale, is_causal: bool,
               block_size: tuple[int, int]) -> block_sparse.Call:
  """SDPA as a call of the block-sparse kernel: causal is a block map, dense masks are sliced
  per block."""
  length, keys = q.shape[-2], k.shape[-2]
  block_q, block_k = (block_sparse.block_for(n, b)
                      for n, b in zip((length, keys), block_size, strict=True))
  if is_causal:
    blocks = block_sparse.causal_key_blocks(length, keys, block_q, block_k)
    if allowed is not None:  # the dense mask applies in every block: none is full
      blocks = blocks._replace(num=blocks.num + blocks.full_num,
                               full_num=jnp.zeros_like(blocks.full_num))
  else:
    blocks = block_sparse.dense_key_blocks(length, keys, block_q, block_k,
                                           masked=allowed is not None)
  # The blocked operands: the bool mask first if there is one, the float mask last.
  blocked = tuple(x for x in (allowed, bias) if x is not None)
  allowed_at, bias_at = 0, len(blocked) - 1

  def mask(m, r, g, q_pos, k_pos, operands):
    del m, r, g
    visible = operands.blocked[allowed_at] if allowed is not None else jnp.ones((), jnp.bool_)
    if is_causal:
      visible = visible & block_sparse.causal(q_pos[:, None], k_pos[None, :])
    return visible

  def add_bias(s, m, r, g, q_pos, k_pos, operands):
    del m, r, g, q_pos, k_pos
    return s + operands.blocked[bias_at]

  # Declared causal, the Triton kernel lists causal tiles at its own tile, not at block_size.
  causal = None if not is_causal else "exact" if allowed is None else "within"
  mods = block_sparse.Mods(add_bias if bias is not None else None,
                           mask if is_causal or allowed is not None else None, causal)
  return block_sparse.Call(q, k, v, blocks, block_sparse.Operands((), blocked), scale,
                           mods=mods, block_q=block_q, block_k=block_k, chains=2)


def scaled_dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    attn_mask: ArrayLike | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: ArrayLike | None = None,
    enable_gqa: bool = False,
    *,
    dropout_rng: jax.Array | None = None,
    implementation: Implementation = None,
    block_size: int | tuple[int, int] = 512,
    kernel_options: dict[str, Any] | None = None,
) -> jax.Array:
  """``softmax(query @ key^T * scale + mask) @ value``, as ``torch.nn.functional``'s SDPA.

  torch 2.13's semantics: leading (batch, head) dims broadcast; ``Ev`` may differ
  from ``E``; a boolean ``attn_mask`` says which pairs may attend (True = may),
  a float one is added to the scaled scores; ``is_causal`` lets query ``i`` see
  keys ``j <= i`` (the top-left-aligned ``tril(ones(L, S))`` when ``L != S``);
  given together, ``attn_mask`` and ``is_causal`` both apply (torch's CPU flash
  kernel does the same; its math kernel refuses the pair). A query whose keys
  are all masked gets 0, not NaN, in the output and in the gradients.

  Args:
    query: ``(N..., L, E)``.
    key: ``(N..., S, E)``; with ``enable_gqa``, dim -3 (heads) may divide query's.
    value: ``(N..., S, Ev)``.
    attn_mask: bool, float32 or query-dtype array broadcastable to ``(N..., L, S)``,
      at least 2-D.
    dropout_p: probability of dropping an attention weight (the rest are scaled
      by ``1 / (1 - dropout_p)``); needs ``dropout_rng``.
    is_causal: apply the causal mask.
    scale: factor for the scores (a number or a 0-d array, differentiable); default
      ``1 / sqrt(E)``.
    enable_gqa: grouped-query attention: query head ``h`` uses key/value head
      ``h // (query_heads // kv_heads)``, as torch's ``repeat_interleave``.
    dropout_rng: a ``jax.random.key``; the dropout pattern is a function of it.
    implementation: ``"dense"`` materialises the ``(L, S)`` scores;
      ``"blockwise"`` folds key blocks into query blocks (``block_size``) with the
      online softmax, skips blocks a causal mask hides and recomputes blocks in
      its backward, so memory is O(L * E), on the XLA loops on CPU and the
      fused Pallas kernel on a GPU or TPU (``kernel_options`` says which);
      ``"pallas"`` is blockwise on the Pallas kernel of the platform (Triton on
      GPUs, Mosaic on TPUs; the Triton kernel in interpret mode elsewhere);
      ``"cudnn"`` is ``jax.nn.dot_product_attention(implementation="cudnn")``
      (float16/bfloat16, causal or no mask, ``E = Ev`` a multiple of 8 up to
      128; refused otherwise). ``None`` picks dense while all the scores hold at
      most ``DENSE_MAX_SCORES`` (2**18) elements, or when dropout is on;
      blockwise otherwise, with cuDNN on a GPU where it can run the call.
    block_size: the blockwise implementation's query and key block sizes (an
      int or a pair; 512 was fastest on a 2-core CPU at H=8, D=64). Shorter
      sequences are one block of their own length.
    kernel_options: the blockwise kernel's backend, as flex_attention's
      (``{"BACKEND": "AUTO" | "XLA" | "TRITON" | "MOSAIC", "INTERPRET": bool,
      ...}``).

  Returns:
    Array of shape ``(N..., L, Ev)`` and the query's dtype.

  Raises:
    ShapeError: inputs below 2-D, ``E`` or ``S`` mismatches, leading dims or
      the mask that do not broadcast, heads that do not divide with ``enable_gqa``.
    TypeError: dtypes that differ or are not floating; a mask of another dtype;
      ``is_causal`` or ``enable_gqa`` that is no bool.
    ValueError: ``dropout_p`` outside [0, 1], dropout without ``dropout_rng``,
      an unknown ``implementation``, dropout with ``"blockwise"``.

  Example:
    >>> q = k = v = jnp.ones((2, 8, 5, 4))
    >>> jmat.scaled_dot_product_attention(q, k, v, is_causal=True).shape
    (2, 8, 5, 4)
    >>> q = jnp.array([[1.0, 0.0]])
    >>> k = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = jnp.array([[10.0], [20.0]])
    >>> print(jmat.scaled_dot_product_attention(q, k, v, jnp.array([[False, True]])))
    [[20.]]
  """
  return _sdpa(query, key, value, attn_mask, dropout_p, checks.check_flag(_SDPA, "is_causal",
                                                                          is_causal),
               scale, checks.check_flag(_SDPA, "enable_gqa", enable_gqa),
               dropout_rng=dropout_rng, implementation=implementation, block_size=block_size,
               options=backends.kernel_options(_SDPA, kernel_options))


@functools.partial(
    jax.jit,
    static_argnames=("dropout_p", "is_causal", "enable_gqa", "implementation", "block_size",
                     "options"),
)
def _sdpa(query, key, value, attn_mask, dropout_p: float, is_causal: bool, scale,
          enable_gqa: bool, *, dropout_rng, implementation: Implementation,
          block_size: int | tuple[int, int], options: backends.KernelOptions) -> jax.Array:
  """:func:`scaled_dot_product_attention` with checked ``kernel_options``, jitted."""
  op = "scaled_dot_product_attention"
  query, key, value = operands(op, query, key, value, names=_NAMES)
  checks.check_attention_dtypes(op, [x.dtype for x in (query, key, value)], _NAMES)
  lead = checks.check_attention_shapes(op, query.shape, key.shape, value.shape, enable_gqa)
  checks.check_dropout(op, dropout_p, dropout_rng is not None)
  checks.check_attention_implementation(op, implementation, dropout_p)
  blocks = checks.check_block_size(op, block_size)
  length, keys = query.shape[-2], key.shape[-2]
  allowed = bias = None
  if attn_mask is not None:
    attn_mask = jnp.asarray(attn_mask)
    checks.check_attention_mask(op, attn_mask.shape, attn_mask.dtype, query.dtype,
                                lead + (length, keys))
    if attn_mask.dtype == jnp.bool_:
      allowed = attn_mask
    else:
      bias = attn_mask
  scale = online_softmax.attention_scale(op, scale, query.shape[-1],
                                         online_softmax.compute_dtype(query.dtype))
  out, _ = _attention(query, key, value, lead, allowed, bias, scale, is_causal, enable_gqa,
                      dropout_p, dropout_rng, implementation, block_size=blocks,
                      options=options)
  return out


# --- multi-head attention with torch.nn.MultiheadAttention's parameters -----------------------

_MHA_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def init_multi_head_attention(
    rng: jax.Array, embed_dim: int, num_heads: int, /, *, dtype: DTypeLike = jnp.float32
) -> dict[str, jax.Array]:
  """Parameters of ``torch.nn.MultiheadAttention(embed_dim, num_heads)``, initialised as torch.

  ``in_proj_weight`` is Xavier-uniform over ``(3E, E)`` (bound
  ``sqrt(6 / (E + 3E))``), ``out_proj.weight`` uniform in ``±1 / sqrt(E)``
  (torch's Linear default), both biases zero.

  Args:
    rng: a ``jax.random.key``.
    embed_dim: ``E``, the model dimension.
    num_heads: the number of heads; must divide ``embed_dim``.
    dtype: the parameters' dtype.

  Returns:
    A dict with torch's state_dict keys and shapes: ``in_proj_weight (3E, E)``,
    ``in_proj_bias (3E,)``, ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``.

  Raises:
    ValueError: if ``num_heads`` does not divide ``embed_dim``.

  Example:
    >>> params = jmat.init_multi_head_attention(jax.random.key(0), 16, 4)
    >>> {name: p.shape for name, p in params.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'in_proj_weight': (48, 16), 'in_proj_bias': (48,), 'out_proj.weight': (16, 16),
     'out_proj.bias': (16,)}
  """
  if (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1
      or embed_dim % num_heads):
    raise ValueError(
        f"jmat.init_multi_head_attention: num_heads={num_heads!r} must be a positive int "
        f"dividing embed_dim={embed_dim}"
    )
  in_key, out_key = jax.random.split(rng)
  in_bound = math.sqrt(6.0 / (embed_dim + 3 * embed_dim))
  out_bound = 1.0 / math.sqrt(embed_dim) if embed_dim else 0.0
  return {
      "in_proj_weight": jax.random.uniform(in_key, (3 * embed_dim, embed_dim), dtype,
                                           -in_bound, in_bound),
      "in_proj_bias": jnp.zeros((3 * embed_dim,), dtype),
      "out_proj.weight": jax.random.uniform(out_key, (embed_dim, embed_dim), dtype,
                                            -out_bound, out_bound),
      "out_proj.bias": jnp.zeros((embed_dim,), dtype),
  }


def _mha_mask(mask: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
  """torch's MHA mask convention (bool True = may NOT attend) as (allowed, bias)."""
  return (~mask, None) if mask.dtype == jnp.bool_ else (None, mask)


def _combine(first: jax.Array | None, second: jax.Array | None, join) -> jax.Array | None:
  if first is None:
    return second
  return first if second is None else join(first, second)


@functools.partial(
    jax.jit,
    static_argnames=("num_heads", "is_causal", "need_weights", "average_attn_weights",
                     "dropout_p"),
)
def multi_head_attention(
    params: dict[str, ArrayLike],
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    /,
    *,
    num_heads: int,
    key_padding_mask: ArrayLike | None = None,
    attn_mask: ArrayLike | None = None,
    is_causal: bool = False,
    need_weights: bool = False,
    average_attn_weights: bool = True,
    dropout_p: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """``torch.nn.MultiheadAttention(E, num_heads, batch_first=True)`` as a pure function.

  ``params`` holds the module's state_dict, so torch weights load as they are:
  ``{k: jnp.asarray(v.numpy()) for k, v in module.state_dict().items()}``.
  Queries, keys and values are projected with the three ``(E, E)`` slices of
  ``in_proj_weight``, split into ``num_heads`` heads of ``E / num_heads``,
  attended with :func:`scaled_dot_product_attention` and recombined by
  ``out_proj``.

  Masks follow torch's MHA convention, the opposite of SDPA's for booleans:
  ``key_padding_mask`` True means *ignore that key*, a boolean ``attn_mask``
  True means *may not attend*; float masks are added to the scores.
  ``is_causal=True`` applies the causal mask (together with ``attn_mask`` if
  given; torch treats it as a hint that ``attn_mask`` is causal and refuses it
  alone). A query with every key masked gives 0 (torch's ``need_weights=True``
  path gives NaN there).

  Args:
    params: ``in_proj_weight (3E, E)``, ``in_proj_bias (3E,)``,
      ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``.
    query: ``(N, L, E)`` (or unbatched ``(L, E)``).
    key: ``(N, S, E)`` (or ``(S, E)``).
    value: ``(N, S, E)`` (or ``(S, E)``).
    num_heads: the number of heads; divides ``E``.
    key_padding_mask: ``(N, S)`` (or ``(S,)``), bool (True = ignore) or float.
    attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``, bool (True = may not
      attend) or float.
    is_causal: apply the causal mask.
    need_weights: also return the attention weights (computed densely).
    average_attn_weights: average the returned weights over heads.
    dropout_p: dropout probability on the attention weights; needs ``dropout_rng``.
    dropout_rng: a ``jax.random.key``.

  Returns:
    ``(output (N, L, E), weights)``; weights are ``None`` unless ``need_weights``,
    then ``(N, L, S)`` averaged or ``(N, num_heads, L, S)``.

  Raises:
    ShapeError: inputs that are not all 3-D (or all 2-D), sizes that disagree with
      the parameters, masks of the wrong shape.
    ValueError: missing parameters, ``num_heads`` not dividing ``E``, dropout
      without ``dropout_rng``.
    TypeError: dtypes that differ or are not floating.

  Example:
    >>> params = jmat.init_multi_head_attention(jax.random.key(0), 8, 2)
    >>> x = jnp.ones((3, 5, 8), jnp.float32)
    >>> out, weights = jmat.multi_head_attention(params, x, x, x, num_heads=2, need_weights=True)
    >>> out.shape, weights.shape
    ((3, 5, 8), (3, 5, 5))
  """
  op = "multi_head_attention"
  query, key, value = operands(op, query, key, value, names=_NAMES)
  weights_in = {name: jnp.asarray(p) for name, p in params.items()}
  checks.check_multi_head_attention(op, {n: p.shape for n, p in weights_in.items()},
                                    query.shape, key.shape, value.shape, num_heads)
  dtypes = [query.dtype, key.dtype, value.dtype] + [weights_in[n].dtype for n in _MHA_KEYS]
  checks.check_attention_dtypes(op, dtypes, _NAMES + _MHA_KEYS)
  checks.check_dropout(op, dropout_p, dropout_rng is not None)
  batched = query.ndim == 3
  if not batched:
    query, key, value = query[None], key[None], value[None]
  batch, length, embed = query.shape
  keys = key.shape[1]
  head_dim = embed // num_heads
  w_q, w_k, w_v = jnp.split(weights_in["in_proj_weight"], 3)
  b_q, b_k, b_v = jnp.split(weights_in["in_proj_bias"], 3)

  def heads(x, w, b):  # (N, T, E) -> (N, H, T, E / H)
    x = linear(x, w, b)
    return jnp.swapaxes(x.reshape(x.shape[:2] + (num_heads, head_dim)), 1, 2)

  allowed = bias = None
  if key_padding_mask is not None:
    key_padding_mask = jnp.asarray(key_padding_mask)
    checks.check_key_padding_mask(op, key_padding_mask.shape, key_padding_mask.dtype,
                                  (batch, keys) if batched else (keys,))
    allowed, bias = _mha_mask(key_padding_mask.reshape(batch, 1, 1, keys))
  if attn_mask is not None:
    attn_mask = jnp.asarray(attn_mask)
    checks.check_attention_mask(op, attn_mask.shape, attn_mask.dtype, query.dtype,
                                (batch * num_heads, length, keys))
    if attn_mask.ndim == 3:
      attn_mask = attn_mask.reshape(batch, num_heads, length, keys)
    mask_allowed, mask_bias = _mha_mask(attn_mask)
    allowed = _combine(allowed, mask_allowed, jnp.logical_and)
    bias = _combine(bias, mask_bias, jnp.add)
  out, weights = _attention(
      heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v),
      (batch, num_heads), allowed, bias,
      online_softmax.attention_scale(op, None, head_dim, online_softmax.compute_dtype(query.dtype)),
      is_causal, False, dropout_p, dropout_rng, None, need_weights)
  out = jnp.swapaxes(out, 1, 2).reshape(batch, length, embed)
  out = linear(out, weights_in["out_proj.weight"], weights_in["out_proj.bias"])
  if weights is not None and average_attn_weights:
    weights = jnp.mean(weights, axis=1)
  if not batched:
    out = out[0]
    weights = None if weights is None else weights[0]
  return out, weights
