"""``tl-vlm explore``: a local Gradio app over ``compute``: answer, attention, logit lens, patching by region, heads.

Everything runs in this process on 127.0.0.1; every figure is a PNG and every table a CSV the page offers for
download. Errors (a model that cannot load, a bad upload, a prompt without the image placeholder) are shown in
the page and the server keeps running.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tl_vlm.analysis.viz import heatmap_over_image, layer_position_map
from tl_vlm.explore import compute
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.zoo.data import COLOURS, make_examples, recolour

DEFAULT_MODEL = "tl-vlm/toy-llava"
SCENES = {f"scene {i}: {ex.question} ({ex.answer})": ex for i, ex in enumerate(make_examples(6, seed=11, kinds=("colour",)))}
CORRUPTIONS = ("recolour the built-in scene's object", "grey out the region", "swap red and blue in the region")


def free_port(host: str, port: int) -> tuple[int, str]:
    """``port`` if free, else another free one, with a note saying so."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return port, ""
        except OSError:
            pass
    with socket.socket() as s:
        s.bind((host, 0))
        other = s.getsockname()[1]
    return other, f"port {port} is in use; serving on {other} instead"


def corrupt_image(image, box, kind: str, scene=None):
    """The corrupted twin for patching: the scene with its object recoloured, or the box greyed / colour-swapped."""
    if kind == CORRUPTIONS[0]:
        if scene is None:
            raise ValueError("recolouring needs a built-in scene (it knows the object); pick one or another corruption")
        return recolour(scene, next(c for c in COLOURS if c != scene.answer)).image
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    pixels = np.asarray(image).copy()
    region = pixels[y0:y1, x0:x1]
    pixels[y0:y1, x0:x1] = 128 if kind == CORRUPTIONS[1] else region[..., ::-1]
    return Image.fromarray(pixels)


class Explorer:
    """The app's state: one model (reloadable) and a folder for the figures and tables it serves."""

    def __init__(self, model_name: str = DEFAULT_MODEL, device: str | None = None):
        self.device, self.out = device, Path(tempfile.mkdtemp(prefix="tl_vlm_explore_"))
        self.model: HookedVLM | None = None
        self.name, self.load_error = model_name, ""
        self.load(model_name)

    def load(self, name: str) -> str:
        try:
            self.model = HookedVLM.from_pretrained(name, device=self.device)
            self.name, self.load_error = name, ""
            return f"loaded **{name}** ({self.model.vlm_cfg.family})"
        except Exception as err:  # noqa: BLE001 (any failure to load is reported in the page)
            self.load_error = f"could not load {name!r}: {err}"
            return f"**Error:** {self.load_error}"

    def session(self, image, question: str, raw: bool) -> compute.Session:
        if self.model is None:
            raise ValueError(self.load_error or "no model loaded")
        return compute.start(self.model, image, question, raw)

    def figure(self, name: str, image, heat, title: str) -> str:
        return str(heatmap_over_image(image, heat, self.out / f"{name}.png", title=title))

    def table(self, name: str, frame: pd.DataFrame) -> str:
        path = self.out / f"{name}.csv"
        frame.to_csv(path, index=False)
        return str(path)


def build(explorer: Explorer):
    import gradio as gr

    def guard(fn: Callable) -> Callable:
        """Errors become a message in the page (gr.Error), never a dead server."""

        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ValueError, KeyError, NotImplementedError, IndexError) as err:
                raise gr.Error(str(err)) from None

        return run

    with gr.Blocks(title="tl_vlm explorer", analytics_enabled=False) as app:
        gr.Markdown("# tl_vlm explorer\nAttention, logit lens, patching by region and head ablations on a VLM.")
        with gr.Row():
            model_name = gr.Textbox(value=explorer.name, label="model", scale=3)
            load = gr.Button("load", scale=1)
        status = gr.Markdown(f"**Error:** {explorer.load_error}" if explorer.load_error else f"loaded **{explorer.name}**",
                             elem_id="status")
        with gr.Row():
            with gr.Column():
                scene = gr.Dropdown(list(SCENES), value=None, label="built-in scene")
                image = gr.Image(type="pil", label="image", elem_id="image", sources=["upload", "clipboard"])
            with gr.Column():
                question = gr.Textbox(label="question", value="What colour is the shape?", elem_id="question")
                raw = gr.Checkbox(label="raw prompt (verbatim: it must hold the model's image placeholder)")
                ask = gr.Button("answer", variant="primary", elem_id="ask")
                notice = gr.Markdown(elem_id="notice")
                reply = gr.Textbox(label="answer", interactive=False, elem_id="reply")
                dist = gr.Dataframe(label="next-token distribution", elem_id="dist")
                dist_csv = gr.File(label="CSV")
        state = gr.State(None)

        def on_scene(key):
            ex = SCENES[key]
            return ex.image, ex.question

        scene.change(on_scene, scene, [image, question])
        load.click(explorer.load, model_name, status)

        @guard
        def on_ask(img, q, is_raw):
            session = explorer.session(img, q, is_raw)
            text, table = compute.answer(session)
            return session, session.notice, text, table, explorer.table("next_token", table)

        ask.click(on_ask, [image, question, raw], [state, notice, reply, dist, dist_csv])

        with gr.Tab("attention", elem_id="tab-attention"):
            with gr.Row():
                a_tower = gr.Radio(["language", "vision"], value="language", label="tower")
                a_layer = gr.Number(value=0, precision=0, label="layer")
                a_head = gr.Number(value=0, precision=0, label="head")
                a_query = gr.Number(value=-1, precision=0, label="text position (language; -1 = last)")
            gr.Markdown("Vision: click a patch on the picture below to see its attention to the other patches. "
                        "BLIP-2: text-to-image attention is spread over patches by the Q-Former's query-to-patch "
                        "cross-attention.")
            a_run = gr.Button("show attention", elem_id="run-attention")
            a_fig = gr.Image(type="filepath", label="attention over the image", elem_id="fig-attention")
            a_file = gr.File(label="PNG")

            def picture(session, heat, title):
                path = explorer.figure("attention", session.image, heat, title)
                return path, path

            @guard
            def on_attention(session, tower, layer, head, query):
                if session is None:
                    raise ValueError("press 'answer' first")
                layer, head = int(layer), int(head)
                if tower == "vision":  # the centre patch until one is clicked
                    return on_patch_click(session, layer, head, (session.image.size[0] / 2, session.image.size[1] / 2))
                pos = compute.text_positions(session)[-1][0] if query < 0 else int(query)
                heat = compute.text_to_image_attention(session, layer, head, pos)
                return picture(session, heat, f"layer {layer} head {head}: position {pos} -> image")

            def on_patch_click(session, layer, head, xy):
                heat, label = compute.patch_to_patch_attention(session, int(layer), int(head), xy)
                return picture(session, heat, f"vision layer {int(layer)} head {int(head)}: {label} -> patches")

            @guard
            def on_attention_click(session, layer, head, evt: gr.SelectData):
                if session is None:
                    raise ValueError("press 'answer' first")
                return on_patch_click(session, layer, head, tuple(evt.index))

            a_run.click(on_attention, [state, a_tower, a_layer, a_head, a_query], [a_fig, a_file])
            a_fig.select(on_attention_click, [state, a_layer, a_head], [a_fig, a_file])

        with gr.Tab("logit lens", elem_id="tab-lens"):
            with gr.Row():
                l_word = gr.Textbox(label="word", value="red", elem_id="lens-word")
                l_layer = gr.Number(value=-1, precision=0, label="layer (-1 = where the word peaks)")
            l_run = gr.Button("logit lens", elem_id="run-lens")
            l_conf = gr.Markdown(elem_id="lens-confidence")
            with gr.Row():
                l_fig = gr.Image(type="filepath", label="p(word) over the image", elem_id="fig-lens")
                l_grid = gr.Image(type="filepath", label="layer x image token")
            l_files = gr.File(label="PNG / CSV", file_count="multiple")
            gr.Markdown("Click the picture for the top tokens of that patch at every layer.")
            l_top = gr.Dataframe(label="top tokens per layer", elem_id="lens-top")

            @guard
            def on_lens(session, word, layer):
                if session is None:
                    raise ValueError("press 'answer' first")
                conf, maps = compute.lens_maps(session, word)
                peak = int(conf.amax(1).argmax())
                layer = peak if layer < 0 else int(layer)
                if not 0 <= layer < len(maps):
                    raise ValueError(f"layer {layer}: the lens has layers 0..{len(maps) - 1}")
                fig = explorer.figure("lens", session.image, maps[layer], f"p({word}) at layer {layer}")
                grid = str(layer_position_map(conf, explorer.out / "lens_grid.png", title=f"p({word})"))
                csv = explorer.table("lens", pd.DataFrame(conf.numpy()).rename_axis("layer").reset_index())
                text = (f"internal confidence c({word}) = **{float(conf.max()):.4f}** "
                        f"(max over layers and image tokens; peak at layer {peak})")
                return text, fig, grid, [fig, grid, csv]

            @guard
            def on_lens_click(session, evt: gr.SelectData):
                return compute.lens_top_tokens(session, tuple(evt.index))

            l_run.click(on_lens, [state, l_word, l_layer], [l_conf, l_fig, l_grid, l_files])
            l_fig.select(on_lens_click, state, l_top)

        with gr.Tab("patching", elem_id="tab-patching"):
            gr.Markdown("Clean activations inside the box pasted into the corrupted run, layer by layer, in both "
                        "towers: 1 = clean answer restored, 0 = corrupted answer.")
            with gr.Row():
                p_box = [gr.Number(value=v, label=k) for k, v in zip(("x0", "y0", "x1", "y1"), (0, 0, 32, 32))]
            p_kind = gr.Radio(list(CORRUPTIONS), value=CORRUPTIONS[0], label="corrupted image")
            p_run = gr.Button("patch region", elem_id="run-patching")
            p_stop = gr.Button("stop")
            p_corrupt = gr.Image(type="pil", label="corrupted image", interactive=False)
            p_table = gr.Dataframe(label="restored logit difference", elem_id="patch-table")
            p_file = gr.File(label="CSV")

            def on_scene_box(key):
                x0, y0, x1, y1 = SCENES[key].objects[0]["box"]
                return x0, y0, x1 + 1, y1 + 1  # inclusive pixel box -> half-open

            scene.change(on_scene_box, scene, p_box)

            @guard
            def on_patch(session, key, kind, x0, y0, x1, y1, progress=gr.Progress()):
                if session is None:
                    raise ValueError("press 'answer' first")
                box = (x0, y0, x1, y1)
                corrupted_image = corrupt_image(session.image, box, kind, SCENES.get(key) if key else None)
                corrupted = compute.start(session.model, corrupted_image, session.prompt, raw_prompt=True)
                table = compute.region_patching(session, corrupted, box, progress)
                return corrupted_image, table, explorer.table("patching", table)

            event = p_run.click(on_patch, [state, scene, p_kind, *p_box], [p_corrupt, p_table, p_file])
            p_stop.click(None, cancels=[event])

        with gr.Tab("heads", elem_id="tab-heads"):
            h_word = gr.Textbox(label="answer word (empty: the model's top next token)")
            h_run = gr.Button("rank heads", elem_id="run-heads")
            h_stop = gr.Button("stop")
            h_table = gr.Dataframe(label="zero-ablation: drop of the answer logit", elem_id="heads-table")
            h_file = gr.File(label="CSV")

            @guard
            def on_heads(session, word, progress=gr.Progress()):
                if session is None:
                    raise ValueError("press 'answer' first")
                table = compute.head_ranking(session, word or None, progress)
                return table, explorer.table("heads", table)

            event = h_run.click(on_heads, [state, h_word], [h_table, h_file])
            h_stop.click(None, cancels=[event])
    return app


def serve(model_name: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          block: bool = True):
    """Start the explorer; returns (app, url). ``block=False`` returns while it serves (tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports
    port, note = free_port(host, port)
    if note:
        print(note)
    app = build(Explorer(model_name, device))
    app.queue()
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                           footer_links=[])
    return app, url
