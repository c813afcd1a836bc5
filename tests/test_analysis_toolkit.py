"""The analysis toolkit on planted effects whose answer is known, and its definitions on hand-computed examples.

The tiny models are random-init, so every "known answer" is planted with a hook: a token's unembedding
direction at one image token, an object's text direction at image positions, a dead region or a dead layer.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from tl_vlm.analysis import flow, geometry, viz
from tl_vlm.analysis.confidence import confidence_map, internal_confidence, localization, object_token_ids
from tl_vlm.analysis.editing import ProjectAway, project_away, removal_report, text_direction
from tl_vlm.analysis.hallucination import extract_mentions, hallucination_metrics, label_mentions, score_mentions
from tl_vlm.analysis.knockout import knockout_text_to_image
from tl_vlm.analysis.logit_lens import image_positions, language_logit_lens, lens_probs
from tl_vlm.analysis.probing import answer_accuracy, layer_sweep, probe, store_features, two_proportion_z_test
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo.data import sample_images

FAMILIES = ("llava15", "blip2_opt", "qwen2_vl")
PATCH_FAMILIES = ("llava15", "qwen2_vl")  # image tokens with pixel boxes (BLIP-2 queries have none)
SIZE = [(40, 60)]


@pytest.fixture(scope="module")
def models(loaded):
    """The registry's models (built and loaded once per session, tests/conftest.py)."""
    return lambda family: loaded(family).model


def prompt(model, images, question: str = "What is the colour?"):
    return model.prepare(images=images, text=[format_prompt(model.processor, question)] * len(images))


def plant_token(model, token: int, position: int, scale: float = 30.0):
    """Hook adding ``scale`` x the token's unembedding direction at one language position (all rows)."""
    direction = model.W_U[:, token].detach() / model.W_U[:, token].norm()

    def hook(embed, hook):
        embed[:, position] += scale * direction
        return embed

    return ("hook_embed", hook)


# ------------------------------------------------------------------------- logit lens / internal confidence


def test_topk_lens_hand_computed():
    fake = SimpleNamespace(unembed=torch.nn.Identity(), ln_final=None, cfg=SimpleNamespace(output_logits_soft_cap=0.0))
    probs = lens_probs(fake, torch.tensor([2.0, 1.0, 0.0, -1.0]), normed=False, top_k=2)
    e = math.e
    assert torch.allclose(probs, torch.tensor([e / (1 + e), 1 / (1 + e), 0.0, 0.0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_internal_confidence_definition_and_planted_token(models, family):
    model = models(family)
    inputs = prompt(model, sample_images(1, seed=1, sizes=SIZE))
    word = "zebra"  # not in the tiny vocabulary: several sub-tokens
    ids = object_token_ids(model, word)
    assert len(ids) > 1 and model.tokenizer.bos_token_id not in ids
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs)
    image = image_positions(model, inputs.input_ids)
    by_hand = language_logit_lens(model, cache, normed=False, top_k=50)[:, image][..., ids].max()
    assert torch.allclose(internal_confidence(model, inputs, [word])[0, 0], by_hand)

    target = int(image[0].nonzero()[3, 0])  # the 4th image token
    with model.hooks(fwd_hooks=[plant_token(model, ids[-1], target)]):
        heat = confidence_map(model, inputs, word)
        planted = internal_confidence(model, inputs, [word, "kite"])
    assert heat.shape == (model.cfg.n_layers + 1, 1, int(image.sum()))
    assert int(heat[0, 0].argmax()) == 3, "layer 0 reads the embedding: the planted token peaks where it was planted"
    assert float(planted[0, 0]) > 0.9 > float(by_hand)


@pytest.mark.parametrize("family", PATCH_FAMILIES)
def test_localization_peaks_on_the_planted_patch(models, family):
    model = models(family)
    images = sample_images(1, seed=2, sizes=SIZE)
    inputs = prompt(model, images)
    index = spatial_index(model, inputs, images)
    k = 5
    cell = index.iloc[k]
    with model.hooks(fwd_hooks=[plant_token(model, object_token_ids(model, "kite")[-1], int(cell.position))]):
        (heat,) = localization(model, inputs, "kite", images)
    assert heat.shape == (images[0].size[1], images[0].size[0])
    y, x = divmod(int(heat.argmax()), heat.shape[1])
    assert cell.x0 <= x + 0.5 <= cell.x1 and cell.y0 <= y + 0.5 <= cell.y1


def test_blip2_localization_spreads_query_scores_over_patches(models):
    model = models("blip2_opt")
    images = sample_images(2, seed=3, sizes=SIZE * 2)
    maps = localization(model, prompt(model, images), "kite", images)
    assert [m.shape for m in maps] == [(60, 40), (60, 40)] and all(bool((m >= 0).all()) for m in maps)


# ------------------------------------------------------------------------- hallucination classification


def test_mentions_and_metrics_hand_computed():
    vocabulary = {"dog": ["dog", "puppy"], "hot dog": ["hot dog"], "person": ["person", "man"]}
    captions = ["A man and two dogs.", "A hot dog on a plate", "Puppies! No persons."]
    mentions = label_mentions(extract_mentions(captions, vocabulary), truth=[{"person", "dog"}, {"dog"}, {"person"}])
    assert list(zip(mentions["caption"], mentions["object"], mentions["word"], mentions["hallucinated"])) == [
        (0, "person", "man", False), (0, "dog", "dogs", False),
        (1, "hot dog", "hot dog", True),
        (2, "dog", "Puppies", True), (2, "person", "persons", False),
    ]
    # Hallucinated = positive, scored by low confidence. Ranked: c=.1 (h), .3 (r), .35 (h), .8 (r):
    # AUROC = 3 of 4 (h, r) pairs ordered = .75; AP = .5 * 1 + .5 * 2/3 = 5/6.
    metrics = hallucination_metrics([0.1, 0.3, 0.35, 0.8], [True, False, True, False])
    assert metrics["auroc"] == pytest.approx(0.75) and metrics["ap"] == pytest.approx(5 / 6)


def test_planted_objects_are_separated_with_auroc_one(models):
    model = models("llava15")
    images = sample_images(4, seed=5)
    inputs = [prompt(model, [image]) for image in images]
    truth = [{"dog"}, {"dog"}, {"kite"}, {"kite"}]
    mentions = label_mentions(extract_mentions(["a dog and a kite"] * 4, ["dog", "kite"]), truth)
    position = int(image_positions(model, inputs[0].input_ids)[0].nonzero()[7, 0])
    scored = []
    for caption, objects in enumerate(truth):  # the image "holds" its object: planted at one image token
        (obj,) = objects
        with model.hooks(fwd_hooks=[plant_token(model, object_token_ids(model, obj)[-1], position)]):
            scored.append(score_mentions(model, mentions[mentions["caption"] == caption], inputs))
    scored = pd.concat(scored)
    assert scored.loc[~scored["hallucinated"], "confidence"].min() > scored.loc[scored["hallucinated"], "confidence"].max()
    assert hallucination_metrics(scored["confidence"], scored["hallucinated"]) == {"auroc": 1.0, "ap": 1.0}


# ------------------------------------------------------------------------- ProjectAway


def test_project_away_hand_computed():
    # p = <h,t>/<t,t> = 2 > 0: h - 1.5 * 2 * t; a negative projection is left alone.
    assert torch.equal(project_away(torch.tensor([[2.0, 0.0], [-1.0, 1.0]]), torch.tensor([[1.0, 0.0]])),
                       torch.tensor([[-1.0, 0.0], [-1.0, 1.0]]))
    # In turn: [2,2] -> [0,2] along t1; then p = 2/2 = 1 along t2 = [1,1] -> [-1,1].
    out = project_away(torch.tensor([2.0, 2.0]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]), alpha=1.0)
    assert torch.equal(out, torch.tensor([-1.0, 1.0]))


def plant_direction(model, direction, mask, scale: float = 5.0):
    def hook(resid, hook):
        if resid.shape[1] >= mask.shape[1]:
            resid[:, : mask.shape[1]][mask] += scale * direction
        return resid

    return ("blocks.0.hook_resid_post", hook)


@pytest.mark.parametrize("family", FAMILIES)
def test_project_away_flips_the_planted_component(models, family):
    model = models(family)
    inputs = prompt(model, sample_images(1, seed=6, sizes=SIZE))
    edit = ProjectAway(model, ["dog"], text_layer=1, image_layer=0)
    t = edit.directions[0]
    ids = [model.tokenizer.bos_token_id] if model.tokenizer.bos_token_id is not None else []
    ids += model.tokenizer.encode("dog", add_special_tokens=False)
    _, alone = model.run_with_cache(torch.tensor([ids]), names_filter="blocks.1.hook_resid_pre")
    assert torch.equal(t, alone["blocks.1.hook_resid_pre"][0, -1]) and torch.equal(t, text_direction(model, "dog", 1))
    image = image_positions(model, inputs.input_ids)
    with torch.no_grad(), model.hooks(fwd_hooks=[plant_direction(model, t, image)]):
        _, before = model.run_with_cache(inputs, names_filter="blocks.1.hook_resid_pre")
        with edit.applied(inputs):
            _, after = model.run_with_cache(inputs, names_filter="blocks.1.hook_resid_pre")
    h0, h1 = before["blocks.1.hook_resid_pre"][0], after["blocks.1.hook_resid_pre"][0]
    p0, p1 = h0[image[0]] @ t / (t @ t), h1[image[0]] @ t / (t @ t)
    assert bool((p0 > 1).all()), "the plant gives every image token a positive component"
    assert torch.allclose(p1, -0.5 * p0, atol=1e-4) and bool((p1 <= 0).all())
    assert torch.equal(h0[~image[0]], h1[~image[0]]), "text positions are not edited"
    with pytest.raises(ValueError, match="later block"):
        ProjectAway(model, ["dog"], image_layer=model.cfg.n_layers - 1)


def test_project_away_removes_the_planted_object_from_generation(models):
    model = models("llava15")
    inputs = prompt(model, sample_images(1, seed=7))
    (square,) = object_token_ids(model, "square")  # one token in the tiny vocabulary
    edit = ProjectAway(model, ["square"], text_layer=1, image_layer=0)
    t = edit.directions[0]
    image = image_positions(model, inputs.input_ids)
    seen = {}

    def reader(resid, hook):  # a planted "object detector": reads the image tokens' component along t
        if resid.shape[1] >= image.shape[1]:
            seen["s"] = (resid[:, : image.shape[1]][image] @ t / t.norm()).mean()
        return resid

    def writer(resid, hook):  # ... and writes "square" everywhere in proportion to it
        resid[:] += 10 * seen["s"] * model.W_U[:, square] / model.W_U[:, square].norm()
        return resid

    planted = [plant_direction(model, t, image), ("blocks.1.hook_resid_pre", reader), ("blocks.1.hook_resid_post", writer)]
    with model.hooks(fwd_hooks=planted):
        report = removal_report(model, edit, [inputs], max_new_tokens=4)
        with torch.no_grad():
            logit_before = model(inputs)[0, -1, square]
            with edit.applied(inputs):
                logit_after = model(inputs)[0, -1, square]
                cached = model.generate(inputs, max_new_tokens=4)
                recomputed = model.generate(inputs, max_new_tokens=4, use_past_kv_cache=False)
    assert logit_before > 2 and logit_after < -2, "the planted reader sees a positive component before, a negative one after"
    assert report.to_dict("records") == [{"object": "square", "mentioned_before": 1.0, "mentioned_after": 0.0, "captions": 1}]
    assert torch.equal(cached, recomputed), "the edit on the prompt pass equals the edit recomputed every step"


# ------------------------------------------------------------------------- probing


def test_two_proportion_z_test_hand_computed():
    # pooled .55, se = sqrt(.55 * .45 * (2/100)) = .0703562, z = .1 / se = 1.42134, p = 2 (1 - Phi(z)) = .15522
    z, p = two_proportion_z_test(0.6, 100, 0.5, 100)
    assert z == pytest.approx(1.42134, abs=1e-4) and p == pytest.approx(0.15522, abs=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probe_finds_a_planted_feature_and_the_control_does_not(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 12))
    y = (x[:, 0] + 0.1 * rng.normal(size=160) > 0).astype(int)
    grid = {"mlpclassifier__hidden_layer_sizes": [(32,)], "mlpclassifier__alpha": [1e-3]} if kind == "mlp" else None
    result = probe(x, y, kind, grid=grid, folds=3)
    assert result.accuracy >= 0.9 and result.control_accuracy <= 0.7
    assert result.selectivity >= 0.25 and result.p_value < 0.01 and result.n_test == 40


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_sweep_finds_the_planted_layer(models, family):
    model = models(family)
    n = 24
    labels = np.array([0, 1] * (n // 2))
    batch = prompt(model, sample_images(1, seed=8, sizes=SIZE) * n)  # identical rows: only the plant differs
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    signs = torch.tensor(labels * 2.0 - 1.0, dtype=torch.float32)

    def plant(resid, hook):
        return resid + signs[:, None, None] * direction

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", plant)]):
        sweep = layer_sweep(model, [batch], labels, folds=3, grid={"logisticregression__C": [1.0]})
    planted = (sweep["tower"] == "language") & (sweep["layer"] >= 1)
    assert list(sweep["tower"].unique())[-2:] == ["projector", "language"]
    assert (sweep.loc[planted, "accuracy"] == 1.0).all() and (sweep.loc[planted, "selectivity"] >= 0.5).all()
    assert (sweep.loc[~planted, "accuracy"] == 0.5).all(), "identical features before the plant: chance"
    reply = model.tokenizer.decode(model.generate(batch, max_new_tokens=3)[0, batch.shape[1]:], skip_special_tokens=True)
    assert reply.split(), "identical rows, one non-empty greedy reply"
    assert answer_accuracy(model, [batch], [reply.split()[0]] * (n // 2) + ["zebra"] * (n // 2)) == 0.5


def test_store_features_stack_one_layer():
    frame = pd.DataFrame({"layer": ["a", "b", "a"], "tensor": [torch.ones(1, 3), torch.zeros(1, 2), 2 * torch.ones(1, 3)],
                          "label": [0, 9, 1]})
    features, rows = store_features(frame, "a")
    assert torch.equal(features, torch.tensor([[1.0] * 3, [2.0] * 3])) and rows["label"].tolist() == [0, 1]


# ------------------------------------------------------------------------- geometry


def test_geometry_hand_computed():
    coords, ratio = geometry.pca(np.array([[0.0, 0.0], [1, 1], [2, 2], [3, 3]]), n_components=2)
    assert ratio[0] == pytest.approx(1.0) and np.allclose(np.abs(coords["pc1"]), np.sqrt(2) * np.array([1.5, 0.5, 0.5, 1.5]))
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    concepts = ["a", "a", "b", "b"]
    centroids = geometry.concept_centroids(x, concepts)
    assert np.allclose(centroids.loc["a"], [0.95, 0.05])
    assert geometry.centroid_cosine(x[:1], centroids).loc[0, "a"] == pytest.approx(0.95 / math.sqrt(0.905))
    # Query [1, .2]: cosines .99624 (a), .98058 (a), .30320 (b), .19612 (b); k=3 -> a: 1.97682 / 2.28002.
    votes = geometry.knn_votes(x, concepts, np.array([[1.0, 0.2]]), k=3)
    assert votes.loc[0, "a"] == pytest.approx(0.86702, abs=1e-4) and votes.loc[0].sum() == pytest.approx(1.0)


# ------------------------------------------------------------------------- visual information flow


@pytest.mark.parametrize("family", PATCH_FAMILIES)
def test_region_ablation_map_peaks_on_the_only_live_region(models, family):
    model = models(family)
    images = sample_images(1, seed=9, sizes=SIZE)
    inputs = prompt(model, images)
    index = spatial_index(model, inputs, images)
    w, h = images[0].size
    live = torch.zeros_like(inputs.input_ids, dtype=torch.bool)
    top_left = index[(index["x1"] <= w / 2) & (index["y1"] <= h / 2)]
    live[0, torch.tensor(top_left["position"].values)] = True
    dead = image_positions(model, inputs.input_ids) & ~live

    def kill(embed, hook):  # the image outside the top-left quarter carries nothing
        return embed.masked_fill(dead[..., None], 0.0)

    with model.hooks(fwd_hooks=[("hook_embed", kill)]):
        regions = flow.region_ablation_map(model, inputs, "red", images, grid=(2, 2))
    assert regions.loc[regions["drop"].abs().idxmax(), ["row", "col"]].tolist() == [0, 0]
    assert (regions.loc[(regions["row"] == 1) & (regions["col"] == 1), "drop"] == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_region_ablation_of_a_dead_region_changes_nothing(models, family):
    model = models(family)
    inputs = prompt(model, sample_images(1, seed=10, sizes=SIZE))
    image = image_positions(model, inputs.input_ids)
    first = image & (image.cumsum(-1) <= 4)  # the first four image tokens (queries for BLIP-2)

    def kill(embed, hook):
        return embed.masked_fill(first[..., None], 0.0)

    with model.hooks(fwd_hooks=[("hook_embed", kill)]):
        dead = flow.region_ablation(model, inputs, "red", first)
        alive = flow.region_ablation(model, inputs, "red", image & ~first)
    assert dead["drop"].tolist() == [0.0] and abs(alive["drop"][0]) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_knockout_by_layer_is_zero_in_a_dead_layer(models, family):
    model = models(family)
    inputs = prompt(model, sample_images(1, seed=11, sizes=SIZE))
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", lambda out, hook: torch.zeros_like(out))]):
        effects = flow.knockout_by_layer(model, inputs, "red", window=1)
    assert effects["start"].tolist() == [0, 1] and effects["drop"][0] == 0.0 and abs(effects["drop"][1]) > 0
    everything = flow.knockout_by_layer(model, inputs, "red", window=model.cfg.n_layers, queries="text")
    with torch.no_grad():
        independent = flow.answer_probability(model, knockout_text_to_image(model, inputs), inputs, "red")
    assert everything["p_knocked"][0] == pytest.approx(float(independent[0]))


# ------------------------------------------------------------------------- plots


def test_plots_write_png(models, tmp_path):
    model = models("llava15")
    images = sample_images(1, seed=12, sizes=SIZE)
    inputs = prompt(model, images)
    sweep = pd.DataFrame({"tower": ["vision", "language"], "layer": [0, 0], "hook": ["a", "b"],
                          "accuracy": [0.5, 1.0], "control_accuracy": [0.5, 0.5]})
    regions = flow.region_ablation_map(model, inputs, "red", images, grid=(2, 2))
    mentions = pd.DataFrame({"confidence": [0.1, 0.9], "hallucinated": [True, False]})
    coords, _ = geometry.pca(np.random.default_rng(0).normal(size=(10, 4)))
    paths = [
        viz.heatmap_over_image(images[0], localization(model, inputs, "red", images)[0], tmp_path / "loc.png"),
        viz.layer_position_map(confidence_map(model, inputs, "red")[:, 0], tmp_path / "map.png"),
        viz.layer_sweep_plot(sweep, tmp_path / "sweep.png", answer_accuracy=0.7),
        viz.effect_by_layer_plot(flow.knockout_by_layer(model, inputs, "red"), tmp_path / "flow.png"),
        viz.region_map_over_image(images[0], regions, tmp_path / "regions.png"),
        viz.scatter_2d(coords, [0, 1] * 5, tmp_path / "pca.png"),
        viz.confidence_histogram(mentions, tmp_path / "hist.png"),
        viz.mention_rates_plot(pd.DataFrame({"object": ["dog"], "mentioned_before": [1.0], "mentioned_after": [0.0]}),
                               tmp_path / "rates.png"),
    ]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in paths)
    figure = viz.layer_sweep_plot(sweep, answer_accuracy=0.7)  # no path: the Figure, for a notebook to show
    assert isinstance(figure, Figure) and figure.axes[0].get_lines()
