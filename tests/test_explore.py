"""The explorer (issue 25): its computations against the model's own numbers, its refusals, and the app driven in
headless Chromium (Debian's chromium through Playwright; skipped with the reason when either is missing)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conformance.registry import params

from tl_vlm import HookedVLM
from tl_vlm.analysis.confidence import internal_confidence
from tl_vlm.explore import compute
from tl_vlm.zoo.data import make_examples, recolour

EXAMPLE = make_examples(1, seed=0, kinds=("colour",))[0]


@pytest.fixture(scope="module")
def llava():
    return HookedVLM.from_pretrained("tl-vlm/toy-llava")


@pytest.fixture(scope="module")
def session(llava):
    return compute.start(llava, EXAMPLE.image, EXAMPLE.question)


def test_refusals_name_the_fix(llava, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        compute.start(llava, str(text), "What colour?")
    with pytest.raises(ValueError, match="no image"):
        compute.start(llava, None, "What colour?")
    with pytest.raises(ValueError, match="no image placeholder '<image>'"):
        compute.start(llava, EXAMPLE.image, "USER: What colour? ASSISTANT:", raw_prompt=True)
    big = compute.start(llava, EXAMPLE.image.resize((3000, 1500)), EXAMPLE.question)
    assert big.image.size == (1024, 512) and "downscaled to 1024x512" in big.notice


def test_answer_is_the_models_greedy_answer_and_distribution(llava, session):
    text, table = compute.answer(session)
    with torch.no_grad():
        probs = llava(session.inputs)[0, -1].softmax(-1)
    assert table["token_id"][0] == int(probs.argmax())
    assert table["probability"][0] == pytest.approx(float(probs.max()), abs=1e-6)
    tokens = llava.generate(session.inputs, max_new_tokens=12, do_sample=False)[0, session.inputs.input_ids.shape[1]:]
    assert text == llava.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_attention_maps_paint_the_patterns_onto_each_cell(llava, session):
    with torch.no_grad():
        _, cache = llava.run_with_cache(session.inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    query = compute.text_positions(session)[-1][0]
    heat = compute.text_to_image_attention(session, 1, 2, query)
    cell = session.index.iloc[10]  # one image token's box holds its attention weight
    x, y = int((cell.x0 + cell.x1) / 2), int((cell.y0 + cell.y1) / 2)
    assert heat[y, x] == pytest.approx(float(cache["blocks.1.attn.hook_pattern"][0, 2, query, cell.position]), abs=1e-6)
    vision, label = compute.patch_to_patch_attention(session, 0, 1, (x, y))
    assert label == f"patch (row {cell.row}, col {cell.col})"
    pattern = cache["vision.blocks.0.attn.hook_pattern"][0, 1, cell.patch]
    other = session.index.iloc[20]
    ox, oy = int((other.x0 + other.x1) / 2), int((other.y0 + other.y1) / 2)
    assert vision[oy, ox] == pytest.approx(float(pattern[other.patch]), abs=1e-6)


def test_lens_maps_carry_the_internal_confidence(llava, session):
    conf, maps = compute.lens_maps(session, EXAMPLE.answer)
    assert float(conf.max()) == pytest.approx(float(internal_confidence(llava, session.inputs, EXAMPLE.answer)[0]))
    assert len(maps) == llava.cfg.n_layers + 1 and maps[0].shape == (EXAMPLE.image.size[1], EXAMPLE.image.size[0])
    cell = session.index.iloc[5]
    top = compute.lens_top_tokens(session, ((cell.x0 + cell.x1) / 2, (cell.y0 + cell.y1) / 2))
    assert list(top["layer"]) == list(range(llava.cfg.n_layers + 1))


def test_region_patching_over_the_whole_image_restores_what_patching_every_image_token_does(llava, session):
    corrupted = compute.start(llava, recolour(EXAMPLE, "blue").image, EXAMPLE.question)
    whole = (0, 0, *EXAMPLE.image.size)
    table = compute.region_patching(session, corrupted, whole)
    assert (table["region_tokens"] == table["image_tokens"]).all()
    language = table[table.tower == "language"]
    # every image token is in the box: the rest of the image is empty, so patching it restores nothing
    assert language["rest_of_image"].abs().max() < 1e-6
    assert language["region"].iloc[0] == pytest.approx(1.0, abs=1e-4)  # the whole image at the first layer is clean
    with pytest.raises(ValueError, match="same answer logits"):
        compute.region_patching(session, session, whole)


def test_head_ranking_is_zero_ablation_of_each_head(llava, session):
    table = compute.head_ranking(session)
    assert len(table) == llava.cfg.n_layers * llava.cfg.n_heads and table["logit_drop"].is_monotonic_decreasing
    top = table.iloc[0]

    def zero(z, hook):
        z[:, :, int(top["head"])] = 0.0
        return z

    with torch.no_grad():
        logits = llava(session.inputs)[0, -1]
        ablated = llava.run_with_hooks(session.inputs, fwd_hooks=[(f"blocks.{int(top['layer'])}.attn.hook_z", zero)])[0, -1]
    token = int(logits.argmax())
    assert top["logit_drop"] == pytest.approx(float(logits[token] - ablated[token]), abs=1e-4)


def test_query_models_go_through_query_to_patch_attention():
    blip2 = HookedVLM.from_pretrained("tl-vlm/toy-blip2")
    session = compute.start(blip2, EXAMPLE.image, EXAMPLE.question)
    heat = compute.text_to_image_attention(session, 0, 0, compute.text_positions(session)[-1][0])
    assert heat.shape == (EXAMPLE.image.size[1], EXAMPLE.image.size[0]) and heat.max() > 0
    vision, label = compute.patch_to_patch_attention(session, 0, 0, (5, 5))
    assert label == "patch (row 0, col 0)" and np.isfinite(vision).all()
    with pytest.raises(ValueError, match="Q-Former queries"):
        compute.lens_top_tokens(session, (5, 5))


@pytest.mark.parametrize("name", params())
def test_every_family_gets_its_image_maps_or_a_clear_refusal(loaded, name):
    model = loaded(name).model
    if not model.capabilities.image_positions:  # Mllama: images enter by cross-attention
        with pytest.raises(NotImplementedError, match="cross-attention"):
            compute.start(model, EXAMPLE.image, EXAMPLE.question)
        return
    session = compute.start(model, EXAMPLE.image, EXAMPLE.question)
    size = (EXAMPLE.image.size[1], EXAMPLE.image.size[0])
    query = compute.text_positions(session)[-1][0]
    n_layers = model.tower("encoder" if model.capabilities.encoder_decoder else "language").cfg.n_layers
    # some layer's head 0 reaches the image (a sliding-window layer may not: Gemma 3's window is 8 tokens)
    heats = [compute.text_to_image_attention(session, layer, 0, query) for layer in range(n_layers)]
    assert all(h.shape == size and np.isfinite(h).all() for h in heats) and max(h.max() for h in heats) > 0
    vision, _ = compute.patch_to_patch_attention(session, 0, 0, (EXAMPLE.image.size[0] / 2, EXAMPLE.image.size[1] / 2))
    assert vision.shape == size and vision.max() > 0
    if model.capabilities.encoder_decoder:
        with pytest.raises(NotImplementedError, match="encoder positions"):
            compute.lens_maps(session, "red")
        with pytest.raises(ValueError, match="decoder-only"):
            compute.head_ranking(session)
        return
    conf, maps = compute.lens_maps(session, "red")
    assert len(maps) == conf.shape[0] and maps[-1].shape == size


def test_port_in_use_picks_another_and_says_so():
    pytest.importorskip("gradio")
    from tl_vlm.explore.app import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        other, note = free_port("127.0.0.1", port)
    assert other != port and f"port {port} is in use" in note


def test_a_model_that_cannot_load_is_reported_and_the_app_still_builds(tmp_path):
    pytest.importorskip("gradio")
    from tl_vlm.explore.app import Explorer, build

    explorer = Explorer(str(tmp_path / "missing"))
    assert explorer.model is None and "could not load" in explorer.load_error
    build(explorer)
    with pytest.raises(ValueError, match="could not load"):
        explorer.session(EXAMPLE.image, "What colour?", False)


# ---------------------------------------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("gradio", reason="the explorer's extra is not installed (pip install 'tl-vlm[explore]')")
    from tl_vlm.explore.app import serve

    app, url = serve(port=7860, block=False)
    yield url
    app.close()


def test_every_tab_in_headless_chromium(server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium); the browser test needs it")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    shots = Path(os.environ.get("TL_VLM_SCREENSHOTS", tmp_path))  # README screenshots: TL_VLM_SCREENSHOTS=docs/explore
    shots.mkdir(parents=True, exist_ok=True)
    scene = tmp_path / "scene.png"
    EXAMPLE.image.resize((256, 256), Image.NEAREST).save(scene)
    wait = 180_000
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(server)
        page.wait_for_selector("#ask", timeout=wait)
        page.click("#ask")  # no image yet: an error in the page, and the app goes on
        page.get_by_text("no image: upload one or pick a built-in scene").first.wait_for(timeout=wait)
        page.set_input_files("#image input[type=file]", str(scene))
        page.fill("#question textarea", EXAMPLE.question)
        page.click("#ask")
        page.wait_for_function("document.querySelector('#reply textarea').value.length > 0", timeout=wait)
        reply = page.input_value("#reply textarea")
        expected = compute.answer(compute.start(HookedVLM.from_pretrained("tl-vlm/toy-llava"), scene, EXAMPLE.question))
        assert reply == expected[0]
        assert expected[1]["token"][0] in page.inner_text("#dist")
        page.screenshot(path=str(shots / "answer.png"), full_page=True)

        def rendered(selector: str) -> None:
            page.wait_for_selector(f"{selector} img", timeout=wait)
            page.wait_for_function(f"document.querySelector('{selector} img').naturalWidth > 0", timeout=wait)

        page.get_by_role("tab", name="attention").click()
        page.click("#run-attention")
        rendered("#fig-attention")
        page.screenshot(path=str(shots / "attention.png"), full_page=True)

        page.get_by_role("tab", name="logit lens").click()
        page.fill("#lens-word textarea", EXAMPLE.answer)
        page.click("#run-lens")
        rendered("#fig-lens")
        page.get_by_text("internal confidence").first.wait_for(timeout=wait)
        assert f"c({EXAMPLE.answer}) =" in page.inner_text("#lens-confidence")
        page.screenshot(path=str(shots / "logit_lens.png"), full_page=True)

        page.get_by_role("tab", name="patching").click()
        x0, y0, x1, y1 = (4 * v for v in EXAMPLE.objects[0]["box"])  # the object, in the 4x upload's pixels
        for label, value in zip(("x0", "y0", "x1", "y1"), (x0, y0, x1 + 4, y1 + 4)):
            page.get_by_label(label, exact=True).fill(str(value))
        page.get_by_label("grey out the region").check()
        page.click("#run-patching")
        page.wait_for_function("document.querySelector('#patch-table').innerText.includes('vision')", timeout=wait)
        page.screenshot(path=str(shots / "patching.png"), full_page=True)

        page.get_by_role("tab", name="heads").click()
        page.click("#run-heads")
        page.wait_for_function("document.querySelector('#heads-table').innerText.includes('logit_drop')", timeout=wait)
        assert "layer" in page.inner_text("#heads-table")
        page.screenshot(path=str(shots / "heads.png"), full_page=True)
        browser.close()
