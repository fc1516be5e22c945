"""Mistaken calls of the attention APIs (issue 20): each is a jmat error naming the function, what
was given and the fix, or, where the call is valid, runs with the right values.

Also the backend probe: which kernel a call gets does not depend on the machine asking (the
Mosaic lowering probe asks for a fixed TPU, interpret mode probes nothing), and a probe that
fails for another reason than the kernel's limits keeps the kernel instead of falling back.
Oracles: the numpy float64 attention of tests/cases.py for values, torch's autograd
(tests/torch_oracle.py) for gradients, torch's own AuxRequest for its fields.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmat
from jmat._src import backends, block_sparse, checks
from jmat._src.kernels import mosaic
from jmat.attention import AuxRequest, flex_attention_backend
from tests.cases import attention_reference, tolerance

ROOT = pathlib.Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(2020)
TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"
MESH = jax.make_mesh((1,), ("seq",))


def randn(*shape, dtype=np.float32):
  return RNG.standard_normal(shape).astype(dtype)


def raises(kind, *words):
  """``pytest.raises(kind)`` whose message must hold every one of ``words`` (plain text)."""
  return pytest.raises(kind, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


def scaled_by_batch(s, b, h, q_idx, kv_idx):
  """The issue's score_mod: the batch index rewrites the score."""
  return s * (b + 1)


def scaled_by_batch_reference(s, b, h, q_idx, kv_idx):
  return s * (b + 1)


# --- kernel_options that is no dict -------------------------------------------------------


@pytest.mark.parametrize("options", ["XLA", ["BACKEND", "XLA"], ("BACKEND", "XLA")])
def test_kernel_options_that_is_no_dict_is_a_type_error_showing_the_dict(options):
  q = jnp.ones((1, 2, 8, 4))
  for call, name in [(jmat.flex_attention, "jmat.flex_attention"),
                     (jmat.scaled_dot_product_attention, "jmat.scaled_dot_product_attention")]:
    with raises(TypeError, f"{name}: kernel_options must be a dict",
                f"got {type(options).__name__}", "kernel_options={'BACKEND': 'XLA'}"):
      call(q, q, q, kernel_options=options)


# --- a Pallas backend by name on a CPU ------------------------------------------------------


@pytest.mark.parametrize("backend, native", [("TRITON", "cuda and rocm"), ("MOSAIC", "tpu")])
def test_a_pallas_backend_without_interpret_is_refused_by_jmat_on_a_cpu(backend, native):
  q, k, v = randn(1, 2, 16, 8), randn(1, 2, 16, 8), randn(1, 2, 16, 8)
  words = [f"kernel_options BACKEND={backend!r}", f"for {native} only", "lowered for cpu",
           '"INTERPRET": True', "'XLA' or 'AUTO'"]
  with raises(ValueError, "jmat.flex_attention: ", *words):
    jmat.flex_attention(q, k, v, kernel_options={"BACKEND": backend})
  with raises(ValueError, "jmat.scaled_dot_product_attention: ", *words):
    jmat.scaled_dot_product_attention(q, k, v, implementation="blockwise",
                                      kernel_options={"BACKEND": backend})
  with raises(ValueError, "jmat.flex_attention: ", *words):  # lowered for cpu explicitly
    jax.jit(lambda q: jmat.flex_attention(q, q, q, kernel_options={"BACKEND": backend})).trace(
        q).lower(lowering_platforms=("cpu",))
  choice = flex_attention_backend(q, k, v, kernel_options={"BACKEND": backend}, platform="cpu")
  assert choice.backend == backend and choice.reason.startswith("refused: cpu: ")


@pytest.mark.parametrize("backend, platform, kernel_call", [
    ("TRITON", "cuda", TRITON_CALL), ("MOSAIC", "tpu", MOSAIC_CALL)])
def test_a_pallas_backend_by_name_still_lowers_for_its_platform_from_this_cpu(
    backend, platform, kernel_call):
  q = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.bfloat16)
  options = {"BACKEND": backend}

  def loss(q, k, v):
    return jmat.flex_attention(q, k, v, kernel_options=options).astype(jnp.float32).sum()

  forward = jax.jit(lambda q, k, v: jmat.flex_attention(q, k, v, kernel_options=options))
  assert kernel_call in forward.trace(q, q, q).lower(lowering_platforms=(platform,)).as_text()
  gradient = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(
      lowering_platforms=(platform,)).as_text()
  assert kernel_call in gradient
  assert flex_attention_backend(q, q, q, kernel_options=options, platform=platform) == (
      backend, "asked for with kernel_options BACKEND")


def test_interpret_runs_a_pallas_backend_by_name_on_a_cpu():
  q, k, v = randn(2, 2, 16, 8), randn(2, 2, 24, 8), randn(2, 2, 24, 8)
  with jax.default_matmul_precision("highest"):
    out = jmat.flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON", "INTERPRET": True})
  np.testing.assert_allclose(out, attention_reference(q, k, v), **tolerance(np.float32))


# --- SDPA's cuDNN where there is none -------------------------------------------------------


def test_cudnn_where_jax_finds_none_names_sdpa_and_the_other_implementations():
  if jax.default_backend() == "gpu":
    pytest.skip("this machine has a GPU: cuDNN may be there")
  q = jnp.ones((1, 2, 8, 16), jnp.float16)
  with raises(ValueError, "jmat.scaled_dot_product_attention: implementation='cudnn' needs "
              "cuDNN", "cuDNN is not detected", "implementation=None", "'blockwise'",
              "'dense'", "'pallas'"):
    jmat.scaled_dot_product_attention(q, q, q, implementation="cudnn")


# --- mesh and the other static arguments of jmat.parallel -----------------------------------


def _parallel_calls(mesh):
  q = jnp.ones((1, 2, 8, 4))
  return [
      ("parallel.ring_attention",
       lambda: jmat.parallel.ring_attention(q, q, q, mesh=mesh, axis_name="seq")),
      ("parallel.allgather_attention",
       lambda: jmat.parallel.allgather_attention(q, q, q, mesh=mesh, axis_name="seq")),
      ("parallel.to_layout", lambda: jmat.parallel.to_layout(q, mesh, "seq", "zigzag")),
      ("parallel.from_layout", lambda: jmat.parallel.from_layout(q, mesh, "seq", "zigzag")),
  ]


@pytest.mark.parametrize("mesh, given", [(None, "NoneType None"),
                                         (jax.devices(), "list [CpuDevice(id=0)]"),
                                         ("seq", "str 'seq'")])
def test_a_mesh_that_is_no_mesh_is_a_type_error_naming_the_function(mesh, given):
  for op, call in _parallel_calls(mesh):
    with raises(TypeError, f"jmat.{op}: mesh must be a jax.sharding.Mesh, got {given}",
                "jax.make_mesh("):
      call()


def test_unhashable_static_arguments_get_jmat_errors_not_jits():
  q = jnp.ones((1, 2, 8, 4))
  with raises(ValueError, "jmat.parallel.ring_attention: the mesh has no axis ['seq']"):
    jmat.parallel.ring_attention(q, q, q, mesh=MESH, axis_name=["seq"])
  with raises(ValueError, "jmat.parallel.to_layout: unknown layout ['zigzag']"):
    jmat.parallel.to_layout(q, MESH, "seq", ["zigzag"])
  with raises(TypeError, "jmat.parallel.from_layout: axis must be an int, got [2]"):
    jmat.parallel.from_layout(q, MESH, "seq", "zigzag", axis=[2])


def test_a_block_size_list_and_numpy_axis_are_accepted():
  q, k, v = randn(1, 2, 8, 4, dtype=np.float64), randn(1, 2, 6, 4, dtype=np.float64), randn(
      1, 2, 6, 3, dtype=np.float64)
  out = jmat.parallel.ring_attention(q, k, v, mesh=MESH, axis_name="seq", block_size=[4, 2])
  np.testing.assert_allclose(out, attention_reference(q, k, v), **tolerance(np.float64))
  laid = jmat.parallel.to_layout(q, MESH, "seq", "zigzag", axis=np.int64(2))
  np.testing.assert_array_equal(jmat.parallel.from_layout(laid, MESH, "seq", "zigzag"), q)


@pytest.mark.parametrize("fn", [jmat.parallel.ring_attention, jmat.parallel.allgather_attention])
def test_ring_with_fewer_key_value_heads_names_enable_gqa(fn):
  q, kv = jnp.ones((2, 4, 8, 6)), jnp.ones((2, 1, 8, 6))
  name = fn.__name__
  with raises(jmat.ShapeError, f"jmat.parallel.{name}: leading (batch, head) dims differ",
              "query has shape (2, 4, 8, 6)", "key has shape (2, 1, 8, 6)",
              "key/value with 1 heads, query with 4", "pass enable_gqa=True"):
    fn(q, kv, kv, mesh=MESH, axis_name="seq")
  with raises(jmat.ShapeError, "pass enable_gqa=True with 4-D (B, H, L, E) inputs"):
    fn(q[0], kv[0], kv[0], mesh=MESH, axis_name="seq")
  two = jnp.ones((2, 2, 8, 6))  # heads that do not broadcast: the attention rule says it
  with raises(jmat.ShapeError, f"jmat.parallel.{name}: ", "pass enable_gqa=True"):
    fn(q, two, two, mesh=MESH, axis_name="seq")
  three = jnp.ones((2, 3, 8, 6))  # 3 heads do not divide 4: no such advice
  with pytest.raises(jmat.ShapeError) as info:
    fn(q, three, three, mesh=MESH, axis_name="seq")
  assert "enable_gqa" not in str(info.value)


def test_ring_with_enable_gqa_gives_the_oracle():
  q, k, v = (randn(1, 4, 8, 6, dtype=np.float64), randn(1, 2, 8, 6, dtype=np.float64),
             randn(1, 2, 8, 5, dtype=np.float64))
  out = jmat.parallel.ring_attention(q, k, v, mesh=MESH, axis_name="seq", enable_gqa=True,
                                     is_causal=np.True_)
  want = attention_reference(q, k, v, enable_gqa=True, is_causal=True)
  np.testing.assert_allclose(out, want, **tolerance(np.float64))


# --- the Triton kernel's tunables ----------------------------------------------------------


@pytest.mark.parametrize("key, value, valid", [
    ("BLOCK_M", 48, "a power of two from 16 (a Triton tile): 16, 32, 64, 128"),
    ("fwd_BLOCK_N", 8, "a power of two from 16 (a Triton tile): 16, 32, 64, 128"),
    ("bwd_BLOCK_M2", 24, "a power of two from 16 (a Triton tile): 16, 32, 64, 128"),
    ("num_warps", 3, "a power of two from 1 to 32 (warps per program; Triton takes powers of "
                     "two): 1, 2, 4, 8, 16, 32"),
    ("num_warps", 64, "1, 2, 4, 8, 16, 32"),
])
def test_triton_tunables_are_refused_under_the_users_key(key, value, valid):
  q = jnp.ones((1, 2, 32, 16))
  for backend in ("TRITON", "AUTO", "XLA"):  # checked whatever the backend: never ignored
    options = {"BACKEND": backend, "INTERPRET": True, key: value}
    with pytest.raises(ValueError) as info:
      jmat.flex_attention(q, q, q, kernel_options=options)
    message = str(info.value)
    assert message.startswith(f"jmat.flex_attention: kernel_options {key}={value} is not valid "
                              f"for the Triton kernel: {key} must be ")
    assert valid in message and "BlockSizes" not in message


@pytest.mark.parametrize("key, value", [("num_stages", 0), ("num_stages", 2.0),
                                        ("BLOCK_N", True), ("num_warps", np.bool_(True))])
def test_triton_counts_must_be_positive_ints(key, value):
  q = jnp.ones((1, 2, 32, 16))
  with raises(ValueError, f"jmat.flex_attention: kernel_options {key}={value!r} must be a "
              "positive int"):
    jmat.flex_attention(q, q, q, kernel_options={key: value})


def test_numpy_integer_tunables_are_ints():
  q, k, v = randn(1, 2, 40, 16), randn(1, 2, 72, 16), randn(1, 2, 72, 8)
  options = {"BACKEND": "TRITON", "INTERPRET": True, "BLOCK_M": np.int64(32),
             "BLOCK_N": np.int32(16), "num_warps": np.int64(4), "num_stages": np.uint8(1)}
  checked = backends.kernel_options("flex_attention", options)
  assert all(type(v) is int for _, v in checked.triton)
  assert dict(checked.triton) == {"block_q": 32, "block_k": 16, "num_warps": 4, "num_stages": 1}
  with jax.default_matmul_precision("highest"):
    out = jmat.flex_attention(q, k, v, kernel_options=options)
  np.testing.assert_allclose(out, attention_reference(q, k, v), **tolerance(np.float32))


# --- flags are bools -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["no", "yes", 1, 0, None, np.int64(1)])
def test_flags_that_are_no_bool_are_type_errors(value):
  q = jnp.ones((1, 2, 8, 4))
  given = f"got {type(value).__name__} {value!r}"
  with raises(TypeError, "jmat.attention.AuxRequest: lse must be True or False", given):
    AuxRequest(lse=value)
  with raises(TypeError, "jmat.attention.AuxRequest: max_scores must be True or False", given):
    AuxRequest(True, value)
  with raises(TypeError, "jmat.flex_attention: return_lse must be True or False", given):
    jmat.flex_attention(q, q, q, return_lse=value)
  with raises(TypeError, "jmat.flex_attention: enable_gqa must be True or False", given):
    jmat.flex_attention(q, q, q, enable_gqa=value)
  with raises(TypeError, "jmat.flex_attention: kernel_options INTERPRET must be True or False",
              given):
    jmat.flex_attention(q, q, q, kernel_options={"INTERPRET": value})
  with raises(TypeError, "jmat.flex_attention: enable_gqa must be True or False", given):
    flex_attention_backend(q, q, q, enable_gqa=value, platform="cpu")
  for flag in ("is_causal", "enable_gqa", "return_lse"):
    with raises(TypeError, f"jmat.parallel.ring_attention: {flag} must be True or False", given):
      jmat.parallel.ring_attention(q, q, q, mesh=MESH, axis_name="seq", **{flag: value})
  for flag in ("is_causal", "enable_gqa"):
    with raises(TypeError, f"jmat.scaled_dot_product_attention: {flag} must be True or False",
                given):
      jmat.scaled_dot_product_attention(q, q, q, **{flag: value})


def test_numpy_bools_are_bools():
  request = AuxRequest(lse=np.True_, max_scores=np.bool_(False))
  assert request == (True, False) and all(type(x) is bool for x in request)
  q, k, v = randn(1, 2, 8, 4, dtype=np.float64), randn(1, 2, 6, 4, dtype=np.float64), randn(
      1, 2, 6, 3, dtype=np.float64)
  out, lse = jmat.flex_attention(q, k, v, return_lse=np.True_)
  want_out, want_lse = attention_reference(q, k, v, return_lse=True)
  np.testing.assert_allclose(out, want_out, **tolerance(np.float64))
  np.testing.assert_allclose(lse, want_lse, **tolerance(np.float64))


def test_aux_request_has_torchs_fields_and_stays_a_named_tuple():
  torch_flex = pytest.importorskip("torch.nn.attention.flex_attention")
  assert AuxRequest._fields == torch_flex.AuxRequest._fields
  assert AuxRequest() == tuple(torch_flex.AuxRequest())
  request = AuxRequest(lse=True)
  assert request.lse is True and request.max_scores is False and isinstance(request, tuple)
  assert repr(request) == "AuxRequest(lse=True, max_scores=False)"
  assert hash(request) == hash(AuxRequest(True, False))  # a static argument of jit


# --- the Mosaic probe does not depend on the machine -------------------------------------------


def test_a_batch_scaled_score_runs_on_mosaic_in_interpret_mode():
  """The issue's mod, refused before because the probe lowered for the host's cpu device."""
  q, k, v = randn(3, 2, 40, 16), randn(3, 2, 24, 16), randn(3, 2, 24, 8)
  options = {"BACKEND": "MOSAIC", "INTERPRET": True}
  with jax.default_matmul_precision("highest"):
    out, lse = jmat.flex_attention(q, k, v, scaled_by_batch, return_lse=True,
                                   kernel_options=options)
  want_out, want_lse = attention_reference(q, k, v, score_fn=scaled_by_batch_reference,
                                           return_lse=True)
  np.testing.assert_allclose(out, want_out, **tolerance(np.float32))
  np.testing.assert_allclose(lse, want_lse, **tolerance(np.float32))


def test_a_batch_scaled_score_has_torchs_gradient_on_mosaic_in_interpret_mode():
  torch = pytest.importorskip("torch")
  from tests.torch_oracle import dense_attention

  q, k, v = (randn(2, 2, 16, 8) for _ in range(3))
  d_out = randn(2, 2, 16, 8)
  options = {"BACKEND": "MOSAIC", "INTERPRET": True}

  def loss(q, k, v):
    out = jmat.flex_attention(q, k, v, scaled_by_batch, kernel_options=options)
    return jnp.sum(out * d_out)

  with jax.default_matmul_precision("highest"):
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  tensors = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v)]
  out, _ = dense_attention(*tensors, score=scaled_by_batch_reference)
  torch.sum(out * torch.tensor(d_out, dtype=torch.float64)).backward()
  for got, tensor in zip(grads, tensors, strict=True):
    np.testing.assert_allclose(got, tensor.grad.numpy(), **tolerance(np.float32))


def test_auto_gives_a_tpu_the_mosaic_kernel_for_a_batch_scaled_score_from_this_cpu():
  q = jax.ShapeDtypeStruct((3, 4, 256, 128), jnp.bfloat16)
  choice = flex_attention_backend(q, q, q, scaled_by_batch, platform="tpu")
  assert choice == ("MOSAIC", "tpu: everything the call needs runs in the MOSAIC kernel")
  text = jax.jit(lambda q, k, v: jmat.flex_attention(q, k, v, scaled_by_batch)).trace(
      q, q, q).lower(lowering_platforms=("cpu",)).as_text()
  assert MOSAIC_CALL not in text  # the cpu program runs the XLA loops
  # Lowered for a TPU in context (as on a TPU host), the program holds the kernel.
  v5e = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=v5e)), \
       jmat.attention.kernel_platforms("tpu"):
    text = jax.jit(lambda q, k, v: jmat.flex_attention(q, k, v, scaled_by_batch)).trace(
        q, q, q).lower(lowering_platforms=("tpu",)).as_text()
  assert MOSAIC_CALL in text


def test_mosaic_in_interpret_mode_keeps_the_kernels_own_refusals():
  """Interpret mode skips the lowering probe, not the rules of the kernel (no float64)."""
  q = jax.ShapeDtypeStruct((1, 2, 16, 8), jnp.float64)
  choice = flex_attention_backend(q, q, q, kernel_options={"BACKEND": "MOSAIC", "INTERPRET": True},
                                  platform="cpu")
  assert choice.backend == "MOSAIC" and "TPUs have no float64" in choice.reason


def test_a_probe_that_crashes_keeps_the_kernel_and_lowering_raises(monkeypatch):
  """A probe failing for another reason than the call (a bug, a missing device) is no reason
  for a silent XLA fallback: the kernel is kept, and its lowering says what is wrong."""
  def crashing(*args, **kwargs):
    raise RuntimeError("no TPU here")

  monkeypatch.setattr(mosaic, "unsupported", crashing)
  q = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.bfloat16)
  choice = flex_attention_backend(q, q, q, platform="tpu")
  assert choice.backend == "MOSAIC"
  assert "its lowering probe failed here, RuntimeError: no TPU here" in choice.reason
  named = flex_attention_backend(q, q, q, kernel_options={"BACKEND": "MOSAIC"}, platform="tpu")
  assert named.backend == "MOSAIC" and not named.reason.startswith("refused")
  with jmat.attention.kernel_platforms("tpu"):
    text = jax.jit(lambda q, k, v: jmat.flex_attention(q, k, v)).trace(q, q, q).lower(
        lowering_platforms=("tpu",)).as_text()
  assert MOSAIC_CALL in text


@pytest.mark.parametrize("error, limitation", [
    (NotImplementedError("Unimplemented primitive in Pallas TPU lowering: sort"), True),
    (ValueError("The Pallas TPU lowering currently requires that the last two dimensions"), True),
    (RuntimeError("cuDNN is not detected."), False), (TypeError("a jmat bug"), False),
    (KeyError("x"), False), (AssertionError(), False)])
def test_only_the_kernels_limits_are_reasons_for_another_backend(error, limitation):
  assert block_sparse.lowering_limitation(error) is limitation


_COMPILE_FOR_V5E = textwrap.dedent("""
    import os, sys
    for name, value in (("JAX_PLATFORMS", "cpu"), ("TPU_ACCELERATOR_TYPE", "v5litepod-1"),
                        ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_SKIP_MDS_QUERY", "1"),
                        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(name, value)
    sys.path.insert(0, os.getcwd())
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import jmat
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1",
                                            chips_per_host_bounds=(1, 1, 1))
    mesh = Mesh(np.array(topology.devices[:1]), ("x",))
    placed = NamedSharding(mesh, PartitionSpec())
    q = jax.ShapeDtypeStruct((3, 4, 512, 128), jnp.bfloat16, sharding=placed)
    def forward(q, k, v):
        return jmat.flex_attention(q, k, v, lambda s, b, h, i, j: s * (b + 1),
                                   kernel_options={"BACKEND": "MOSAIC"})
    def grad(q, k, v):
        return jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
            q, k, v)
    # jax's own Mosaic lowering reads the TPU generation from the mesh in context (the host's
    # cpu device otherwise): compile with the target's mesh set, as on a TPU host.
    with jax.set_mesh(mesh):
        for fn in (forward, grad):
            lowered = jax.jit(fn).lower(q, q, q)
            lowered.compile()
            print(fn.__name__, lowered.as_text().count("tpu_custom_call"))
""")


def test_a_batch_scaled_score_compiles_for_a_v5e_with_libtpus_compile_only_topology():
  """Needs libtpu (not in the test venv): ``JMAT_LIBTPU_PYTHON`` names a python that has it,
  e.g. ``~/.cache/jmat-tpu-venv/bin/python``."""
  python = os.environ.get("JMAT_LIBTPU_PYTHON")
  if python is None:
    if importlib.util.find_spec("libtpu") is None:
      pytest.skip("libtpu is not installed (set JMAT_LIBTPU_PYTHON to a python that has it)")
    python = sys.executable
  result = subprocess.run([python, "-c", _COMPILE_FOR_V5E], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  counts = dict(line.split() for line in result.stdout.splitlines() if line.strip())
  assert counts == {"forward": "1", "grad": "3"}, result.stdout


# --- the structure: checks.py sits below the code it checks; docstrings cite what exists --------


def test_checks_imports_no_jmat_module():
  tree = ast.parse((ROOT / "jmat" / "_src" / "checks.py").read_text())
  imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
  imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names]
  assert not [name for name in imported if name and name.startswith("jmat")], imported


@pytest.mark.parametrize("module", ["jmat._src.kernels.triton", "jmat._src.kernels.mosaic",
                                    "jmat._src.kernels.xla", "jmat._src.backends",
                                    "jmat._src.block_sparse"])
def test_docstring_references_name_what_exists(module):
  source = inspect.getsource(importlib.import_module(module))
  for target in re.findall(r":(?:func|class|mod|data):`~?(jmat\.[\w.]+)`", source):
    parts = target.split(".")
    for split in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
      try:
        obj = importlib.import_module(".".join(parts[:split]))
      except ImportError:
        continue
      for name in parts[split:]:
        assert hasattr(obj, name), f"{module} cites {target}, which does not exist"
        obj = getattr(obj, name)
      break


def test_check_flag_accepts_only_bools():
  assert checks.check_flag("op", "flag", np.True_) is True
  with raises(TypeError, "jmat.op: flag must be True or False (a bool), got float 1.0"):
    checks.check_flag("op", "flag", 1.0)
