"""Session fixtures: every registry entry (tests/conformance/registry.py) is built, saved and loaded once.

``loaded(name)`` gives a ``Loaded``: the HF reference and the HookedVLM read back from the same saved
checkpoint through the real ``from_pretrained`` path, plus the entry's standard inputs. The parametrized
``fixture`` is the same over every entry; family-specific files ask ``loaded("llava15")`` directly.
"""

from __future__ import annotations

import pytest
import torch
from conformance.registry import LLAVA_PROMPTS as PROMPTS  # noqa: F401  (family-specific files import these)
from conformance.registry import NAMES, NON_SQUARE, REGISTRY, Entry, quiet  # noqa: F401

from tl_vlm import HookedVLM

# Tiny models gain nothing from threads, and under contention on 2 cores OpenMP's spin-waiting made a
# forward ~200x slower; one thread keeps the suite's time independent of what else the machine runs.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Scripts run in-process (benchmarks, tutorials) set their own thread count; put it back after each test."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


class Loaded:
    """The HF reference and the HookedVLM loaded from one saved checkpoint, and the entry's inputs."""

    def __init__(self, entry: Entry, path):
        self.entry, self.name, self.variant, self.path = entry, entry.name, entry.name, path
        self.hf = entry.hf_class.from_pretrained(path).eval()
        self.model = quiet(HookedVLM.from_pretrained, path)
        self._cases = None

    @property
    def cases(self):
        if self._cases is None:
            self._cases = quiet(self.entry.make_cases, self.model, self.entry)
        return self._cases

    def batch(self, padding_side: str = "left"):
        """The padded batch of two prompts with images (with decoder ids where the forward needs them)."""
        return self.cases["batch" if padding_side == "left" else f"batch_{padding_side}"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            entry = REGISTRY[name]
            built[name] = entry.build(root / name, name)
            entry.path = built[name]
        return built[name]

    return get


@pytest.fixture(scope="session")
def loaded(checkpoint):
    cache: dict[str, Loaded] = {}

    def get(name: str) -> Loaded:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = Loaded(REGISTRY[name], checkpoint(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def checkpoints(checkpoint):
    """name -> saved checkpoint path, built on first use."""

    class Lazy(dict):
        def __missing__(self, name):
            return checkpoint(name)

    return Lazy()


@pytest.fixture(scope="session")
def llava15(loaded) -> Loaded:
    return loaded("llava15")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A VLM-Lens style dataset for tl_vlm.store: five images and a CSV of prompts and labels."""
    import pandas as pd

    from tl_vlm.zoo.data import sample_images

    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rows = []
    for i, image in enumerate(sample_images(5, seed=21)):
        image.save(root / "images" / f"{i}.png")
        rows.append({"id": i, "prompt": "What is the colour?" if i % 2 else "What shape is it?", "image": f"{i}.png",
                     "label": image.info["colour"]})
    pd.DataFrame(rows).to_csv(root / "data.csv", index=False)
    return root


LLAVA_VARIANTS = [n for n in NAMES if n.startswith("llava")]


@pytest.fixture(scope="session", params=LLAVA_VARIANTS)
def pair(request, loaded) -> Loaded:
    """Each LLaVA variant (for the LLaVA-specific tests)."""
    return loaded(request.param)
