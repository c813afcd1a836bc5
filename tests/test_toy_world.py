"""The biased-world toy (``tl-vlm/toy-llava-bias``): the world keeps its bias, the shipped toy shows Jiang et al.'s
phenomena on held-out scenes with the margins measured when it was trained (toy_metrics.json, 120 scenes), and an
independent reference written on the HF model alone (``zoo/world_reference``) gives the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tl_vlm import HookedVLM
from tl_vlm.zoo import world, world_metrics, world_reference
from tl_vlm.zoo.toys import toy_checkpoint, toy_metrics

NAME = "tl-vlm/toy-llava-bias"
N_SCENES = 16  # half ordinary, half sky without a bird; a seed the stored metrics do not use


def test_the_training_world_is_biased_and_the_held_out_world_is_not():
    train = world.make_scenes(400, 0, "train")
    sky = [s for s in train if s.background == "sky"]
    assert sky and all("bird" in s.mentioned for s in sky), "every training sky scene is captioned with a bird"
    unseen = [s for s in sky if "bird" not in s.present]
    assert 0.1 < len(unseen) / len(sky) < 0.4
    assert any("bird" in s.present for s in train if s.background != "sky"), "birds also appear elsewhere"
    for split in ("ordinary", "sky_no_bird"):
        scenes = world.make_scenes(100, 5, split)
        assert all(set(s.mentioned) == s.present and s.caption == world.caption(s.background, s.objects) for s in scenes)
    assert all(s.background == "sky" and "bird" not in s.present for s in world.make_scenes(100, 5, "sky_no_bird"))


def test_word_grid_names_what_each_cell_shows():
    for scene in world.make_scenes(30, 3, "ordinary"):
        pixels = np.asarray(scene.image)
        for cell, word in enumerate(world.word_grid(scene.background, scene.objects).split()):
            x0, y0, x1, y1 = world.cell_box(cell)
            colours = {tuple(c) for c in pixels[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3)}
            if word in world.OBJECTS:
                assert world.OBJECTS[word] in colours
            else:
                assert colours == {world.BACKGROUNDS[word]}


@pytest.fixture(scope="module")
def measured():
    torch.set_num_threads(1)
    path = toy_checkpoint(NAME)
    scenes = world_metrics.held_out(N_SCENES, seed=7)
    ours = world_metrics.measure(HookedVLM.from_pretrained(NAME), scenes)
    hf, processor = world_reference.load(path)
    reference = world_reference.measure(hf, processor, scenes, world_metrics.TEXT_LAYER, world_metrics.IMAGE_LAYER,
                                       world_metrics.INPUT_ALPHA)
    return ours, reference


def test_the_toy_shows_the_phenomena(measured):
    ours, _ = measured
    h = ours["hallucination"]
    # measured here: 100% vs 0% (120 scenes: 100% vs 0%)
    assert h["bird_on_sky_without_bird"] >= 0.75 and h["other_objects_mean"] <= 0.1, h
    assert ours["confidence"]["auroc"] >= 0.9, ours["confidence"]  # measured 1.00 (120 scenes: 1.00)
    pointing = ours["pointing"]
    assert pointing["accuracy"] >= pointing["chance"] + 0.7, pointing  # measured 24/24 (120 scenes: 98%), chance 6%
    # ProjectAway on the image tokens entering the language model (this toy reads the image in its first block)
    edit = ours["project_away_at_input"]  # measured 6/8 removed, 7/8 kept (120 scenes: 80%, 98%)
    assert edit["hallucinated_mentions"] >= 4 and edit["removed"] >= 0.5 and edit["kept"] >= 0.75, edit


def test_the_reference_on_hf_agrees(measured):
    ours, reference = measured
    assert ours["captions"] == reference["captions"]
    assert ours["hallucination"] == reference["hallucination"]
    assert ours["pointing"] == reference["pointing"]
    assert ours["project_away"] == reference["project_away"]
    assert ours["project_away_at_input"] == reference["project_away_at_input"]
    for key in ("mentions", "hallucinated"):
        assert ours["confidence"][key] == reference["confidence"][key]
    for key in ("auroc", "ap"):
        assert abs(ours["confidence"][key] - reference["confidence"][key]) <= 1e-9


def test_the_stored_metrics_are_both_columns_and_agree():
    record = toy_metrics(NAME)["held_out_phenomena"]
    assert record["same_captions"]
    ours, reference = record["tl_vlm"], record["reference_hf"]
    for key in ("hallucination", "project_away", "project_away_at_input"):
        assert ours[key] == reference[key], key
    assert ours["pointing"] == reference["pointing"]
    assert abs(ours["confidence"]["auroc"] - reference["confidence"]["auroc"]) <= 1e-9
