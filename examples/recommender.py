"""A recommender on jmat.matmul: user-item scores, top-k items, matrix factorization.

The data is synthetic with a known structure: the true preferences are a rank-8
matrix ``U* @ V*^T`` (users x items), and 15% of its entries are observed with noise.
Matrix factorization learns user and item embeddings from the observed entries
(Adam on the squared error, every product a jmat.matmul); the learned scores
``users @ items^T`` then rank each user's unobserved items, and the ranking is
compared with the true one (precision@k; a random ranking scores k / items).
Scoring is batched over user groups: ``(groups, users, d) @ (d, items)``.

Run it: ``python examples/recommender.py`` (``--fast`` for fewer steps).
Needs optax (``pip install -e '.[examples]'``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jmat

USERS, ITEMS, RANK, GROUPS, K = 600, 400, 8, 4, 10


def scores(user_embeddings: jax.Array, item_embeddings: jax.Array) -> jax.Array:
  """``(..., users, d) @ (items, d)^T -> (..., users, items)``: one broadcast jmat.matmul."""
  return jmat.matmul(user_embeddings, item_embeddings.T)


@jax.jit
def top_k(user_embeddings: jax.Array, item_embeddings: jax.Array, seen: jax.Array):
  """The ``K`` best unseen items of every user: ``(..., users, K)`` scores and item ids."""
  return jax.lax.top_k(jnp.where(seen, -jnp.inf, scores(user_embeddings, item_embeddings)), K)


def synthetic(seed: int = 0):
  """True rank-RANK preferences, and a noisy 15% sample of them."""
  rng = np.random.default_rng(seed)
  users = rng.normal(size=(USERS, RANK)).astype(np.float32)
  items = rng.normal(size=(ITEMS, RANK)).astype(np.float32)
  truth = users @ items.T / np.sqrt(RANK)
  seen = rng.random((USERS, ITEMS)) < 0.15
  ratings = np.where(seen, truth + 0.1 * rng.normal(size=truth.shape), 0).astype(np.float32)
  return truth, seen, ratings


def factorize(ratings: np.ndarray, seen: np.ndarray, steps: int, seed: int = 0):
  """Learns ``(users, RANK)`` and ``(items, RANK)`` embeddings from the observed ratings."""
  keys = jax.random.split(jax.random.key(seed))
  params = (0.1 * jax.random.normal(keys[0], (USERS, RANK), jnp.float32),
            0.1 * jax.random.normal(keys[1], (ITEMS, RANK), jnp.float32))
  optimizer = optax.adam(0.03)

  def loss_fn(params, ratings, seen):
    users, items = params
    error = jnp.where(seen, scores(users, items) - ratings, 0.0)
    penalty = 1e-3 * (jnp.sum(users**2) + jnp.sum(items**2))
    return jnp.sum(error**2) / jnp.sum(seen) + penalty / seen.size

  @jax.jit  # the data are arguments: closed over, XLA would constant-fold them
  def step(params, state, ratings, seen):
    loss, grads = jax.value_and_grad(loss_fn)(params, ratings, seen)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  state, losses = optimizer.init(params), []
  for _ in range(steps):
    params, state, loss = step(params, state, jnp.asarray(ratings), jnp.asarray(seen))
    losses.append(loss)
  return params, [float(x) for x in jax.device_get(losses)]


def precision_at_k(predicted: np.ndarray, truth: np.ndarray, seen: np.ndarray) -> float:
  """Mean share of each user's predicted top-K among the true top-K unseen items."""
  best = np.argsort(np.where(seen, -np.inf, truth), axis=-1)[:, ::-1][:, :K]
  hits = [len(set(p) & set(t)) for p, t in zip(predicted, best, strict=True)]
  return float(np.mean(hits)) / K


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="fewer training steps")
  args = parser.parse_args(argv)
  truth, seen, ratings = synthetic()
  print(f"synthetic data with a known low-rank structure: true preferences are a rank-{RANK} "
        f"{USERS} x {ITEMS} matrix; {seen.mean():.0%} of it observed, with noise")
  steps = 60 if args.fast else 400
  (users, items), losses = factorize(ratings, seen, steps)
  print(f"matrix factorization, rank {RANK}, {steps} Adam steps: training loss "
        f"{losses[0]:.3f} -> {losses[-1]:.4f}")
  grouped = users.reshape(GROUPS, USERS // GROUPS, RANK)
  best_scores, best_items = top_k(grouped, items, jnp.asarray(seen).reshape(GROUPS, -1, ITEMS))
  print(f"scores in {GROUPS} user groups: {tuple(grouped.shape)} @ {tuple(items.T.shape)} -> "
        f"{tuple(scores(grouped, items).shape)}; top-{K} unseen items -> {tuple(best_items.shape)}")
  print(f"user 0: items {best_items[0, 0].tolist()}")
  predicted = np.asarray(best_items).reshape(USERS, K)
  quality = precision_at_k(predicted, truth, seen)
  print(f"precision@{K} against the true ranking of unseen items: {quality:.3f} "
        f"(random ranking: {K / (ITEMS - seen.sum(axis=1).mean()):.3f})")


if __name__ == "__main__":
  main()
