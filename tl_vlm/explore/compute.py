"""What the explorer computes, as plain functions over a ``Session`` (model + image + prompt): the answer and the
next-token distribution, attention from a text token to the image (and a vision patch's attention to the other
patches), the logit lens over the image, patching by region and the head ranking. Each returns arrays and tables;
``app.py`` only draws them. Image-token maps are drawn over the image's pixels through the spatial index; a model
whose image tokens are Q-Former queries (BLIP-2) goes through the queries' cross-attention to the patches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from tl_vlm.analysis.confidence import confidence_map, object_token_ids, query_localization
from tl_vlm.analysis.logit_lens import hidden_state, lens_hook_names, lens_probs
from tl_vlm.analysis.spatial import region_mask, spatial_index
from tl_vlm.demo.patching import patch_regions
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.prompts import format_prompt

MAX_SIDE = 1024  # larger uploads are downscaled (with a notice): every figure is drawn at the image's size
Progress = Callable[[float, str], None]


@dataclass
class Session:
    model: HookedVLM
    image: Image.Image
    prompt: str  # as the processor receives it (with the image placeholder)
    inputs: VLMInputs
    index: pd.DataFrame  # the spatial index: one row per image token
    notice: str = ""


def open_image(source) -> tuple[Image.Image, str]:
    """An RGB image from a path or a PIL image, downscaled to ``MAX_SIDE`` with a notice; anything else refused."""
    if source is None:
        raise ValueError("no image: upload one or pick a built-in scene")
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            image = Image.open(source)
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"not an image file ({err}); upload a PNG, JPEG or similar") from None
    image, notice = image.convert("RGB"), ""
    if max(image.size) > MAX_SIDE:
        old = image.size
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        notice = f"the image ({old[0]}x{old[1]}) was downscaled to {image.size[0]}x{image.size[1]}"
    return image, notice


def start(model: HookedVLM, source, question: str, raw_prompt: bool = False) -> Session:
    """A session on one image: ``question`` goes through the model's chat template (which places the image);
    ``raw_prompt`` takes it verbatim, so it must hold the model's image placeholder."""
    image, notice = open_image(source)
    if not question.strip():
        raise ValueError("type a question (or a prompt) about the image")
    prompt = question if raw_prompt else format_prompt(model.processor, question)
    token = getattr(model.processor, "image_token", None)
    if raw_prompt and token is not None and token not in prompt:
        raise ValueError(f"the prompt has no image placeholder {token!r}: this model needs one where the image goes "
                         "(or untick 'raw prompt' to use the chat template)")
    inputs = model.prepare(images=image, text=prompt)
    return Session(model, image, prompt, inputs, spatial_index(model, inputs, [image]), notice)


# ---------------------------------------------------------------------------------------------- answer


def answer(session: Session, top_k: int = 10, max_new_tokens: int = 12) -> tuple[str, pd.DataFrame]:
    """The greedy answer and the next-token distribution's top ``top_k`` (token, probability)."""
    model = session.model
    with torch.no_grad():  # an encoder-decoder scores its first decoder step
        probs = model(model.scoring_inputs(session.inputs))[0, -1].float().softmax(-1)
        new = model.generate(session.inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_len = session.inputs.input_ids.shape[1]
    text = model.tokenizer.decode(new[0, prompt_len:], skip_special_tokens=True).strip()
    top = probs.topk(top_k)
    table = pd.DataFrame({"token": [model.tokenizer.decode([int(i)]) for i in top.indices],
                          "token_id": top.indices.tolist(), "probability": top.values.tolist()})
    return text, table


# ---------------------------------------------------------------------------------------------- maps


def token_heat(session: Session, values: Float[Tensor, " image_token"]) -> Float[np.ndarray, "height width"]:
    """One value per image token as a map over the image's pixels: each cell's box painted with its value (max
    where boxes overlap); query tokens spread over the patches they read."""
    model, image = session.model, session.image
    values = values.detach().float().cpu()
    if model.capabilities.queries:
        return query_localization(model, session.inputs, values[None], [image])[0].numpy()
    heat = np.zeros((image.size[1], image.size[0]))
    for row, value in zip(session.index.itertuples(), values.tolist()):
        if row.kind == "patch":
            y0, y1, x0, x1 = (int(round(v)) for v in (row.y0, row.y1, row.x0, row.x1))
            heat[y0:y1, x0:x1] = np.maximum(heat[y0:y1, x0:x1], value)
    return heat


def text_positions(session: Session) -> list[tuple[int, str]]:
    """(position, token) of every text position of the prompt, for choosing a query token."""
    ids = session.inputs.input_ids[0]
    image = session.model.image_token_mask(ids[None])[0].cpu()
    tokens = session.model.to_str_tokens(ids)
    return [(i, tok) for i, tok in enumerate(tokens) if not image[i]]


def text_to_image_attention(session: Session, layer: int, head: int, query: int) -> Float[np.ndarray, "height width"]:
    """Language layer ``layer``, head ``head``: the attention from position ``query`` to each image token (the
    encoder's, in an encoder-decoder language model)."""
    model = session.model
    name = f"{'encoder.' if model.capabilities.encoder_decoder else ''}blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(model.scoring_inputs(session.inputs), names_filter=name)
    image = model.image_token_mask(session.inputs.input_ids)[0].to(cache[name].device)
    return token_heat(session, cache[name][0, head, query][image])


def patch_to_patch_attention(
    session: Session, layer: int, head: int, xy: tuple[float, float]
) -> tuple[Float[np.ndarray, "height width"], str]:
    """Vision layer ``layer``, head ``head``: the attention of the patch under pixel ``xy`` to every patch, and a
    label of the clicked patch."""
    model = session.model
    name = f"vision.blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(model.scoring_inputs(session.inputs), names_filter=name)
    pattern = cache[name][:, head].float().cpu()  # [vision row, query patch, key patch]
    if model.capabilities.queries:  # a ViT on a square grid after the class token, resized from the image
        grid = model.vlm_cfg.image_size // model.vlm_cfg.patch_size
        gx = min(int(xy[0] / session.image.size[0] * grid), grid - 1)
        gy = min(int(xy[1] / session.image.size[1] * grid), grid - 1)
        keys = pattern[0, 1 + gy * grid + gx, 1:].view(1, 1, grid, grid)
        size = (session.image.size[1], session.image.size[0])
        return F.interpolate(keys, size=size, mode="nearest")[0, 0].numpy(), f"patch (row {gy}, col {gx})"
    cells = session.index[session.index["kind"] == "patch"]
    hit = cells[(cells.x0 <= xy[0]) & (xy[0] < cells.x1) & (cells.y0 <= xy[1]) & (xy[1] < cells.y1)]
    if hit.empty:
        raise ValueError(f"no image patch covers pixel {tuple(int(v) for v in xy)} (outside the processed image)")
    clicked = hit.iloc[0]
    per_token = model.capabilities.patches_per_token
    query = pattern[int(clicked.tile), int(clicked.patch)]
    values = torch.tensor([
        float(query[int(r.patch):int(r.patch) + per_token].sum()) if r.kind == "patch" and r.tile == clicked.tile else 0.0
        for r in session.index.itertuples()
    ])
    return token_heat(session, values), f"patch (row {int(clicked.row)}, col {int(clicked.col)})"


# ---------------------------------------------------------------------------------------------- logit lens


def lens_maps(session: Session, word: str) -> tuple[Float[Tensor, "layer image_token"], list[np.ndarray]]:
    """The internal confidence of ``word`` (Jiang et al.'s definition) at each image token per layer, and each
    layer's map over the image."""
    conf = confidence_map(session.model, session.inputs, word)[:, 0].cpu()  # [layer, image token]
    return conf, [token_heat(session, layer) for layer in conf]


def lens_top_tokens(session: Session, xy: tuple[float, float], k: int = 5) -> pd.DataFrame:
    """The top ``k`` tokens of the logit lens (through the final norm) at the image token under pixel ``xy``, per
    layer (layer n: the model's own output)."""
    model = session.model
    if model.capabilities.queries:
        raise ValueError("this model's image tokens are Q-Former queries, which have no pixel of their own; "
                         "see the heatmap for where each query reads")
    cells = session.index[session.index["kind"] == "patch"]
    hit = cells[(cells.x0 <= xy[0]) & (xy[0] < cells.x1) & (cells.y0 <= xy[1]) & (xy[1] < cells.y1)]
    if hit.empty:
        raise ValueError(f"no image token covers pixel {tuple(int(v) for v in xy)}")
    position = int(hit.iloc[0].position)
    with torch.no_grad():
        _, cache = model.run_with_cache(session.inputs, names_filter=lens_hook_names(model))
        rows = []
        for layer in range(model.cfg.n_layers + 1):
            probs = lens_probs(model, hidden_state(model, cache, layer, normed=True)[0, position], normed=False)
            top = probs.topk(k)
            rows.append({"layer": layer, **{f"top{i + 1}": f"{model.tokenizer.decode([int(t)])!r} {p:.3f}"
                                           for i, (t, p) in enumerate(zip(top.indices.tolist(), top.values.tolist()))}})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- patching


def region_patching(
    session: Session, corrupted: Session, box: tuple[float, float, float, float], progress: Progress | None = None
) -> pd.DataFrame:
    """Clean activations of the image tokens (and the vision patches feeding them) inside ``box`` pasted into the
    corrupted run, per layer of each tower: the restored logit difference, 1 = clean answer, 0 = corrupted."""
    model = session.model
    if model.capabilities.queries:
        raise ValueError("this model's image tokens are Q-Former queries, each reading the whole image, so a region "
                         "has no tokens of its own; patching by region needs a patch-token model")
    if not region_mask(session.index, session.inputs.input_ids, 0, box).any():
        raise ValueError(f"the box {tuple(int(v) for v in box)} covers no image token; draw it over the image "
                         f"({session.image.size[0]}x{session.image.size[1]} pixels)")
    if session.inputs.input_ids.shape != corrupted.inputs.input_ids.shape:
        raise ValueError("the corrupted image must give the same token layout (same size as the clean one)")
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(
            session.inputs, names_filter=lambda n: n.endswith("hook_resid_pre") and not n.startswith("qformer."))
        corrupt_logits = model(corrupted.inputs)
    clean_tok, corrupt_tok = int(clean_logits[0, -1].argmax()), int(corrupt_logits[0, -1].argmax())

    def diff(logits) -> float:
        last = logits[0, -1]
        return float(last[clean_tok] - (last[corrupt_tok] if corrupt_tok != clean_tok else 0.0))

    base, scale = diff(corrupt_logits), diff(clean_logits) - diff(corrupt_logits)
    if abs(scale) < 1e-6:
        raise ValueError("the clean and corrupted images give the same answer logits: choose a corruption that "
                         "changes the answer (e.g. recolour the object)")
    if progress is not None:
        progress(0.1, "patching")
    out = patch_regions(model, session.inputs, corrupted.inputs, clean_cache, session.image, box,
                        lambda logits: (diff(logits) - base) / scale)
    if progress is not None:
        progress(1.0, "done")
    rows = []
    for tower, key in (("language", "language_resid_pre"), ("vision", "vision_resid_pre")):
        for layer, (inside, rest) in enumerate(zip(out[f"{key}_object_region"], out[f"{key}_rest_of_image"])):
            rows.append({"tower": tower, "layer": layer, "region": inside, "rest_of_image": rest})
    return pd.DataFrame(rows).assign(region_tokens=out["object_region_tokens"], image_tokens=out["image_tokens"],
                                     clean_token=model.tokenizer.decode([clean_tok]),
                                     corrupted_token=model.tokenizer.decode([corrupt_tok]))


# ---------------------------------------------------------------------------------------------- heads


def head_ranking(session: Session, word: str | None = None, progress: Progress | None = None) -> pd.DataFrame:
    """Every language head zero-ablated in turn (its ``hook_z``): the drop of the answer token's logit at the last
    position, largest first. ``word``: the answer to score (default: the model's top next token)."""
    model = session.model
    if model.capabilities.encoder_decoder:
        raise ValueError("head ranking covers decoder-only language models; this one is an encoder-decoder (Flan-T5)")
    with torch.no_grad():
        logits = model(session.inputs)[0, -1]
    token = object_token_ids(model, word)[0] if word else int(logits.argmax())
    base = float(logits[token])
    rows = []
    total = model.cfg.n_layers * model.cfg.n_heads
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):

            def zero(z, hook, head=head):
                z[:, :, head] = 0.0
                return z

            with torch.no_grad():
                ablated = model.run_with_hooks(session.inputs, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
            rows.append({"layer": layer, "head": head, "logit_drop": base - float(ablated[0, -1, token])})
            if progress is not None:
                progress(len(rows) / total, f"layer {layer} head {head}")
    table = pd.DataFrame(rows).sort_values("logit_drop", ascending=False, ignore_index=True)
    return table.assign(token=model.tokenizer.decode([token]))
