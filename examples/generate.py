"""Greedy generation with a paged KV cache: a small decoder-only model written with jmat.

A batch of prompts of different lengths is

1. prefilled: the prompts packed end to end (``(T,)`` tokens, no padding) go through the model
   once, attention by ``jmat.attention.varlen_attn`` (``cu_seqlens`` offsets, causal:
   ``window_size=(-1, 0)``), and every token's keys and values are written to the paged cache
   (``PagedAttention.assign``, one row per token: its sequence and position);
2. decoded one token per sequence per step, under ``jax.jit`` with the caches donated: each
   step writes its new keys and values into the pool and attends over it with
   ``flex_attention`` (queries ``(B, Hq, 1, Dh)``, the pool ``(1, Hkv, pages * page, Dh)``
   shared by the batch) through ``convert_logical_block_mask``. Pages are reserved on the host
   as the sequences grow (``paged = paged.reserve(b, length)``: a new page table, the same
   shapes, no recompilation).

The greedy tokens are checked against a recomputation without a cache (the whole sequence
through the model with SDPA, causal), and the decoding speed is printed in tokens/s. The
weights are random: the text is noise, the bookkeeping is what is shown.

Run it: ``python examples/generate.py`` (``--fast`` for a smaller model).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jmat
from jmat.attention import PagedAttention


@dataclasses.dataclass(frozen=True)
class Config:
  """The model's sizes and the cache's paging."""

  vocab: int = 256
  dim: int = 256
  layers: int = 4
  heads: int = 8
  kv_heads: int = 2
  mlp: int = 512
  max_len: int = 512  # positions (learned position embeddings); a multiple of page_size
  page_size: int = 16
  n_pages: int = 128  # the pool: n_pages * page_size positions shared by every sequence

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads


FAST = Config(vocab=64, dim=32, layers=2, heads=4, kv_heads=2, mlp=64, max_len=64,
              page_size=8, n_pages=24)


def init(key: jax.Array, cfg: Config, dtype=jnp.float32) -> dict:
  """Random weights (normal, scaled by 1/sqrt(fan-in))."""
  keys = iter(jax.random.split(key, 3 + 6 * cfg.layers))

  def dense(fan_in, fan_out):
    return jax.random.normal(next(keys), (fan_in, fan_out), dtype) * fan_in**-0.5

  kv = cfg.kv_heads * cfg.head_dim
  layers = [{"wq": dense(cfg.dim, cfg.dim), "wk": dense(cfg.dim, kv), "wv": dense(cfg.dim, kv),
             "wo": dense(cfg.dim, cfg.dim), "w1": dense(cfg.dim, cfg.mlp),
             "w2": dense(cfg.mlp, cfg.dim)} for _ in range(cfg.layers)]
  return {"embed": jax.random.normal(next(keys), (cfg.vocab, cfg.dim), dtype),
          "positions": 0.5 * jax.random.normal(next(keys), (cfg.max_len, cfg.dim), dtype),
          "head": dense(cfg.dim, cfg.vocab), "layers": layers}


def rms_norm(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  """``(B, T, heads * Dh)`` -> ``(B, heads, T, Dh)``."""
  batch, length, _ = x.shape
  return jnp.swapaxes(x.reshape(batch, length, heads, -1), 1, 2)


def model(params: dict, tokens: jax.Array, positions: jax.Array, attend, cfg: Config):
  """Logits ``(B, T, vocab)``; ``attend(layer, q, k, v)`` is the attention of each layer."""
  x = params["embed"][tokens] + params["positions"][positions]
  for i, layer in enumerate(params["layers"]):
    h = rms_norm(x)
    q = split_heads(jmat.matmul(h, layer["wq"]), cfg.heads)
    k = split_heads(jmat.matmul(h, layer["wk"]), cfg.kv_heads)
    v = split_heads(jmat.matmul(h, layer["wv"]), cfg.kv_heads)
    out = attend(i, q, k, v)  # (B, heads, T, Dh)
    out = jnp.swapaxes(out, 1, 2).reshape(x.shape[0], x.shape[1], cfg.dim)
    x = x + jmat.matmul(out, layer["wo"])
    x = x + jmat.matmul(jax.nn.gelu(jmat.matmul(rms_norm(x), layer["w1"])), layer["w2"])
  return jmat.matmul(rms_norm(x), params["head"])


def prefill(params, paged, caches, tokens, positions, seq_ids, cu_seqlens, cfg: Config,
            longest: int):
  """The packed prompts through the model: ``(last logits (B, vocab), caches)``.

  ``tokens``, ``positions`` and ``seq_ids`` are ``(T,)``: every prompt's tokens end to end,
  each token's position in its prompt and its prompt's index; prompt ``b`` is
  ``tokens[cu_seqlens[b]:cu_seqlens[b + 1]]``, ``longest`` the longest prompt.
  """
  written = list(caches)

  def packed(x):  # (1, H, T, Dh) -> (T, H, Dh)
    return jnp.swapaxes(x[0], 0, 1)

  def attend(i, q, k, v):
    # One assign row per token (its prompt, its position): (T, H, 1, Dh) keys and values.
    written[i] = paged.assign(seq_ids, positions[:, None], packed(k)[:, :, None],
                              packed(v)[:, :, None], *written[i])
    out = jmat.attention.varlen_attn(packed(q), packed(k), packed(v), cu_seqlens, cu_seqlens,
                                     longest, longest, window_size=(-1, 0), enable_gqa=True)
    return jnp.swapaxes(out, 0, 1)[None]

  logits = model(params, tokens[None], positions[None], attend, cfg)
  return logits[0, cu_seqlens[1:] - 1], tuple(written)


def decode_step(params, paged, caches, tokens, positions, cfg: Config):
  """One token per sequence at ``positions (B,)``: ``(logits (B, vocab), caches)``."""
  batch = tokens.shape[0]
  logical = jmat.create_block_mask(lambda b, h, q, kv: kv <= positions[b], batch, None, 1,
                                   cfg.max_len, BLOCK_SIZE=(1, cfg.page_size))
  physical = paged.convert_logical_block_mask(logical)
  written = list(caches)

  def attend(i, q, k, v):
    written[i] = paged.assign(jnp.arange(batch), positions[:, None], k, v, *written[i])
    return jmat.flex_attention(q, *written[i], block_mask=physical, enable_gqa=True)

  logits = model(params, tokens[:, None], positions[:, None], attend, cfg)
  return logits[:, 0], tuple(written)


def full_logits(params, tokens, cfg: Config):
  """No cache: the whole ``(B, T)`` sequences through the model, causal SDPA."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return model(params, tokens, positions, lambda i, q, k, v: jmat.scaled_dot_product_attention(
      q, k, v, is_causal=True, enable_gqa=True), cfg)


def generate(params, prompts: Sequence[Sequence[int]], new_tokens: int, cfg: Config,
             dtype=jnp.float32) -> tuple[list[list[int]], float]:
  """Greedy continuations of ``prompts`` (``new_tokens`` each) and the decoding tokens/s."""
  batch = len(prompts)
  lengths = np.array([len(p) for p in prompts])
  tokens = np.concatenate([np.asarray(p, np.int32) for p in prompts])
  seq_ids = np.repeat(np.arange(batch, dtype=np.int32), lengths)
  cu_seqlens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
  in_prompt = np.arange(len(tokens), dtype=np.int32) - cu_seqlens[seq_ids]
  paged = PagedAttention(cfg.n_pages, cfg.page_size, batch)
  for b in range(batch):
    paged = paged.reserve(b, int(lengths[b]))
  shape = (1, cfg.kv_heads, cfg.n_pages * cfg.page_size, cfg.head_dim)
  caches = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.layers))

  run_prefill = jax.jit(prefill, static_argnames=("cfg", "longest"), donate_argnums=2)
  step = jax.jit(decode_step, static_argnames="cfg", donate_argnums=2)
  logits, caches = run_prefill(params, paged, caches, *map(jnp.asarray, (
      tokens, in_prompt, seq_ids, cu_seqlens)), cfg=cfg, longest=int(lengths.max()))
  next_tokens = jnp.argmax(logits, axis=-1)
  out = [next_tokens]
  positions = lengths.copy()
  started = None
  for n in range(new_tokens - 1):
    if n == 1:  # the first step compiled; time the rest
      jax.block_until_ready(next_tokens)
      started = time.perf_counter()
    for b in range(batch):  # a new page where a sequence reaches one (host side)
      paged = paged.reserve(b, int(positions[b]) + 1)
    # A copy: jnp.asarray may share a numpy buffer with a computation still running.
    logits, caches = step(params, paged, caches, next_tokens, jnp.array(positions), cfg=cfg)
    next_tokens = jnp.argmax(logits, axis=-1)
    out.append(next_tokens)
    positions = positions + 1
  jax.block_until_ready(next_tokens)
  timed_steps = new_tokens - 2
  rate = batch * timed_steps / (time.perf_counter() - started) if started else float("nan")
  generated = np.stack([np.asarray(t) for t in out], axis=1)
  return [generated[b].tolist() for b in range(batch)], rate


def recomputed_tokens(params, prompts, generated, cfg: Config) -> list[list[int]]:
  """The greedy choice at every generated position, from the whole sequence without a cache.

  If each generated token is the argmax of the full model at the position before it, greedy
  decoding without a cache produces the same continuation.
  """
  sequences = [list(p) + list(g[:-1]) for p, g in zip(prompts, generated, strict=True)]
  longest = max(len(s) for s in sequences)
  tokens = np.zeros((len(sequences), longest), np.int32)
  for b, s in enumerate(sequences):
    tokens[b, : len(s)] = s  # right padding: causal attention never reads it
  choices = np.asarray(jnp.argmax(jax.jit(full_logits, static_argnames="cfg")(
      params, jnp.asarray(tokens), cfg=cfg), axis=-1))
  return [choices[b, len(p) - 1: len(p) - 1 + len(g)].tolist()
          for b, (p, g) in enumerate(zip(prompts, generated, strict=True))]


def main(argv: Sequence[str] | None = None) -> tuple[list, list, dict, Config]:
  """Generates, checks and prints; returns ``(prompts, generated, params, cfg)``."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="a small model, few tokens")
  parser.add_argument("--float64", action="store_true",
                      help="float64 weights and caches (needs jax_enable_x64)")
  args = parser.parse_args(argv)
  cfg, new_tokens = (FAST, 10) if args.fast else (Config(), 64)
  dtype = jnp.float64 if args.float64 else jnp.float32
  rng = np.random.default_rng(0)
  prompt_lengths = (5, 17, 1, 11) if args.fast else (37, 120, 5, 64, 90, 12)
  prompts = [rng.integers(0, cfg.vocab, n).tolist() for n in prompt_lengths]
  params = init(jax.random.key(0), cfg, dtype)
  generated, rate = generate(params, prompts, new_tokens, cfg, dtype)
  for prompt, tokens in zip(prompts, generated, strict=True):
    print(f"prompt of {len(prompt):3d} tokens -> {tokens[:8]}...")
  same = recomputed_tokens(params, prompts, generated, cfg) == generated
  print(f"greedy tokens {'equal' if same else 'DIFFER FROM'} a no-cache recomputation")
  print(f"decoding: {rate:.0f} tokens/s ({len(prompts)} sequences, paged cache of "
        f"{cfg.n_pages} pages of {cfg.page_size}, {jax.devices()[0].platform})")
  return prompts, generated, params, cfg


if __name__ == "__main__":
  main()
