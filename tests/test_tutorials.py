"""Tutorials run offline as scripts, so they stay true."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("[0-9]*.py"))


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path):
    for module in re.findall(r"\(requires: (\w+)\)", path.read_text()):  # optional libraries a tutorial needs
        pytest.importorskip(module)
    threads = torch.get_num_threads()
    # Notebooks switch autograd off globally (as TransformerLens' own do); keep that out of the other tests.
    with torch.enable_grad():
        runpy.run_path(str(path), run_name="__main__")
    torch.set_num_threads(threads)
