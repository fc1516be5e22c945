"""A griffe extension: jmat's docstrings title their doctests ``Example:`` (the house style).

griffe's Google parser knows only ``Examples:`` as a section of doctests (a singular
``Example:`` becomes an admonition whose ``>>>`` lines render as nested quotes), so the
title is renamed before the docstring is parsed. The docstrings stay as they are.
"""

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
  """Renames each ``Example:`` section title to ``Examples:``."""

  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
