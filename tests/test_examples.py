"""The examples run (each with its fast setting) and compute what they claim.

Values are checked against independent oracles (numpy float64, lax.conv, equinox's
own attention); the printed claims are checked as properties, never as numbers from
a run.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
  """Imports ``examples/NAME.py`` (its directory on sys.path, as when run as a script)."""
  if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses (equinox modules) look their module up
  spec.loader.exec_module(module)
  return module


def _normal(seed, shape):
  return np.random.default_rng(seed).normal(size=shape)


def _attention64(q, k, v, mask=None):
  """numpy float64 softmax(q k^T / sqrt(d)) v, with a boolean mask (True = attend)."""
  scores = np.einsum("...qd,...kd->...qk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    scores = np.where(mask, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("...qk,...kd->...qd", weights / weights.sum(-1, keepdims=True), v)


def test_attention_from_scratch(capsys):
  example = _load("attention_from_scratch")
  q, k, v = _normal(0, (2, 5, 8)), _normal(1, (2, 7, 8)), _normal(2, (2, 7, 16))
  out = example.attention_from_scratch(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(out, _attention64(q, k, v), rtol=1e-5, atol=1e-5)
  example.main()
  printed = capsys.readouterr().out
  for shape in ("(2, 5, 8)", "(2, 8, 7)", "(2, 5, 7)", "(2, 5, 16)"):  # the document's steps
    assert shape in printed
  assert printed.rstrip().endswith("equal (float32)")


def test_conv1x1_as_matmul(capsys):
  example = _load("conv1x1_as_matmul")
  x, w, b = _normal(0, (3, 5, 7, 2)), _normal(1, (11, 5, 1, 1)), _normal(2, (11,))
  expected = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x) + b[:, None, None]
  arrays = [jnp.asarray(a) for a in (x, w, b)]  # float64 (the suite enables x64)
  np.testing.assert_allclose(example.conv1x1_matmul(*arrays), expected, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(example.conv1x1_lax(*arrays), expected, rtol=1e-12, atol=1e-12)
  example.main(["--fast"])
  printed = capsys.readouterr().out
  assert "(equal, float32)" in printed
  assert re.search(r"conv time / matmul time: \d+\.\d\d", printed)


def test_recommender(capsys):
  example = _load("recommender")
  users, items = _normal(0, (2, 3, 5)), _normal(1, (3 * example.K, 5))
  seen = np.random.default_rng(2).random((2, 3, 3 * example.K)) < 0.3
  seen[..., :example.K] = False  # at least K unseen items, so the top K has no ties
  scores = np.einsum("gud,id->gui", users, items)
  np.testing.assert_allclose(example.scores(jnp.asarray(users), jnp.asarray(items)), scores,
                             rtol=1e-12)
  _, best = example.top_k(jnp.asarray(users), jnp.asarray(items), jnp.asarray(seen))
  expected = np.argsort(np.where(seen, -np.inf, scores), axis=-1)[..., ::-1][..., :example.K]
  np.testing.assert_array_equal(best, expected)

  example.main(["--fast"])
  printed = capsys.readouterr().out
  assert "known low-rank structure" in printed
  found = re.search(r"precision@10 .*: (\d\.\d+) \(random ranking: (\d\.\d+)\)", printed)
  assert found, printed
  quality, random = map(float, found.groups())
  assert quality > 10 * random  # the factorization recovers the ranking, far above chance


def test_batched_linear(capsys):
  example = _load("batched_linear")
  x, w, b = _normal(0, (3, 7, 5)), _normal(1, (3, 5, 2)), _normal(2, (3, 1, 2))
  out = example.batched_linear(*(jnp.asarray(a) for a in (x, w, b)))
  np.testing.assert_allclose(out, np.einsum("bpi,bio->bpo", x, w) + b, rtol=1e-12)
  example.main()
  printed = capsys.readouterr().out
  assert "-> (4, 100, 16)" in printed and "equal to y[2]: True" in printed
  assert "ShapeError: jmat.bmm: batch sizes differ (2 and 3)" in printed
  assert "did you mean a of shape (2, 1, 10)?" in printed


def test_flax_and_equinox(capsys):
  example = _load("flax_and_equinox")
  module = eqx.nn.MultiheadAttention(3, 12, use_query_bias=True, use_output_bias=True,
                                     key=jax.random.key(0))
  ported = example.JmatAttention.from_equinox(module)
  x, kv = jnp.asarray(_normal(3, (5, 12))), jnp.asarray(_normal(4, (7, 12)))  # float64
  mask = jnp.asarray(np.random.default_rng(5).random((5, 7)) < 0.7).at[:, 0].set(True)
  np.testing.assert_allclose(ported(x, kv, kv, mask), module(x, kv, kv, mask), rtol=1e-12)
  example.main()
  printed = capsys.readouterr().out
  differences = [float(d) for d in re.findall(r"(\d\.\de[-+]\d\d)", printed)]
  assert len(differences) == 6 and max(differences) < 1e-5, printed
  assert "jmat gives 0 as torch does (max |jmat| 0.0)" in printed


def test_vit_digits_learns(tmp_path):
  plot = tmp_path / "vit.png"
  result = subprocess.run(
      [sys.executable, str(EXAMPLES / "vit_digits.py"), "--fast", "--plot", str(plot)],
      capture_output=True, text=True, timeout=600, check=True)
  found = re.search(r"^test accuracy: (\d\.\d+)$", result.stdout, re.MULTILINE)
  assert found, result.stdout + result.stderr
  assert float(found.group(1)) > 0.5  # ten classes: chance is 0.1
  assert plot.stat().st_size > 0


def _generate_oracle(params, tokens, cfg):
  """numpy float64 logits ``(T, vocab)`` of one sequence through examples/generate.py's model."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

  def rms(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)

  def gelu(x):  # jax.nn.gelu's default, the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

  length, group = len(tokens), cfg.heads // cfg.kv_heads
  x = p["embed"][tokens] + p["positions"][:length]
  causal = np.tril(np.ones((length, length), bool))
  for layer in p["layers"]:
    h = rms(x)
    q, k, v = ((h @ layer[w]).reshape(length, -1, cfg.head_dim).transpose(1, 0, 2)
               for w in ("wq", "wk", "wv"))
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    out = _attention64(q, k, v, causal).transpose(1, 0, 2).reshape(length, cfg.dim)
    x = x + out @ layer["wo"]
    x = x + gelu(rms(x) @ layer["w1"]) @ layer["w2"]
  return rms(x) @ p["head"]


def test_generate(capsys):
  # Greedy decoding over the paged cache, in float64, against the numpy model without a cache:
  # every generated token is the argmax at the position before it (prompts of 1 to 17 tokens
  # crossing pages of 8).
  example = _load("generate")
  prompts, generated, params, cfg = example.main(["--fast", "--float64"])
  printed = capsys.readouterr().out
  assert "greedy tokens equal a no-cache recomputation" in printed
  assert re.search(r"decoding: \d+ tokens/s \(4 sequences", printed)
  for prompt, tokens in zip(prompts, generated, strict=True):
    assert len(tokens) == 10
    logits = _generate_oracle(params, prompt + tokens[:-1], cfg)
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1:], axis=-1), tokens)
