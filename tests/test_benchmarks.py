"""Smoke test of ``python -m benchmarks --quick``: it runs, writes its files, and they are complete.

A schema check only: no test here looks at a time (speed is measured, never asserted).
The quick run takes well under two minutes on two cores. The GPU and TPU suites are
checked as far as a machine without those devices can (see the second half).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

SUITES = ("products", "eager", "dtypes", "family", "attention", "memory", "flex", "decode")
TIMED = {
    "median_s": float, "min_s": float, "max_s": float, "samples": int, "calls_per_sample": int,
    "samples_s": list, "gflops": float, "ratio_vs_jnp": (float, type(None)),
    "ratio_vs_torch": (float, type(None)), "pct_of_peak": (float, type(None)),
}
MEMORY = {
    "peak_rss_bytes": int, "baseline_rss_bytes": int, "temp_bytes": (int, type(None)),
    "time_s": float,
}
COMPETITORS = {
    "products": ["jmat", "jnp", "jnp again", "lax", "einsum", "numpy", "torch"],
    "eager": ["jmat", "jnp", "numpy", "torch"],
    "dtypes": ["jmat", "jnp", "jnp again", "lax", "einsum", "numpy", "torch"],
    "family": ["jmat", "jnp", "jnp left-to-right", "numpy", "torch"],
    "attention": ["jmat default", "jmat dense", "jmat blockwise", "jax.nn", "torch"],
    "memory": ["jmat default", "jmat dense", "jmat blockwise", "jax.nn", "torch"],
    "flex": ["jmat", "torch", "jax.nn"],
    "decode": ["jmat paged", "jmat flex", "jmat varlen", "jmat varlen paged", "torch",
               "torch SDPA", "jnp dense"],
}
# Competitors that exist whatever else is installed or still being written.
ALWAYS_RUN = {"jnp", "jnp again", "lax", "einsum", "numpy", "jax.nn", "jnp dense", "jmat paged",
              "jmat flex", "jmat varlen", "jmat varlen paged"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
  out = tmp_path_factory.mktemp("bench")
  command = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  (folder,) = [p for p in out.iterdir() if p.is_dir()]
  return folder, json.loads((folder / "results.json").read_text())


def test_writes_json_markdown_and_one_png_per_suite(run):
  folder, results = run
  assert folder.name == results["tag"]
  markdown = (folder / "results.md").read_text()
  for suite in SUITES:
    assert f"## {suite}:" in markdown
    png = (folder / f"{suite}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), suite


def test_machine_is_described(run):
  _, results = run
  machine = results["machine"]
  for key in ("cpu_model", "cores", "memory_bytes", "device_platform", "device_kind"):
    assert machine[key], key
  for package in ("jax", "jaxlib", "numpy", "jmat"):
    assert machine["versions"][package], package
  for suite in results["suites"].values():
    run_info = suite["run"]
    assert run_info["quick"] is True
    assert len(run_info["load_average_before"]) == 3


@pytest.mark.parametrize("suite_name", SUITES)
def test_every_case_holds_every_competitor_and_field(run, suite_name):
  _, results = run
  suite = results["suites"][suite_name]
  assert suite["competitors"] == COMPETITORS[suite_name]
  fields = MEMORY if suite_name == "memory" else TIMED
  assert suite["cases"], suite_name
  for case in suite["cases"]:
    assert list(case["results"]) == COMPETITORS[suite_name], case["name"]
    for name, record in case["results"].items():
      where = f"{suite_name} / {case['name']} / {name}"
      assert record["status"] in ("ok", "skipped"), f"{where}: {record}"
      if record["status"] == "skipped":
        assert record["reason"], where
        continue
      for field, kind in fields.items():
        assert isinstance(record[field], kind), f"{where}: {field} = {record[field]!r}"
      if suite_name != "memory":
        assert record["min_s"] <= record["median_s"] <= record["max_s"], where
        assert len(record["samples_s"]) == record["samples"], where
      if name in ALWAYS_RUN:
        assert record["status"] == "ok", where


def test_flex_records_the_peak_rss_of_a_fresh_forward_backward_process(run):
  _, results = run
  (case,) = [c for c in results["suites"]["flex"]["cases"] if "memory" in c["info"]]
  memory = case["info"]["memory"]
  assert memory["status"] == "ok", memory
  for field, kind in MEMORY.items():
    assert isinstance(memory[field], kind), f"{field} = {memory[field]!r}"


@pytest.mark.parametrize("suite_name", ["products", "eager", "dtypes"])
def test_the_core_ops_are_measured_against_jnp(run, suite_name):
  _, results = run
  for case in results["suites"][suite_name]["cases"]:
    jmat, jnp = case["results"]["jmat"], case["results"]["jnp"]
    assert jmat["status"] == "ok", case["name"]
    assert isinstance(jmat["ratio_vs_jnp"], float), case["name"]
    assert jnp["ratio_vs_jnp"] == 1.0, case["name"]  # a reference against itself, round by round


@pytest.mark.parametrize("suite_name", ["products", "dtypes"])
def test_compiled_cases_record_whether_jmat_compiles_to_jnps_program(run, suite_name):
  _, results = run
  for case in results["suites"][suite_name]["cases"]:
    assert isinstance(case["info"]["same_hlo_as_jnp"], bool), case["name"]


def test_dtypes_suite_covers_every_dtype(run):
  _, results = run
  dtypes = [case["dtype"] for case in results["suites"]["dtypes"]["cases"]]
  assert dtypes == ["float32", "bfloat16", "float16", "float64", "int32"]


def test_jmat_bench_reaches_the_benchmarks(capsys):
  from jmat.__main__ import main

  with pytest.raises(SystemExit) as exit_info:
    main(["bench", "--", "--help"])
  assert exit_info.value.code == 0
  assert "--suite" in capsys.readouterr().out


# --- the GPU and TPU runs, as far as a machine without them can check -----------------------
# The device suites (benchmarks/accelerators.py) build here: their cases, FLOP counts, masks
# and peak table against independent counts; their calls in Pallas interpret mode; their
# kernels lowered for cuda and tpu; their report from a results record; and the refusal
# when the device is missing. What needs the device: the timings, cuDNN (it neither
# interprets nor lowers without a GPU), torch on CUDA.

DEVICE_KINDS = {  # JAX's device_kind strings -> the vendors' peak dense bf16 TFLOP/s
    "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5": 459.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "NVIDIA L40S": None, "NVIDIA GeForce RTX 4090": None, "cpu": None, "TPU v3": None,
}


@pytest.mark.parametrize("kind", list(DEVICE_KINDS))
def test_peak_table_knows_the_listed_devices_and_no_others(kind):
  from benchmarks.machine import peak_bf16_tflops

  assert peak_bf16_tflops(kind) == DEVICE_KINDS[kind]


def _allowed_pairs(kind: str, length: int) -> np.ndarray:
  """The flex suite's masks, densely, in numpy: the oracle of every count below."""
  from benchmarks.flex import WINDOW, document_ids

  q, kv = np.arange(length)[:, None], np.arange(length)[None, :]
  ids = document_ids(length)
  return {
      "full": np.ones((length, length), bool),
      "causal": kv <= q,
      "sliding window": (kv <= q) & (q - kv <= WINDOW),
      "documents": (kv <= q) & (ids[q] == ids[kv]),
      "prefix-LM": (kv <= q) | (kv < length // 4),
  }[kind]


def _touched_blocks(allowed: np.ndarray, block: int) -> np.ndarray:
  n = -(-allowed.shape[0] // block)
  padded = np.zeros((n * block, n * block), bool)
  padded[: allowed.shape[0], : allowed.shape[1]] = allowed
  return padded.reshape(n, block, n, block).any(axis=(1, 3))


@pytest.mark.parametrize("length", [640, 701])  # whole blocks, and a ragged last block
@pytest.mark.parametrize("kind", ["full", "causal", "sliding window", "documents", "prefix-LM"])
def test_computed_pairs_count_every_pair_of_every_block_holding_an_allowed_pair(kind, length):
  from benchmarks import flex

  allowed = _allowed_pairs(kind, length)
  touched = _touched_blocks(allowed, 128)
  padded = np.zeros(touched.shape[0] * 128, bool)
  padded[:length] = True
  real = padded.reshape(-1, 128).sum(axis=1)  # real rows (and columns) of each block
  assert flex.computed_pairs(kind, length, 128) == int(real @ touched @ real)
  assert flex.allowed_keys(kind, length).sum() == allowed.sum()


@pytest.mark.parametrize("kind", ["causal", "sliding window", "documents", "prefix-LM"])
def test_jmat_and_torch_block_masks_list_the_counted_blocks_of_the_numpy_mask(kind):
  """The computed blocks are what both libraries' BlockMasks list (BLOCK_SIZE 128), and both
  libraries' mask_mods are the numpy mask."""
  import torch
  from torch.nn.attention import flex_attention as torch_flex

  import jmat
  from benchmarks import flex

  length = 701
  allowed = _allowed_pairs(kind, length)
  touched = _touched_blocks(allowed, 128).sum()
  mask = jmat.create_block_mask(flex.jmat_mask(kind, length), None, None, length, length)
  assert int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()) == touched
  np.testing.assert_array_equal(np.asarray(mask.to_dense())[0, 0] > 0,
                                _touched_blocks(allowed, 128))
  mod = flex.torch_mask(torch, kind, length)
  theirs = torch_flex.create_block_mask(mod, None, None, length, length, device="cpu")
  assert int(theirs.kv_num_blocks.sum() + theirs.full_kv_num_blocks.sum()) == touched
  dense = torch_flex.create_mask(mod, None, None, length, length, device="cpu")
  np.testing.assert_array_equal(dense[0, 0].numpy(), allowed)


@pytest.mark.parametrize("kind", ["full", "causal", "sliding window", "prefix-LM"])
def test_splash_masks_are_the_numpy_masks(kind):
  from benchmarks.accelerators import splash_mask

  np.testing.assert_array_equal(splash_mask(kind, 701)[:, :], _allowed_pairs(kind, 701))


def _fake_target(platform: str, kind: str):
  from types import SimpleNamespace

  from benchmarks.competitors import Target

  return Target(SimpleNamespace(platform=platform, device_kind=kind), None)  # type: ignore[arg-type]


@pytest.mark.parametrize("platform, kind, peers", [
    ("gpu", "NVIDIA H200", ["jmat triton", "jmat xla", "torch", "cudnn"]),
    ("tpu", "TPU v9 prototype", ["jmat mosaic", "jmat xla", "splash"]),
])
def test_device_suites_cases_and_counts(platform, kind, peers):
  from benchmarks import accelerators as acc
  from benchmarks import flex

  flex_suite = acc.flex_suite(_fake_target(platform, kind), False)
  attention = acc.attention_suite(_fake_target(platform, kind), False)
  for suite in (flex_suite, attention):
    assert list(suite.competitors) == peers
    assert suite.reference in peers and not suite.jax_enable_x64
    assert len({c.name for c in suite.cases}) == len(suite.cases)
  masks = ["causal", "sliding window", "documents", "prefix-LM", "causal"]
  forward = [(c.info["mask"], c.info["length"]) for c in flex_suite.cases
             if c.info["pass"] == "forward"]
  assert forward == [(m, n) for n in (4096, 8192, 16384) for m in masks]
  backward = [(c.info["mask"], c.info["length"]) for c in flex_suite.cases
              if c.info["pass"] == "forward+backward"]
  assert backward == [(m, 16384) for m in masks]
  assert [c.info["mask"] for c in attention.cases] == ["causal", "full"] * 4
  for c in flex_suite.cases + attention.cases:
    assert c.dtype == "bfloat16" and c.info["shape"] == [1, 16, c.info["length"], 128]
    per_pair = 4 * 16 * 128 * (3.5 if c.info["pass"] == "forward+backward" else 1.0)
    assert c.computed_flops >= c.flops
    assert c.flops == pytest.approx(per_pair * flex.allowed_keys(
        c.info["mask"], c.info["length"]).sum())
    assert c.computed_flops == pytest.approx(per_pair * flex.computed_pairs(
        c.info["mask"], c.info["length"], 128))
  notes = " ".join(flex_suite.notes)
  assert ("989 TFLOP/s" in notes) if platform == "gpu" else ("n/a" in notes)


def test_a_tpu_case_runs_in_interpret_mode_and_splash_agrees_with_jmat():
  """A TPU case's calls, run here in Pallas interpret mode: splash, with its segment ids and
  pre-scaled q, computes what jmat's XLA kernel computes (the GPU peers' masks are checked
  against numpy above; cuDNN's cannot be run here)."""
  from benchmarks import accelerators as acc
  from benchmarks.competitors import Target

  target = Target(jax.devices("cpu")[0], "cpu")
  problem = acc.Problem("documents", 256, softcap=True, heads=2)
  calls = acc.case(target, problem, "tpu", interpret=True).build()
  assert list(calls) == ["jmat mosaic", "jmat xla", "splash"]
  np.testing.assert_allclose(np.asarray(calls["splash"](), np.float32),
                             np.asarray(calls["jmat xla"](), np.float32), atol=0.02)


def test_a_gpu_case_without_cuda_skips_torch_and_cudnn_says_what_it_lacks():
  from benchmarks import accelerators as acc
  from benchmarks.competitors import Target

  target = Target(jax.devices("cpu")[0], "cpu")
  calls = acc.case(target, acc.Problem("prefix-LM", 256, heads=2), "gpu", interpret=True).build()
  assert list(calls) == ["jmat triton", "jmat xla", "torch", "cudnn"]
  assert "no CUDA device" in calls["torch"].reason  # torch's CPU kernels are no GPU competitor
  assert "no prefix-LM mask" in calls["cudnn"].reason


@pytest.mark.parametrize("platform, lowering, kernel_call, problem", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton", dict(kind="documents", backward=True)),
    ("tpu", "tpu", "tpu_custom_call", dict(kind="causal", softcap=True, backward=True)),
])
def test_device_competitors_lower_to_their_kernels(platform, lowering, kernel_call, problem):
  """The device suites' JAX competitors (at L=4096; the suites run up to 16384) lower to
  their Pallas kernels for cuda and tpu, forward and backward; jmat xla to none."""
  from benchmarks import accelerators as acc

  problem = acc.Problem(length=4096, **problem)
  x = np.zeros(problem.shape, jnp.bfloat16)
  with jax.enable_x64(False):  # as the device suites run them
    for name, make in acc.jax_peers(problem, platform).items():
      if name == "cudnn":  # lowers only where cuDNN is installed: unverifiable here
        continue
      peer = make()
      assert isinstance(peer, acc.Peer), f"{name}: {peer}"
      args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in peer.inputs(x, x, x)]
      text = jax.jit(peer.fn).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
      assert (kernel_call in text) == (name != "jmat xla"), name


def test_a_device_run_without_the_device_is_refused_in_one_line(tmp_path):
  device = "gpu"
  if device in {d.platform for d in jax.devices()}:
    pytest.skip(f"this machine has a {device}")
  command = [sys.executable, "-m", "benchmarks", "--suite", "flex", "--device", device,
             "--out", str(tmp_path)]
  done = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith(f"python -m benchmarks: no JAX device '{device}' here")
  assert f"--device {device} needs" in line
  assert not list(tmp_path.iterdir())


def _made_up_records(competitors, i: int, unit: float, skipped) -> dict:
  """Case ``i``'s records as the runner writes them, competitor ``j`` taking
  ``unit * (i + 1) * (j + 1)`` s; ``skipped(name)``: why a competitor did not run, or None."""
  records = {}
  for j, name in enumerate(competitors):
    reason = skipped(name)
    if reason is not None:
      records[name] = {"status": "skipped", "reason": reason}
      continue
    t = unit * (i + 1) * (j + 1)
    records[name] = {"status": "ok", "median_s": t, "min_s": 0.9 * t, "max_s": 1.2 * t,
                     "samples": 3, "calls_per_sample": 1, "samples_s": [t, 0.9 * t, 1.2 * t]}
  return records


def _device_results(kind: str) -> dict:
  """A results record as a GPU run writes it, with made-up times (the report is under test)."""
  from benchmarks import accelerators as acc

  target = _fake_target("gpu", kind)
  suite = acc.flex_suite(target, True)
  cases = []
  for i, case in enumerate(suite.cases):
    results = _made_up_records(suite.competitors, i, 1e-3, lambda name, case=case: (
        "no such mask" if name == "cudnn" and case.info["mask"] != "causal" else None))
    cases.append({"name": case.name, "dtype": case.dtype, "flops": case.flops,
                  "computed_flops": case.computed_flops, "info": dict(case.info),
                  "results": results})
  run = {"started": "2026-01-01T00:00:00+00:00", "duration_s": 60.0, "quick": True,
         "device": "gpu", "device_kind": kind, "jax_enable_x64": False, "repeats": 3,
         "min_sample_s": 0.005, "settle_s": 0.0, "load_average_before": [0.1, 0.1, 0.1],
         "load_average_after": [0.1, 0.1, 0.1]}
  machine = {"cpu_model": "Some CPU", "cpu_flags": [], "cores": 16, "memory_bytes": 2**37,
             "os": "Linux", "python": "3.12", "device_platform": "gpu", "device_kind": kind,
             "device_count": 1, "torch_device": "cuda", "torch_threads": 16,
             "accelerator": {"name": kind, "count": 1, "peak_bf16_tflops":
                             DEVICE_KINDS.get(kind), "versions": {"triton": "3.5.0"}},
             "versions": {"jmat": "0", "jax": "0.11.0", "jaxlib": "0.11.0", "numpy": "2",
                          "torch": "2.11.0"}}
  return {"schema_version": 1, "tag": f"gpu-{kind}-x1", "machine": machine, "suites": {
      "flex": {"kind": "time", "title": suite.title, "competitors": list(suite.competitors),
               "reference": suite.reference, "notes": list(suite.notes), "name": "flex",
               "run": run, "cases": cases}}}


@pytest.mark.parametrize("kind", ["NVIDIA H200", "NVIDIA RTX 9999"])
def test_a_gpu_run_reports_tflops_over_computed_blocks_and_the_share_of_the_peak(kind, tmp_path):
  from benchmarks import readme, report
  from benchmarks.__main__ import SPECS

  results = _device_results(kind)
  paths = report.write(results, tmp_path, SPECS)
  written = json.loads((tmp_path / "results.json").read_text())
  peak = DEVICE_KINDS.get(kind)
  for case in written["suites"]["flex"]["cases"]:
    for record in case["results"].values():
      if record["status"] != "ok":
        continue
      tflops = case["computed_flops"] / record["median_s"] / 1e12
      assert record["tflops_computed"] == pytest.approx(tflops, rel=1e-3)
      if peak is None:
        assert record["pct_of_device_peak"] is None
      else:
        assert record["pct_of_device_peak"] == pytest.approx(100 * tflops / peak, rel=1e-3)
  assert (tmp_path / "flex.png").read_bytes().startswith(b"\x89PNG") and len(paths) == 3
  markdown = (tmp_path / "results.md").read_text()
  assert "TFLOP/s over the computed blocks" in markdown and "% of device peak" in markdown
  readme_path = tmp_path / "README.md"
  readme_path.write_text("# x\n\n<!-- bench:start -->\nthe CPU block\n<!-- bench:end -->\n")
  for _ in range(2):  # a second run replaces the GPU block, and keeps the CPU one
    readme.update_readme(readme_path, tmp_path, SPECS)
  text = readme_path.read_text()
  assert text.count("<!-- bench:gpu:start -->") == 1 and "the CPU block" in text
  block = text.split("<!-- bench:gpu:start -->")[1]
  assert f"## Benchmarks on 1 x {kind}" in block
  assert "jmat triton % of device peak" in block
  first_row = block.split("| causal L=1024 |")[1].splitlines()[0]
  cell = first_row.strip(" |").split(" | ")[-1]
  mine = written["suites"]["flex"]["cases"][0]["results"]["jmat triton"]
  if peak is None:
    assert cell == "n/a"
  else:
    assert float(cell.removesuffix("%")) == pytest.approx(mine["pct_of_device_peak"], rel=0.05)
  assert "TFLOP/s over the computed blocks" in block  # the "In short" line


# --- the ring suite (benchmarks/ring_attention.py): layouts and masks on 8 simulated devices --
RING_MASKS = ("causal", "sliding window", "documents", "prefix-LM", "none")


def _ring_allowed(kind: str, length: int) -> np.ndarray:
  """The ring suite's masks, densely, in numpy (the documents from the suite's packed lengths)."""
  from benchmarks.ring_attention import WINDOW, document_lengths

  q, kv = np.arange(length)[:, None], np.arange(length)[None, :]
  ids = np.repeat(np.arange(len(document_lengths(length))), document_lengths(length))
  return {
      "causal": kv <= q,
      "sliding window": (kv <= q) & (q - kv <= WINDOW),
      "documents": (kv <= q) & (ids[q] == ids[kv]),
      "prefix-LM": (kv <= q) | (kv < length // 4),
      "none": np.zeros((length, length), bool),
  }[kind]


def _ring_rows(layout: str, length: int, devices: int = 8) -> list[np.ndarray]:
  """The global positions each device holds: contiguous runs, or chunks i and 2n-1-i."""
  if layout == "contiguous":
    return list(np.arange(length).reshape(devices, -1))
  chunks = np.arange(length).reshape(2 * devices, -1)
  return [np.concatenate([chunks[i], chunks[2 * devices - 1 - i]]) for i in range(devices)]


@pytest.mark.parametrize("length", [2048, 4096, 16384])
def test_ring_document_lengths_pack_the_sequence(length):
  from benchmarks.ring_attention import document_lengths

  lengths = document_lengths(length)
  assert sum(lengths) == length and min(lengths) >= 1
  longer = document_lengths(2 * length)
  assert lengths[:-1] == longer[: len(lengths) - 1]  # the same seed packs the same documents


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("kind", RING_MASKS)
def test_ring_mask_mods_are_the_numpy_masks_and_cut_to_one_device(kind, layout):
  import jmat
  from benchmarks.ring_attention import mask_mod, only_device

  length, device = 2048, 5
  allowed = _ring_allowed(kind, length)
  mod = mask_mod(kind, length)
  dense = jmat.attention.create_mask(mod, None, None, length, length)[0, 0]
  np.testing.assert_array_equal(np.asarray(dense), allowed)
  alone = np.zeros_like(allowed)
  rows = _ring_rows(layout, length)[device]
  alone[rows] = allowed[rows]
  cut = jmat.attention.create_mask(only_device(mod, device, layout, length), None, None,
                                   length, length)[0, 0]
  np.testing.assert_array_equal(np.asarray(cut), alone)


def test_ring_suite_reports_layouts_and_masks_on_8_simulated_devices(tmp_path):
  """A small run of ``python -m benchmarks.ring_attention --time``: both tables, every record,
  the blocks per device against the numpy masks, per-device memory against the formulas."""
  from benchmarks.ring_attention import BATCH, HEAD_DIM, HEADS, formulas

  out, length = tmp_path / "ring.json", 2048
  command = [sys.executable, "-m", "benchmarks.ring_attention", "--lengths", "64",
             "--mask-lengths", str(length), "--time", "--out", str(out)]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| L | variant | pass |" in done.stdout and "| L | mask | layout |" in done.stdout
  results = json.loads(out.read_text())
  assert {(p["variant"], p["pass"]) for p in results["points"]} == {
      (v, p) for v in ("ring", "allgather", "blockwise, 1 device")
      for p in ("forward", "forward+backward")}
  records = {(r["mask"], r["layout"]): r for r in results["layouts"]}
  assert set(records) == {(m, lay) for m in RING_MASKS for lay in ("contiguous", "zigzag")}
  gathered = formulas(BATCH * HEADS, length, length, HEAD_DIM, HEAD_DIM, 8, 4)["gathered_kv"]
  for (kind, layout), r in records.items():
    touched = _touched_blocks(_ring_allowed(kind, length), 128)
    blocks = [int(touched[np.unique(rows // 128)].sum()) for rows in _ring_rows(layout, length)]
    assert r["work"] == blocks, (kind, layout)
    assert isinstance(r["time_s"], float)
    if kind == "none":
      assert r["max_over_mean"] is None and r["busiest_time_s"] is None
    else:
      assert r["max_over_mean"] == pytest.approx(max(blocks) / np.mean(blocks))
      assert blocks[r["busiest_device"]] == max(blocks)
      assert isinstance(r["busiest_time_s"], float)
    # A device holds about the formula's blocks, tiles and carry, less than all keys and values.
    assert 0.75 * r["formula_temp_bytes"] <= r["temp_bytes"] < gathered, (kind, layout)


def test_decode_pools_hold_what_torchs_paged_attention_holds():
  # jmat paged and torch read the same keys at the same pool positions.
  import torch
  from torch.nn.attention.experimental._paged_attention import PagedAttention

  from benchmarks import decode

  batch, length = 3, 2 * decode.PAGE
  rng = np.random.default_rng(0)
  k, v = (rng.standard_normal((batch, 2, length, 4), dtype=np.float32) for _ in range(2))
  k_pool, v_pool = decode._paged_cache(decode._pages(batch, length), k, v)
  theirs = PagedAttention(batch * length // decode.PAGE, decode.PAGE, batch, device="cpu")
  for end in range(decode.PAGE, length + 1, decode.PAGE):
    for b in range(batch):
      theirs.reserve(torch.tensor(b), torch.tensor(end))
  t_k, t_v = torch.zeros(k_pool.shape), torch.zeros(v_pool.shape)
  theirs.assign(torch.arange(batch), torch.arange(length).expand(batch, length),
                torch.from_numpy(k), torch.from_numpy(v), t_k, t_v)
  np.testing.assert_array_equal(k_pool, t_k.numpy())
  np.testing.assert_array_equal(v_pool, t_v.numpy())


def test_decode_competitors_compute_the_same_attention():
  # Every decode competitor (its own layout of the cache) gives the step's attention: the numpy
  # float64 softmax of one query per sequence over all of its cache, GQA 32:8.
  import jax

  from benchmarks import decode
  from benchmarks.competitors import Target

  batch, length = 2, 2 * decode.PAGE
  target = Target(jax.devices("cpu")[0], "cpu")
  calls = decode._case(target, batch, length, torch_flex=False).build()
  q = np.random.default_rng(1).standard_normal((batch, decode.HEADS, 1, decode.HEAD_DIM),
                                               dtype=np.float32).astype(np.float64)
  k, v = (x.astype(np.float64) for x in target.random(
      [(batch, decode.KV_HEADS, length, decode.HEAD_DIM)] * 2, "float32"))
  groups = decode.HEADS // decode.KV_HEADS
  k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
  s = q @ np.swapaxes(k, -1, -2) / np.sqrt(decode.HEAD_DIM)
  p = np.exp(s - s.max(-1, keepdims=True))
  want = (p / p.sum(-1, keepdims=True)) @ v
  ran = set()
  for name, call in calls.items():
    if callable(call):
      got = np.asarray(call(), np.float64).reshape(want.shape)
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
      ran.add(name)
  assert ran == set(decode.COMPETITORS) - {"torch"}


# --- the decode suite on a GPU or TPU (benchmarks/decode_device.py), as far as a CPU can -------


@pytest.mark.parametrize("batch, length, run", [(3, 4 * 128, 1), (2, 8 * 128, 4)])
def test_decode_page_table_is_what_torchs_and_jmats_paged_attention_reserve(batch, length, run):
  import torch
  from torch.nn.attention.experimental._paged_attention import PagedAttention

  from benchmarks import decode

  pages = length // decode.PAGE
  theirs = PagedAttention(batch * pages, decode.PAGE, batch, device="cpu")
  for b, end in decode.reservations(batch, length, run):
    theirs.reserve(torch.tensor(b), torch.tensor(end))
  table = decode.page_table(batch, length, run)
  np.testing.assert_array_equal(table, theirs.page_table[:, :pages].numpy())
  np.testing.assert_array_equal(table, np.asarray(decode._pages(batch, length, run).page_table)[
      :, :pages])


def test_device_decode_grid_reserves_few_runs_and_reads_past_the_l2():
  from benchmarks import decode
  from benchmarks import decode_device as dd

  cases = {*dd.grid(False), *dd.grid(True)}
  for batch, length in cases:
    run = dd.run_of(batch, length)
    assert (length // 128) % run == 0
    assert len(decode.reservations(batch, length, run)) <= dd.MAX_RESERVATIONS
    assert dd.kv_bytes(batch, length) == 2 * batch * length * 8 * 128 * 2 >= 128 * 2**20


@pytest.fixture(scope="module")
def decode_inputs():
  """A tiny device decode case on the CPU (GQA 4:2, D=128, pages interleaved in runs of 2),
  and the numpy float64 attention of its one query per sequence over its whole cache."""
  from benchmarks import decode_device as dd

  inputs = dd.make_inputs(3, 4 * 128, jax.devices("cpu")[0], heads=4, kv_heads=2, run=2)
  q, k, v = (np.asarray(x, np.float64) for x in (inputs.q, inputs.k, inputs.v))
  k, v = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
  s = np.einsum("bhd,bhsd->bhs", q, k) / np.sqrt(128)
  p = np.exp(s - s.max(-1, keepdims=True))
  return inputs, np.einsum("bhs,bhsd->bhd", p / p.sum(-1, keepdims=True), v)


def test_device_decode_layouts_hold_the_contiguous_cache(decode_inputs):
  # Every layout a competitor reads holds, at the pages of the page table, the contiguous cache.
  from benchmarks import decode
  from benchmarks import decode_device as dd

  inputs, _ = decode_inputs
  k, table = np.asarray(inputs.k), np.asarray(inputs.table)
  np.testing.assert_array_equal(table, decode.page_table(3, 4 * 128, 2))
  pool, pages = np.asarray(inputs.k_pool), np.asarray(inputs.k_pages)
  ragged = np.asarray(dd.ragged_pool(inputs.k_pages, inputs.v_pages))
  big_table = dd._big_page_table(3, 4 * 128)
  big = np.asarray(dd.to_pages(inputs.k, jnp.asarray(big_table), 256))
  for b, i in np.ndindex(table.shape):
    want = k[b, :, i * 128: (i + 1) * 128]  # (Hkv, page, D)
    page = table[b, i]
    np.testing.assert_array_equal(pool[0, :, page * 128: (page + 1) * 128], want)
    np.testing.assert_array_equal(pages[page].transpose(1, 0, 2), want)
    np.testing.assert_array_equal(ragged[page, :, 0::2].transpose(1, 0, 2), want)
    np.testing.assert_array_equal(ragged[page, :, 1::2].transpose(1, 0, 2),
                                  np.asarray(inputs.v)[b, :, i * 128: (i + 1) * 128])
    half = big[big_table[b, i // 2], (i % 2) * 128: (i % 2 + 1) * 128]
    np.testing.assert_array_equal(half.transpose(1, 0, 2), want)


def _decode_values(step) -> np.ndarray:
  with jax.enable_x64(False):  # as the device suite runs them
    return np.asarray(jax.jit(step.fn)(*step.args), np.float64)


BF16_ATOL = 2**-7  # two bfloat16 roundings of outputs of about 0.05 (a wrong page: ~0.05 off)


def test_device_decode_gpu_competitors_compute_the_attention(decode_inputs):
  """jmat's two competitors (AUTO: here the XLA loops; the fused kernels are jmat's own tests')
  and JAX's two GPU kernels in Pallas interpret mode give the numpy float64 attention of every
  query over its paged cache."""
  from benchmarks import decode_device as dd

  inputs, want = decode_inputs
  cpu = jax.devices("cpu")[0]
  auto, interpreted = (dd.jax_steps(inputs, "gpu", cpu, interpret=i) for i in (False, True))
  assert list(auto) == ["jmat paged", "jmat varlen paged", "jax paged", "jax decode"]
  for name in auto:
    make = auto[name] if name.startswith("jmat") else interpreted[name]
    np.testing.assert_allclose(_decode_values(make()), want, atol=BF16_ATOL, err_msg=name)


def test_device_decode_tpu_paged_kernels_compute_the_attention(decode_inputs):
  """JAX's TPU paged_attention under the TPU interpret mode; ragged_paged_attention does not
  run there, so its reference (ref_ragged_paged_attention) checks what the suite hands it."""
  from jax.experimental.pallas import tpu as pltpu

  from benchmarks import decode_device as dd

  inputs, want = decode_inputs
  steps = dd.jax_steps(inputs, "tpu", jax.devices("cpu")[0], ragged_blocks=(1, 8))
  with pltpu.force_tpu_interpret_mode():
    np.testing.assert_allclose(_decode_values(steps["jax paged"]()), want, atol=BF16_ATOL)
  ragged = steps["jax ragged"]()
  reference = dd._import("tpu.ragged_paged_attention").kernel.ref_ragged_paged_attention
  with jax.enable_x64(False):
    got = reference(*ragged.args, sm_scale=1 / np.sqrt(128))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=BF16_ATOL)


@pytest.fixture(scope="module")
def suite_decode_inputs():
  """A small case of the device suite's shapes (GQA 32:8, D=128, bfloat16) on the CPU."""
  from benchmarks import decode_device as dd

  return dd.make_inputs(2, 4 * 128, jax.devices("cpu")[0])


@pytest.mark.parametrize("platform, lowering, kernel_call, chip", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton", "NVIDIA H100"),
    ("tpu", "tpu", "tpu_custom_call", "TPU v5 lite"),
])
def test_device_decode_competitors_lower_to_their_kernels(platform, lowering, kernel_call, chip,
                                                         suite_decode_inputs):
  """Every JAX competitor of the device suite (GQA 32:8, bfloat16) lowers for cuda or tpu to a
  Pallas kernel: jmat's with kernel_options AUTO, as the suite runs them."""
  import jmat
  from benchmarks import decode_device as dd

  cpu, inputs = jax.devices("cpu")[0], suite_decode_inputs
  # Pallas reads the chip it lowers for from the mesh in context (else the default device, a
  # CPU here; jax 0.10 let Triton lower without one, 0.11 does not). Auto axes: under jax
  # 0.11's default Explicit ones jmat's Triton probe fails and AUTO would pick XLA.
  device = jax.sharding.AbstractDevice(device_kind=chip, num_cores=1, platform=platform)
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=device)
  with jax.enable_x64(False):
    steps = {name: make() for name, make in dd.jax_steps(inputs, platform, cpu,
                                                          ragged_blocks=(4, 8)).items()}
    with jmat.attention.kernel_platforms(lowering), jax.sharding.use_abstract_mesh(mesh):
      for name, step in steps.items():
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), step.args)
        text = jax.jit(step.fn).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
        assert kernel_call in text, name


def test_a_device_decode_gpu_case_without_cuda_skips_torch_saying_why(decode_inputs):
  from benchmarks import decode_device as dd
  from benchmarks.competitors import Target

  calls = dd._torch_calls(Target(jax.devices("cpu")[0], "cpu"), decode_inputs[0])
  assert [*dd.JMAT, *calls] == list(dd.competitors("gpu"))[:4]
  for name, make in calls.items():
    assert "no CUDA device" in make().reason, name


def test_torch_varlen_without_paging_arguments_is_skipped_with_the_reason():
  import torch

  from benchmarks import decode_device as dd

  assert dd.varlen_lacks(dd.torch_varlen(torch)) is None  # torch 2.13 here

  def older(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    raise AssertionError("never called")

  assert "block_table or seqused_k" in dd.varlen_lacks(older)


def _decode_device_results(kind: str) -> dict:
  """A GPU decode run as the runner records it, with made-up times (the report is under test)."""
  from benchmarks import decode_device as dd

  results = _device_results(kind)
  suite = dd.decode_suite(_fake_target("gpu", kind), True)
  cases = []
  for i, case in enumerate(suite.cases):
    records = _made_up_records(suite.competitors, i, 1e-4, lambda name: (
        "takes no block_table" if name == "torch varlen" else None))
    cases.append({"name": case.name, "dtype": case.dtype, "flops": case.flops,
                  "info": dict(case.info), "results": records})
  run = dict(results["suites"]["flex"]["run"])
  results["suites"] = {"decode": {
      "kind": "time", "title": suite.title, "competitors": list(suite.competitors),
      "reference": suite.reference, "notes": list(suite.notes), "name": "decode", "run": run,
      "cases": cases}}
  return results


@pytest.mark.parametrize("kind, peak", [("NVIDIA H200", 4800.0), ("NVIDIA RTX 9999", None)])
def test_a_gpu_decode_run_reports_bandwidth_and_ratios_to_the_best_peer(kind, peak, tmp_path):
  from benchmarks import decode_device as dd
  from benchmarks import report
  from benchmarks.__main__ import SPECS

  results = _decode_device_results(kind)
  paths = report.write(results, tmp_path, SPECS)
  assert (tmp_path / "decode.png").read_bytes().startswith(b"\x89PNG") and len(paths) == 3
  record = json.loads((tmp_path / "results.json").read_text())["suites"]["decode"]
  assert record["reference"] == "jax paged" and dd.peak_gbps(kind) == peak
  lines = SPECS["decode"].summary(record)
  rates = []
  for case in record["cases"]:
    batch, length = case["info"]["batch"], case["info"]["cache"]
    assert case["info"]["kv_bytes"] == 2 * batch * length * 8 * 128 * 2
    rates.append(case["info"]["kv_bytes"] / case["results"]["jmat paged"]["median_s"] / 1e9)
  assert f"jmat paged reads the cache at {min(rates):.0f}–{max(rates):.0f} GB/s" in lines[0]
  # The best peer of every made-up case is torch, the first peer listed: jmat paged takes 1/3
  # of its time, jmat varlen paged 2/3.
  assert "0.33× the time of the best peer (torch)" in lines[0]
  assert "0.67× the time of the best peer (torch)" in lines[1]
  assert ("% of" in lines[0]) == (peak is not None)
  if peak is not None:
    assert f"of {peak:g} GB/s" in lines[0]


def test_device_decode_torch_flex_over_its_paged_attention_computes_the_attention(decode_inputs):
  """torch's competitor (torch's PagedAttention reserving the suite's page table over the pool
  shared through DLPack), here with eager flex_attention on the CPU: the numpy attention."""
  from torch.nn.attention.flex_attention import flex_attention

  from benchmarks import decode_device as dd

  inputs, want = decode_inputs
  got = dd.torch_flex_call(inputs, "cpu", flex_attention)()
  np.testing.assert_allclose(got[:, :, 0].float().numpy(), want, atol=BF16_ATOL)


def test_a_device_run_writes_every_case_it_measured(tmp_path):
  """On an accelerator the runner writes a suite after each case (a lent device's run may be cut
  short), titled as partial; the last case leaves the writing to the complete suite."""
  from benchmarks.__main__ import _checkpoint

  results = _decode_device_results("NVIDIA H200")
  record = results["suites"].pop("decode")
  fields = {k: record[k] for k in ("kind", "title", "competitors", "reference", "notes")}
  cases, run = record["cases"], lambda: record["run"]
  _checkpoint(results, tmp_path, "decode", fields, len(cases), run, cases[:1])
  written = json.loads((tmp_path / "results.json").read_text())["suites"]["decode"]
  assert written["title"] == f"{record['title']} (partial: 1 of {len(cases)} cases)"
  assert [c["name"] for c in written["cases"]] == [cases[0]["name"]]
  (tmp_path / "results.json").unlink()
  _checkpoint(results, tmp_path, "decode", fields, len(cases), run, cases)
  assert not (tmp_path / "results.json").exists()
