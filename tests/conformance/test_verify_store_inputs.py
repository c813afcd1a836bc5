"""tl_vlm.verify, the activation store's round trip, and bad input, on every entry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conformance.registry import params, quiet, resid_hook
from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.store import ExtractConfig, extract, load
from tl_vlm.prompts import format_prompt  # tl_vlm.prompts.format_prompt after the refactor
from tl_vlm.verify import verify
from tl_vlm.zoo.data import sample_images


@pytest.mark.parametrize("name", params())
def test_verify_passes_then_names_the_broken_layer(loaded, name):
    pair = loaded(name)
    images = pair.entry.verify_images() if pair.entry.verify_images else None
    report = quiet(verify, str(pair.path), images=images)
    assert report.passed, report.table()
    assert {d.tower for d in report.layers} == set(pair.entry.towers) and report.generation_agreement == 1.0
    for tower in pair.entry.towers:
        assert len([d for d in report.layers if d.tower == tower]) == pair.model.tower(tower).cfg.n_layers
    model = quiet(HookedVLM.from_pretrained, pair.path)  # its own copy of the weights, perturbed tower by tower
    for tower in pair.entry.towers:
        mlp = model.tower(tower).blocks[1].mlp
        if tower == "language" and 1 in pair.entry.moe_blocks:
            mlp = mlp.experts[0]  # one expert's output weights
        original = mlp.W_out
        # Per output channel, so that a post-norm (Gemma 2 / 3) cannot normalise the change away.
        mlp.W_out = nn.Parameter(original.detach() * torch.linspace(0.5, 1.5, original.shape[-1], dtype=original.dtype))
        try:
            failures = quiet(verify, model, images=images).failures
        finally:
            mlp.W_out = original
        assert any(f.startswith(f"{tower} layer 1") for f in failures), (tower, failures)
        assert not any(f.startswith(f"{tower} layer 0") for f in failures), (tower, failures)


@pytest.mark.parametrize("name", params())
def test_extraction_round_trip_matches_run_with_cache(loaded, dataset, tmp_path, name):
    pair = loaded(name)
    model = pair.model
    hooks = [resid_hook(t, 0) for t in pair.entry.towers]
    config = ExtractConfig(model_path=str(pair.path), output_db=str(tmp_path / "out.db"), modules=hooks, batch_size=2,
                           dataset={"local_dataset_path": str(dataset / "data.csv"),
                                    "image_dataset_path": str(dataset / "images")})
    assert quiet(extract, config, progress=False) == {"done": 5, "skipped": 0, "failed": 0}
    frame = load(tmp_path / "out.db")
    assert len(frame) == 5 * len(hooks) and set(frame["layer"]) == set(hooks)
    images = sample_images(5, seed=21)
    for row in frame.itertuples():
        inputs = model.scoring_inputs(
            model.prepare(images=images[row.image_id], text=format_prompt(model.processor, row.prompt))
        )
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=row.layer)
        expected = cache[row.layer]
        assert row.tensor.shape == expected.shape, (row.layer, row.tensor.shape, expected.shape)
        assert torch.allclose(row.tensor, expected, atol=1e-4), (row.layer, row.image_id)
        assert row.image_path == str(dataset / "images" / f"{row.image_id}.png")


def text_only_ids(model, batch: VLMInputs) -> torch.Tensor:
    """The batch's ids with every image placeholder replaced by an ordinary text token of the same row."""
    image = model.image_token_mask(batch.input_ids)
    ids = batch.input_ids.clone()
    ids[image] = int(batch.input_ids[~image][-1])
    return ids


@pytest.mark.parametrize("name", params())
def test_bad_input_is_a_clear_error(loaded, name):
    pair = loaded(name)
    model, batch, errors = pair.model, pair.batch(), pair.entry.errors
    kwargs = batch.as_kwargs()
    pixels = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "decoder_input_ids")}
    with pytest.raises(ValueError, match=errors["no_pixels"]):  # placeholders without pixels
        model({k: v for k, v in kwargs.items() if k not in pixels})
    if "no_placeholders" in errors:  # pixels without placeholders (BLIP-2: query-less text is the legacy form)
        with pytest.raises(ValueError, match=errors["no_placeholders"]):
            model({**kwargs, "input_ids": text_only_ids(model, batch)})
    ids = batch.input_ids.clone()  # one placeholder short in row 0
    first = int(model.image_token_mask(ids)[0].nonzero()[0])
    ids[0, first] = int(ids[0, -1])
    with pytest.raises(ValueError, match=errors["count"]):
        model({**kwargs, "input_ids": ids})
    with pytest.raises(ValueError, match="refusing to drop"):  # an input this model does not take
        unused = "pixel_values_videos" if model.capabilities.queries else "qformer_input_ids"
        model({**kwargs, unused: batch.input_ids})
