"""The wheel: what it installs (jmat only), its runtime metadata, and jmat run from it alone.

The wheel is built from this checkout with pip (hatchling from the registry, a few
seconds) and installed with ``--no-deps`` into a directory. It is then run by this
interpreter with ``-S`` (no site-packages, so neither this checkout's editable install
nor the test extras are visible), from a temporary directory, with ``PYTHONPATH`` set to
the installed wheel and to jax's and numpy's own installed distributions only: what a
fresh environment with ``pip install jmat`` would hold.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

import jmat

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("wheel")
  subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
      check=True, capture_output=True, text=True, timeout=300,
  )
  (path,) = out.glob("jmat-*.whl")
  return path


def _metadata(wheel: pathlib.Path):
  with zipfile.ZipFile(wheel) as archive:
    (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(archive.read(name).decode())


def _requirement_name(requirement: str) -> str:
  match = re.match(r"[A-Za-z0-9._-]+", requirement)
  assert match, requirement
  return match.group(0).lower().replace("_", "-")


def test_the_wheel_holds_jmat_and_its_dist_info_only(wheel):
  with zipfile.ZipFile(wheel) as archive:
    top = {name.split("/")[0] for name in archive.namelist()}
  assert top == {"jmat", f"jmat-{jmat.__version__}.dist-info"}


def test_runtime_requirements_are_what_jmat_imports(wheel):
  metadata = _metadata(wheel)
  requirements = metadata.get_all("Requires-Dist") or []
  runtime = {_requirement_name(r) for r in requirements if "extra ==" not in r}
  assert runtime == {"jax", "numpy"}
  assert any(r.startswith("jax>=0.10.2") for r in requirements)
  test_extra = {_requirement_name(r) for r in requirements if "extra == 'test'" in r
                or 'extra == "test"' in r}
  assert "chex" in test_extra


def test_one_version_source(wheel):
  assert _metadata(wheel)["Version"] == jmat.__version__
  assert wheel.name.startswith(f"jmat-{jmat.__version__}-")


def _runtime_closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
  """The installed distributions ``names`` need at run time (their non-extra requirements)."""
  seen: dict[str, importlib.metadata.Distribution] = {}
  todo = list(names)
  while todo:
    name = _requirement_name(todo.pop())
    if name in seen:
      continue
    try:
      dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:  # a marker excludes it on this platform
      continue
    seen[name] = dist
    todo.extend(r for r in dist.requires or [] if "extra ==" not in r)
  return list(seen.values())


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
  """The environment of a process that sees the installed wheel, jax and numpy, nothing else."""
  target = tmp_path_factory.mktemp("site")
  subprocess.run(
      [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
       str(wheel)],
      check=True, capture_output=True, text=True, timeout=300,
  )
  deps = tmp_path_factory.mktemp("deps")
  for dist in _runtime_closure(("jax", "numpy")):
    for file in dist.files or []:
      top = file.parts[0]
      if top in ("..", "__pycache__") or top.endswith((".dist-info", ".pth")):
        continue
      link = deps / top
      if not link.exists():
        link.symlink_to(pathlib.Path(str(dist.locate_file(top))))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "JMAT"))}
  env["PYTHONPATH"] = os.pathsep.join((str(target), str(deps)))
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(env: dict[str, str], cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
      timeout=120, check=False,
  )


def test_the_installed_wheel_runs_without_the_checkout_or_test_extras(installed, tmp_path):
  probe = _run(installed, tmp_path, "-c", (
      "import importlib.util, jmat; print(jmat.__file__); "
      "print([m for m in ('benchmarks', 'chex', 'tqdm', 'torch') if importlib.util.find_spec(m)])"
  ))
  assert probe.returncode == 0, probe.stderr
  location, found = probe.stdout.splitlines()
  assert not location.startswith(str(ROOT)), location
  assert found == "[]"
  explained = _run(installed, tmp_path, "-m", "jmat", "explain", "3", "2,3,4")
  assert explained.stdout.splitlines()[-1] == "result: (2, 4)", explained.stderr


def test_bench_from_the_wheel_says_in_one_line_what_to_do(installed, tmp_path):
  done = _run(installed, tmp_path, "-m", "jmat", "bench", "--quick")
  assert done.returncode != 0
  assert done.stdout == ""
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith("python -m jmat bench: benchmarks, tqdm, matplotlib not installed")
  assert "source checkout" in line and "pip install -e '.[bench]'" in line
