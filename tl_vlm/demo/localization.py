"""The demo's logit-lens localisation: where among the image tokens the answer word is most probable, and whether
that place holds pixels of the drawn shape (not merely its bounding box); the pointing game repeats it per scene."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.analysis.confidence import confidence_map, localization
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.demo.tasks import COLOUR, Task
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo.data import BACKGROUND, Example


def pointing_game(model: HookedVLM, examples: list[Example], task: Task = COLOUR) -> dict:
    """The peak's hit rate over several scenes (the first is the demo's own), with the mean chance level."""
    hits, chance = 0, 0.0
    for ex in examples:
        inputs = model.prepare(images=ex.image, text=format_prompt(model.processor, ex.question) + task.answer_prefix)
        record, _, _ = localize(model, inputs, ex.image, ex.answer, ex.objects[0]["box"], task.background(ex), heat=False)
        hits += record["hit"]
        chance += record["chance"]
    return {"scenes": len(examples), "hits": hits, "hit_rate": hits / len(examples), "chance": chance / len(examples)}


def localize(
    model: HookedVLM, inputs: VLMInputs, image, word: str, box, background=BACKGROUND, heat: bool = True
) -> tuple[dict, Float[Tensor, "height width"] | None, Float[Tensor, "layer image_token"]]:
    """Logit-lens p(word) at image tokens; a hit when the peak's patch (queries: pixel) holds pixels of the drawn
    shape (pixels not of the ``background`` colour). Returns (record, heat over the image's pixels or None when not
    asked, layer x image-token map)."""
    shape = torch.from_numpy((np.asarray(image.convert("RGB")) != background).any(-1))  # [y, x] single-shape scenes
    conf = confidence_map(model, inputs, word)[:, 0].cpu()  # [layer (inputs of each block, then final), image token]
    queries = model.capabilities.queries
    # Queries have no cell of their own: their peak is read off the pixel map, so it is needed either way.
    pixels = localization(model, inputs, word, [image])[0] if heat or queries else None
    record: dict = {"word": word, "variant": "Jiang et al.: unembed without the final norm, top-50 renormalised",
                    "layers": conf.shape[0], "max_p": conf.max().item()}
    if queries:
        y, x = divmod(int(pixels.argmax()), pixels.shape[1])
        token = int(conf.amax(0).argmax())
        record["peak"] = {"pixel": [x, y], "token": token, "layer": int(conf[:, token].argmax()),
                          "p": conf[:, token].max().item(), "where": f"pixel ({x}, {y}) via query {token}"}
        record["hit"] = bool(shape[y, x])
        record["chance"] = shape.float().mean().item()
    else:
        index = spatial_index(model, inputs, [image])
        scores = conf.amax(0).clone()
        patch = torch.tensor((index["kind"] == "patch").values)
        scores[~patch] = -1.0
        token = int(scores.argmax())
        cell = index.iloc[token]
        on_shape = [bool(is_patch) and bool(shape[int(r.y0):int(np.ceil(r.y1)), int(r.x0):int(np.ceil(r.x1))].any())
                    for is_patch, r in zip(patch.tolist(), index.itertuples())]
        box_px = [float(cell[k]) for k in ("x0", "y0", "x1", "y1")]
        record["peak"] = {"token": token, "position": int(cell["position"]), "row": int(cell["row"]),
                          "col": int(cell["col"]), "box": box_px, "layer": int(conf[:, token].argmax()),
                          "p": conf[:, token].max().item(),
                          "where": f"image token {token} (cell row {int(cell['row'])}, col {int(cell['col'])}, "
                                   f"pixels {tuple(int(v) for v in box_px)})"}
        record["hit"] = on_shape[token]
        record["chance"] = sum(on_shape) / int(patch.sum())
    record["object_box"] = list(box)
    record["map"] = [[round(v, 5) for v in row] for row in conf.tolist()]
    return record, pixels, conf
