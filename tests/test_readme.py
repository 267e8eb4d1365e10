"""The README's Python examples run as written (and their asserts hold)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
  assert len(BLOCKS) >= 3


# the online-mode example (the cheapest) in the fast tier, the others slow
@pytest.mark.parametrize("index", [
    i if 'mode="online"' in block
    else pytest.param(i, marks=pytest.mark.slow)
    for i, block in enumerate(BLOCKS)])
def test_readme_example_runs(index):
  namespace = {"__name__": f"readme_example_{index}"}
  exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"),
       namespace)
