"""TransformerLens' conventions on a HookedVLM: text where TL takes text (text only; image prompts go through
``prepare``), the keyword arguments TL's tools pass, and cfg fields kept in sync."""

from __future__ import annotations

import pytest
import torch
from toy_batches import toy, toy_batch
from transformer_lens import evals, utilities

from tl_vlm import HookedVLM

TEXT = "what colour is the shape"


@pytest.fixture(scope="module")
def model():
    return toy()


def test_text_runs_text_only_as_tl_tokenizes_it(model):
    tokens = model.to_tokens(TEXT)
    assert torch.equal(model(TEXT), model(tokens))
    assert torch.equal(model(TEXT, prepend_bos=False), model(tokens[:, 1:]))
    assert model.to_str_tokens(TEXT) == model.to_str_tokens(tokens[0])
    assert model.to_str_tokens(TEXT, prepend_bos=False) == model.to_str_tokens(tokens[0])[1:]
    batch = model.to_tokens([TEXT, "red"], padding_side="left")
    assert batch.shape[0] == 2 and model(["red", TEXT], padding_side="left").shape[:2] == (2, batch.shape[1])
    assert isinstance(model.generate(TEXT, max_new_tokens=2), str)


def test_text_with_an_image_placeholder_never_runs_without_the_image(model):
    with pytest.raises(ValueError, match="no pixel_values"):
        model(model.processor.image_token + " " + TEXT)


def test_get_token_position(model):
    batch = toy_batch(model, 1)
    word = model.to_str_tokens(TEXT, prepend_bos=False)[1]
    assert model.get_token_position(word, TEXT) == 2
    assert model.get_token_position(model.vlm_cfg.image_token_id, batch, mode="last") == int(
        (batch.input_ids[0] == model.vlm_cfg.image_token_id).nonzero().max())
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position(model.vlm_cfg.image_token_id, TEXT)


def test_tl_utilities_and_evals_run_on_text(model, capsys):
    utilities.test_prompt("what colour is the", "red", model, print_details=True)
    assert "Tokenized prompt" in capsys.readouterr().out
    loss = evals.sanity_check(model)
    assert torch.isfinite(loss)


def test_cfg_fields_tl_reads_follow_the_weights():
    model = HookedVLM.from_pretrained("tl-vlm/toy-llava")
    assert model.cfg.d_vocab_out == model.W_U.shape[1]
    model.to(torch.bfloat16)
    assert model.cfg.dtype == model.vision.cfg.dtype == torch.bfloat16
    model.float()
    assert model.cfg.dtype == torch.float32 and model.cfg.device == "cpu"
