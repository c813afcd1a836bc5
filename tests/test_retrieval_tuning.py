"""Retrieval metrics and hard negatives (planted cases with known answers), NegCLIP tuning (lowers the held-out
hard-negative loss, resumes exactly, saves as a HF checkpoint), and the encoder swap into a LLaVA."""

from __future__ import annotations

import pytest
import torch
from conformance.registry import quiet
from PIL import Image
from transformers import AutoModel, CLIPConfig, CLIPModel

from tl_vlm import HookedCLIP, HookedVLM
from tl_vlm.analysis.retrieval import HardNegative, evaluate, hard_negative_accuracy, hard_negatives, recall_at_k, retrieval_metrics
from tl_vlm.tuning.negclip import batch_loss, negclip_loss, triples, tune_negclip
from tl_vlm.tuning.swap import answer_loss, train_projector, with_vision_encoder
from tl_vlm.zoo import data
from tl_vlm.zoo.tiny import build_tiny_vlm
from tl_vlm.zoo.tiny_clip import build_tiny_clip


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("dual_tuning")
    return {v: build_tiny_clip(root / v, v) for v in ("clip", "siglip")}


def test_recall_on_a_planted_matrix():
    # Rows (image to text): image 0's text ranks 1st, image 1's and image 2's 3rd. Columns (text to image): texts
    # 0 and 1 find their image first, text 2 second.
    logits = torch.tensor([[5.0, 1.0, 0.0],
                           [4.0, 3.0, 9.0],
                           [3.0, 2.0, 1.0]])
    assert recall_at_k(logits, 1) == {"image_to_text": pytest.approx(1 / 3), "text_to_image": pytest.approx(2 / 3)}
    assert recall_at_k(logits, 2) == {"image_to_text": pytest.approx(1 / 3), "text_to_image": 1.0}
    metrics = retrieval_metrics(logits, ks=(3,))
    assert metrics["image_to_text_recall@1"] == pytest.approx(1 / 3) and metrics["image_to_text_recall@3"] == 1.0
    tied = torch.ones(2, 2)  # ties count against: nothing is retrieved at rank 1
    assert recall_at_k(tied, 1) == {"image_to_text": 0.0, "text_to_image": 0.0}
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3), 1)


def test_hard_negative_accuracy_on_planted_scores():
    negatives = [HardNegative(0, "c", "n", "colour"), HardNegative(1, "c", "n", "colour"), HardNegative(0, "c", "n", "relation")]
    scores = {"caption": torch.tensor([2.0, 0.0, 1.0]), "negative": torch.tensor([1.0, 1.0, 3.0])}
    assert hard_negative_accuracy(scores, negatives) == {"colour": 0.5, "relation": 0.0}


def test_hard_negatives_swap_one_fact():
    bars = [{"colour": "red", "value": 4, "box": (0, 0, 1, 1)}, {"colour": "blue", "value": 2, "box": (0, 0, 1, 1)},
            {"colour": "green", "value": 5, "box": (0, 0, 1, 1)}]
    chart = data.Example(Image.new("RGB", (64, 64)), "highest_bar", "?", "green", bars)
    shape = {"shape": "circle", "colour": "red", "position": "top left", "box": (0, 0, 5, 5)}
    scene = data.Example(Image.new("RGB", (64, 64)), "colour", "?", "red", [shape])
    images, captions, negatives = hard_negatives([chart, scene, scene], seed=3)
    assert len(images) == len(captions) == 2  # the repeated scene's caption is not unique: dropped
    by_kind = {n.kind: n for n in negatives}
    assert set(by_kind) == {"relation", "colour", "value", "shape", "position"}
    relation = next(n for n in negatives if n.kind == "relation")
    high, low = relation.caption.split()[1], relation.caption.split()[-2]
    values = {b["colour"]: b["value"] for b in bars}
    assert values[high] > values[low]
    assert relation.negative == f"the {low} bar is higher than the {high} bar"
    for n in negatives:  # one word differs (the relation swaps two); a position is one or two words
        if n.kind == "position":
            assert n.caption.startswith("a red circle at the ") and n.negative != n.caption
            continue
        differ = [a != b for a, b in zip(n.caption.split(), n.negative.split(), strict=True)]
        assert sum(differ) == (2 if n.kind == "relation" else 1)
    value = next(n for n in negatives if n.kind == "value")
    colour, true_value = value.caption.split()[1], int(value.caption.split()[-1])
    assert values[colour] == true_value != int(value.negative.split()[-1])


def test_evaluate_reports_every_kind(paths):
    model = quiet(HookedCLIP.from_pretrained, paths["clip"])
    report = evaluate(model, data.make_examples(12, 0, kinds=("colour", "bar_value")), ks=(1, 5))
    kinds = set(report[report.metric == "hard_negative"].kind)
    assert kinds == {"colour", "shape", "position", "relation", "value"}
    assert report.value.between(0, 1).all()


@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_negclip_tuning_lowers_held_out_hard_negative_loss(paths, variant, tmp_path):
    model = quiet(HookedCLIP.from_pretrained, paths[variant])
    held_out = triples(16, seed=99)
    with torch.no_grad():
        before = batch_loss(model, *held_out).item()
    tune_negclip(model, 12, tmp_path, batch_size=8, lr=1e-3, progress=False)
    with torch.no_grad():
        after = batch_loss(model, *held_out).item()
    assert after < before - 0.1


def test_negclip_loss_prefers_captions_over_negatives():
    class Fake:
        class vlm_cfg:
            family = "clip"

    good = torch.cat([torch.eye(3) * 10, torch.zeros(3, 3)], 1)
    bad = torch.cat([torch.zeros(3, 3), torch.eye(3) * 10], 1)
    assert negclip_loss(Fake, good) < negclip_loss(Fake, bad)
    Fake.vlm_cfg.family = "siglip"
    assert negclip_loss(Fake, good - 5) < negclip_loss(Fake, bad - 5)


def test_tuning_resumes_exactly_and_saves_a_hf_checkpoint(paths, tmp_path):
    straight = quiet(HookedCLIP.from_pretrained, paths["clip"])
    tune_negclip(straight, 4, tmp_path / "a", batch_size=4, lr=1e-3, save_every=2, progress=False)
    resumed = quiet(HookedCLIP.from_pretrained, paths["clip"])
    tune_negclip(resumed, 2, tmp_path / "b", batch_size=4, lr=1e-3, save_every=2, progress=False)
    again = quiet(HookedCLIP.from_pretrained, paths["clip"])
    assert len(tune_negclip(again, 4, tmp_path / "b", batch_size=4, lr=1e-3, save_every=2, progress=False)) == 2
    for (name, a), b in zip(straight.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name
    straight.save_pretrained(tmp_path / "saved")
    hf = quiet(AutoModel.from_pretrained, tmp_path / "saved").eval()
    inputs = straight.prepare(images=[e.image for e in data.make_examples(2, 0)], text=["a red bar", "chart"])
    with torch.no_grad():
        assert torch.allclose(hf(**inputs.as_kwargs()).logits_per_image, straight(inputs), atol=1e-5)
    folded = quiet(HookedCLIP.from_pretrained, paths["clip"], fold_ln=True)
    with pytest.raises(ValueError, match="processed weights"):
        folded.save_pretrained(tmp_path / "folded")


def test_swapped_encoder_and_projector_only_training(tmp_path):
    vlm = quiet(HookedVLM.from_pretrained, build_tiny_vlm(tmp_path / "llava", "llava15"))
    text = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, eos_token_id=3)
    torch.manual_seed(0)
    clip = HookedCLIP.from_hf_model(CLIPModel(CLIPConfig(text_config=text, vision_config=vlm.vlm_cfg.vision.hf_config.to_dict(),
                                                         projection_dim=8)).eval())
    swapped = with_vision_encoder(vlm, clip)
    pixels = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        assert torch.equal(swapped.vision(pixels, keep=[3])[3], clip.vision(pixels, keep=[3])[3])
        assert not torch.equal(vlm.vision(pixels, keep=[3])[3], swapped.vision(pixels, keep=[3])[3])  # a copy
    frozen = {n: p.clone() for n, p in swapped.named_parameters() if not n.startswith("projector.")}
    held_out = data.make_examples(16, 7)
    with torch.no_grad():
        before = answer_loss(swapped, held_out).item()
    train_projector(swapped, 8, batch_size=8, lr=3e-3, progress=False)
    with torch.no_grad():
        assert answer_loss(swapped, held_out).item() < before - 0.3
    assert all(torch.equal(frozen[n], p) for n, p in swapped.named_parameters() if n in frozen)
    twin = with_vision_encoder(clip, vlm)  # the other way: the VLM's encoder under the dual encoder's text twin
    with torch.no_grad():
        assert torch.equal(twin.vision(pixels, keep=[3])[3], vlm.vision(pixels, keep=[3])[3])
        assert torch.equal(twin.vision.proj.W, clip.vision.proj.W)  # pooling and projection stay the twin's
    wider = dict(vlm.vlm_cfg.vision.hf_config.to_dict(), num_hidden_layers=2)
    other = HookedCLIP.from_hf_model(CLIPModel(CLIPConfig(text_config=text, vision_config=wider, projection_dim=8)))
    with pytest.raises(ValueError, match="n_layers"):
        with_vision_encoder(vlm, other)
