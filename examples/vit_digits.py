"""A small Vision Transformer on jmat, trained with optax on scikit-learn's 8x8 digits.

Every product is jmat's: the patch embedding and the classifier are ``jmat.linear``,
each encoder block is ``examples/transformer_block.py``'s (``jmat.multi_head_attention``
and ``jmat.linear``, torch's TransformerEncoderLayer parameters). The data is
``sklearn.datasets.load_digits`` (1797 images bundled with scikit-learn, no
download), split once with a fixed seed; training uses a fixed seed too.

Run it: ``python examples/vit_digits.py`` (``--fast`` for a short run, ``--plot PATH``
to choose where the loss/accuracy plot goes). Needs ``pip install -e '.[examples]'``.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformer_block import encoder_block, init_encoder_block, layer_norm

import jmat

PATCH = 2  # 2x2 pixel patches: an 8x8 digit is a sequence of 16 tokens (plus a class token)
EMBED, HEADS, MLP, DEPTH, CLASSES = 64, 4, 128, 3, 10


def load(seed: int = 0):
  """Digits as ``(N, 16, 4)`` patch sequences in [0, 1], split 80/20, stratified."""
  pixels, labels = load_digits(return_X_y=True)
  n = pixels.shape[0]
  images = np.asarray(pixels, np.float32).reshape(n, 8, 8) / 16.0  # pixel values are 0..16
  patches = images.reshape(n, 8 // PATCH, PATCH, 8 // PATCH, PATCH).transpose(0, 1, 3, 2, 4)
  patches = patches.reshape(n, (8 // PATCH) ** 2, PATCH * PATCH)
  split = train_test_split(patches, labels, test_size=0.2, random_state=seed, stratify=labels)
  return [np.asarray(part) for part in split]


def init(rng: jax.Array) -> dict:
  """Parameters: torch's nn.Linear initialisation for the two linear maps."""
  keys = jax.random.split(rng, DEPTH + 4)

  def torch_linear(key, fan_out, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    w_key, b_key = jax.random.split(key)
    return (jax.random.uniform(w_key, (fan_out, fan_in), jnp.float32, -bound, bound),
            jax.random.uniform(b_key, (fan_out,), jnp.float32, -bound, bound))

  embed_w, embed_b = torch_linear(keys[0], EMBED, PATCH * PATCH)
  head_w, head_b = torch_linear(keys[1], CLASSES, EMBED)
  tokens = 1 + (8 // PATCH) ** 2
  return {
      "embed": {"weight": embed_w, "bias": embed_b},
      "cls": 0.02 * jax.random.normal(keys[2], (1, 1, EMBED)),
      "position": 0.02 * jax.random.normal(keys[3], (1, tokens, EMBED)),
      "blocks": [init_encoder_block(k, EMBED, HEADS, MLP) for k in keys[4:]],
      "norm": {"weight": jnp.ones((EMBED,)), "bias": jnp.zeros((EMBED,))},
      "head": {"weight": head_w, "bias": head_b},
  }


def logits(params: dict, patches: jax.Array) -> jax.Array:
  """``(N, 16, 4)`` patches -> ``(N, 10)`` class scores."""
  x = jmat.linear(patches, params["embed"]["weight"], params["embed"]["bias"])
  cls = jnp.broadcast_to(params["cls"], (x.shape[0], 1, EMBED))
  x = jnp.concatenate([cls, x], axis=1) + params["position"]
  for block in params["blocks"]:
    x = encoder_block(block, x, num_heads=HEADS, activation="gelu")
  x = layer_norm(x[:, 0], params["norm"]["weight"], params["norm"]["bias"])
  return jmat.linear(x, params["head"]["weight"], params["head"]["bias"])


@jax.jit
def _correct(params: dict, patches: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.sum(jnp.argmax(logits(params, patches), axis=-1) == labels)


def accuracy(params: dict, patches: np.ndarray, labels: np.ndarray) -> float:
  return float(_correct(params, patches, labels)) / len(labels)


def train(epochs: int, batch_size: int = 64, seed: int = 0):
  """Trains with AdamW and a warmup-cosine schedule; returns params and per-epoch history."""
  x_train, x_test, y_train, y_test = load()
  steps_per_epoch = len(x_train) // batch_size
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 2e-3, warmup_steps=steps_per_epoch * 2, decay_steps=steps_per_epoch * epochs)
  optimizer = optax.adamw(schedule, weight_decay=0.05)
  params = init(jax.random.key(seed))
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss_fn(params):
      return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  history = {"loss": [], "train": [], "test": []}
  for _ in range(epochs):
    order = rng.permutation(len(x_train))
    losses = []
    for i in range(steps_per_epoch):
      batch = order[i * batch_size:(i + 1) * batch_size]
      params, state, loss = step(params, state, x_train[batch], y_train[batch])
      losses.append(loss)
    history["loss"].append(float(np.mean(jax.device_get(losses))))
    history["train"].append(accuracy(params, x_train, y_train))
    history["test"].append(accuracy(params, x_test, y_test))
  return params, history


def plot(history: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  epochs = np.arange(1, len(history["loss"]) + 1)
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
  left.plot(epochs, history["loss"])
  left.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log")
  right.plot(epochs, history["train"], label="train")
  right.plot(epochs, history["test"], label="test")
  right.set(xlabel="epoch", ylabel="accuracy", ylim=(0.8, 1.0))
  right.legend()
  fig.suptitle("ViT on jmat, sklearn 8x8 digits")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="a short run (the test suite's)")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--plot", type=pathlib.Path,
                      default=pathlib.Path(__file__).with_name("vit_digits.png"))
  args = parser.parse_args(argv)
  epochs = args.epochs or (5 if args.fast else 25)
  start = time.perf_counter()
  params, history = train(epochs)
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f"ViT: {DEPTH} blocks, {HEADS} heads, embed {EMBED}, {count} parameters; "
        f"{epochs} epochs on 1437 digits in {time.perf_counter() - start:.0f} s")
  for epoch in sorted({1, epochs // 4, epochs // 2, epochs} - {0}):
    print(f"  epoch {epoch:3d}: loss {history['loss'][epoch - 1]:.4f}, "
          f"train accuracy {history['train'][epoch - 1]:.4f}, "
          f"test accuracy {history['test'][epoch - 1]:.4f}")
  plot(history, args.plot)
  print(f"plot: {os.path.relpath(args.plot)}")
  print(f"test accuracy: {history['test'][-1]:.4f}")


if __name__ == "__main__":
  main()
