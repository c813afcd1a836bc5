"""Bad input fails loudly with a message that says what to do; it never runs silently without the image.

The errors every family shares (placeholders without pixels, pixels without placeholders, count mismatch,
an unknown input key) are in tests/conformance; these are the rest."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlavaConfig

from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.families import family_for


def test_unsupported_architecture_names_supported_ones():
    config = AutoConfig.for_model("gpt2")
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(NotImplementedError, match="LlavaForConditionalGeneration"):
        family_for(config)


def test_unsupported_vision_tower_is_named():
    config = LlavaConfig(vision_config={"model_type": "dinov2"}, text_config=LlamaConfig())
    config.architectures = ["LlavaForConditionalGeneration"]
    with pytest.raises(NotImplementedError, match="dinov2.*clip_vision_model"):
        family_for(config).config_from_hf(config)


def test_wrong_image_size(llava15):
    batch = llava15.batch()
    with pytest.raises(ValueError, match="model.prepare"):
        llava15.model(VLMInputs(batch.input_ids, torch.zeros(2, 3, 31, 31), batch.attention_mask))


def test_unknown_input_is_not_dropped(llava15):
    batch = llava15.batch()
    with pytest.raises(ValueError, match="refusing to drop"):
        llava15.model({**batch.as_kwargs(), "pixel_values_videos": batch.pixel_values})


def test_text_with_an_image_placeholder_never_runs_without_the_image(llava15):
    # Text runs text only (as TL's model("text")); a placeholder in it without pixels points to prepare.
    with pytest.raises(ValueError, match=r"model\.prepare"):
        llava15.model("USER: <image> hi")


def test_missing_weight_is_reported(tmp_path, checkpoints):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["llava15"], broken)
    weights = load_file(broken / "model.safetensors")
    del weights["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ValueError, match="blocks.1.mlp.W_in"):
        HookedVLM.from_pretrained(broken)


def test_legacy_hub_key_layout_loads(tmp_path, checkpoints, llava15):
    """Hub checkpoints saved by older transformers nest CLIP under vision_tower.vision_model."""
    import shutil

    from safetensors.torch import load_file, save_file

    legacy = tmp_path / "legacy"
    shutil.copytree(checkpoints["llava15"], legacy)
    weights = load_file(legacy / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    save_file(renamed, legacy / "model.safetensors")
    model = HookedVLM.from_pretrained(legacy)
    batch = llava15.batch()
    assert torch.equal(model(batch), llava15.model(batch))


def test_next_images_and_sizes_must_agree(checkpoints):
    from conftest import NON_SQUARE, PROMPTS

    from tl_vlm.zoo.data import sample_images

    model = HookedVLM.from_pretrained(checkpoints["llava_next_mistral"])
    batch = model.prepare(images=sample_images(2, sizes=NON_SQUARE), text=PROMPTS)
    with pytest.raises(ValueError, match="image_sizes"):
        model(VLMInputs(batch.input_ids, batch.pixel_values, batch.attention_mask, batch.image_sizes[:1]))


def test_one_dimensional_inputs_and_folding_twice(llava15):
    batch = llava15.batch()
    row = VLMInputs(batch.input_ids[0], batch.pixel_values[:1], batch.attention_mask[0])
    real = batch.attention_mask[0].bool()
    assert torch.allclose(llava15.model(row)[0][real], llava15.model(batch)[0][real], atol=1e-5)
    model = HookedVLM.from_pretrained(llava15.path, fold_ln=True)
    with pytest.warns(UserWarning, match="already folded"):
        model.process_weights(fold_ln=True)
    assert len(llava15.model.to_str_tokens(batch.input_ids)) == 2
    token = batch.input_ids[0, -1]
    assert llava15.model.to_string(token) == llava15.model.to_string(token[None]) == llava15.model.to_string(int(token))


def test_generation_defaults_without_generation_config(tmp_path, checkpoints):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["llava15"], bare)
    (bare / "generation_config.json").unlink()
    model = HookedVLM.from_pretrained(bare)
    assert model.generation_config.eos_token_id is not None, "falls back to the model config, as HF does"
    model.generation_config.no_repeat_ngram_size = 2
    with pytest.raises(NotImplementedError, match="no_repeat_ngram_size"):
        model.generate(model.to_tokens("USER: hi ASSISTANT:"), max_new_tokens=2)
