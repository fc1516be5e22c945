"""Dense attention in torch float64 with autograd: the gradient oracle of the attention tests.

Written with plain torch ops (no jmat), so every float input (q, k, v, the scale, a float mask,
arrays a score function captures) gets its gradient from torch's autograd.
"""

from __future__ import annotations

import torch


def dense_attention(q, k, v, *, scale=None, bias=None, allowed=None, score=None,
                    is_causal=False, gqa=False):
  """``softmax(score(scale * q @ k^T + bias), masked) @ v`` and the per-query logsumexp.

  Args:
    q: ``(..., L, E)`` tensor.
    k: ``(..., S, E)``; with ``gqa`` its heads (dim -3) divide q's and are repeated.
    v: ``(..., S, Ev)``.
    scale: a number or a 0-d tensor (differentiable); None is ``1 / sqrt(E)``.
    bias: None or a float tensor broadcastable to the scores, added after scaling.
    allowed: None or a bool tensor broadcastable to the scores, True = may attend.
    score: None or ``score(s, *index)`` with one broadcastable index tensor per dim of the
      4-D scores (``b, h, q_idx, kv_idx``), as torch's ``score_mod`` on whole tensors.
    is_causal: torch's top-left ``tril(ones(L, S))``.
    gqa: grouped-query attention.

  Returns:
    ``(out (..., L, Ev), lse (..., L))``; a query that sees no key gets 0 and ``-inf``.
  """
  if gqa:
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = (q @ k.transpose(-1, -2)) * scale
  if bias is not None:
    s = s + bias
  if score is not None:
    index = [torch.arange(n).view([-1 if i == d else 1 for i in range(s.ndim)])
             for d, n in enumerate(s.shape)]
    s = score(s, *index)
  ok = torch.ones(s.shape, dtype=torch.bool)
  if allowed is not None:
    ok = ok & allowed
  if is_causal:
    ok = ok & torch.ones(s.shape[-2:], dtype=torch.bool).tril()
  s = s.masked_fill(~ok, -torch.inf)
  top = s.detach().amax(dim=-1, keepdim=True)
  top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
  p = torch.exp(s - top)
  total = p.sum(dim=-1, keepdim=True)
  seen = total > 0
  safe = torch.where(seen, total, torch.ones_like(total))
  out = (p @ v) / safe
  lse = torch.where(seen, torch.log(safe) + top, -torch.inf)[..., 0]
  return out, lse
