"""``python -m jmat``: the tour runs every source-document example; explain works from the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jmat.__main__ import main


def test_tour_prints_every_document_example(capsys):
  assert main([]) == 0
  out = capsys.readouterr().out
  assert "= 32" in out
  assert "[[19 22]\n [43 50]]" in out
  assert "jmat.matmul((3, 4, 5), (3, 5, 6)) -> shape (3, 4, 6)" in out
  assert "jmat.matmul((5, 1, 4, 2), (3, 2, 1)) -> shape (5, 3, 4, 1)" in out
  assert "jmat.bmm((2, 1, 10), (2, 10, 4)) -> shape (2, 1, 4)" in out
  assert "query (2, 5, 8) @ key^T (2, 8, 7) -> shape (2, 5, 7)" in out
  assert "bmm does not broadcast" in out
  assert "did you mean a of shape (2, 1, 10)?" in out
  assert "both arguments must be at least 1-D" in out


def test_explain_cli(capsys):
  assert main(["explain", "5,1,4,2", "3,2,1"]) == 0
  assert capsys.readouterr().out.splitlines()[-1] == "result: (5, 3, 4, 1)"
  assert main(["explain", "(2,10,1)", "(2,10,4)", "--op", "bmm"]) == 1
  assert "did you mean a of shape (2, 1, 10)?" in capsys.readouterr().out
  assert main(["explain", "()", "3"]) == 1


def test_explain_cli_passes_family_options(capsys):
  assert main(["explain", "2,3", "3,4", "--op", "addmm", "--input-shape", "4"]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[0] == "jmat.addmm: input (4,), mat1 (2, 3), mat2 (3, 4)"
  assert out.splitlines()[-1] == "result: (2, 4)"
  assert main(["explain", "3,4,5", "4,5,6", "--op", "tensordot", "--dims", "[[1,2],[0,1]]"]) == 0
  assert capsys.readouterr().out.splitlines()[-1] == "result: (3, 6)"
  assert main(["explain", "10,100", "100,5", "5,50", "--op", "multi_dot"]) == 0
  assert capsys.readouterr().out.splitlines()[-1] == "result: (10, 50)"
  assert main(["explain", "2,3", "3,4", "--op", "addmm", "--input-shape", "3"]) == 1


def test_explain_cli_rejects_a_malformed_shape(capsys):
  with pytest.raises(SystemExit):
    main(["explain", "5,x", "3"])
  assert "not a shape: '5,x'" in capsys.readouterr().err


def test_module_entry_point_runs():
  result = subprocess.run(
      [sys.executable, "-m", "jmat", "explain", "3", "2,3,4"],
      capture_output=True, text=True, check=True,
  )
  assert result.stdout.splitlines()[-1] == "result: (2, 4)"


def test_help_lists_the_commands_and_bench_passes_its_options_on(capsys):
  with pytest.raises(SystemExit):
    main(["--help"])
  assert "{tour,explain,bench}" in capsys.readouterr().out
  with pytest.raises(SystemExit) as info:
    main(["bench", "--help"])  # the benchmarks' own --help, not jmat's
  assert info.value.code == 0
  assert "--suite" in capsys.readouterr().out
