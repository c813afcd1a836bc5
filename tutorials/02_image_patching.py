# %% [markdown]
# # Activation patching over images, with TransformerLens' own patching functions
#
# Activation patching asks *where* a model keeps the information that decides its answer: run a corrupted
# input, paste in one activation from a clean run, and measure how much of the clean answer comes back.
# For a VLM the interesting corruptions are in the image. Here we ask "What is the colour of the shape?"
# about a scene and about the same scene with the shape recoloured, and patch
#
# 1. the language model's residual stream, layer x position (`transformer_lens.patching.get_act_patch_resid_pre`),
# 2. the vision tower's residual stream, layer x patch (the same function on `model.tower("vision")`),
# 3. image regions (`tl_vlm.analysis.spatial`): only the tokens covering the shape vs a background patch.
#
# Runs offline in seconds on the toy LLaVA shipped with the package; switch `MODEL` for a real checkpoint.
# A full sweep costs one forward pass per (layer, position) cell: a few hundred on the toy, about
# 32 x 600 (language) and 24 x 577 (vision) on LLaVA-1.5-7B. On a big model pass
# `index_axis_names=None, index_df=...` (a DataFrame with the `layer` and `pos` of each cell to patch) to
# the same functions to sweep a subset.

# %%
MODEL = "tl-vlm/toy-llava"  # or "llava-hf/llava-1.5-7b-hf"
DEVICE = "cpu"  # "cuda" for a real checkpoint

import matplotlib.pyplot as plt
import numpy as np
import torch
from transformer_lens import patching

from tl_vlm import HookedVLM
from tl_vlm.analysis.confidence import object_token_ids
from tl_vlm.analysis.logit_lens import lens_hook_names
from tl_vlm.analysis.spatial import patch_image_region, region_mask, spatial_index
from tl_vlm import format_prompt
from tl_vlm.zoo.data import make_examples, recolour
from tl_vlm.zoo.toys import TOYS

TOY = MODEL in TOYS
if TOY:
    torch.set_num_threads(1)  # a toy is too small to gain from threads
DTYPE = torch.float32 if DEVICE == "cpu" else torch.float16
SUFFIX = "" if TOY else " Answer with one word."  # real chat models otherwise answer in sentences

model = HookedVLM.from_pretrained(MODEL, device=DEVICE, dtype=DTYPE)
assert model.capabilities.spatial_cells, (
    "this tutorial maps image tokens to image patches (LLaVA, LLaVA-NeXT, Qwen-VL); BLIP-2's image tokens are "
    "Q-Former queries: see query_patch_attention in the README, and tutorials 04-05, which run on BLIP-2 too"
)
torch.set_grad_enabled(False)

# %% [markdown]
# ## A clean / corrupted pair that differs only in the shape's colour
# We take a colour question from the synthetic data and a second example whose answer is a different colour,
# and redraw the first scene with its shape in that colour (`zoo.data.recolour`). The pair is then minimal: same prompt, same shape, same
# place, only the colour changes, so whatever patching restores is colour information (two unrelated
# scenes would also differ in where the shape is).

# %%
examples = make_examples(16, seed=0, kinds=("colour",))
clean_ex = examples[0]
corrupt_colour = next(ex.answer for ex in examples if ex.answer != clean_ex.answer)
corrupt_image = recolour(clean_ex, corrupt_colour).image  # the same drawing, the shape in another colour

prompt = format_prompt(model.processor, clean_ex.question + SUFFIX)
clean = model.prepare(images=clean_ex.image, text=prompt)
corrupt = model.prepare(images=corrupt_image, text=prompt)
assert torch.equal(clean.input_ids, corrupt.input_ids)  # same tokens: only the pixels differ

clean_logits, corrupt_logits = model(clean), model(corrupt)


def first_token(word, logits):
    """The word's first token as the model would start its answer (lower-case or capitalised: the likelier)."""
    options = {object_token_ids(model, w)[0] for w in (word, word.capitalize())}
    return max(options, key=lambda t: logits[0, -1, t].item())


clean_token = first_token(clean_ex.answer, clean_logits)
corrupt_token = first_token(corrupt_colour, corrupt_logits)
predicted = [model.tokenizer.decode([int(lg[0, -1].argmax())]) for lg in (clean_logits, corrupt_logits)]
print(f"clean:   shape is {clean_ex.answer:7s} -> model's next token {predicted[0]!r}")
print(f"corrupt: shape is {corrupt_colour:7s} -> model's next token {predicted[1]!r}")

fig, axes = plt.subplots(1, 2, figsize=(5, 2.8))
titles = (f"clean: {predicted[0]}", f"corrupt: {predicted[1]}")
for ax, image, title in zip(axes, (clean_ex.image, corrupt_image), titles):
    ax.imshow(image)
    ax.set_title(title)
    ax.set_axis_off()
plt.show()

# %% [markdown]
# ## The metric: normalised logit difference
# `logit(clean colour) - logit(corrupt colour)` at the last position, rescaled so that the corrupted run
# scores 0 and the clean run 1. A patch scoring 1 restores the clean answer completely.

# %%
def logit_diff(logits):
    return logits[0, -1, clean_token] - logits[0, -1, corrupt_token]


CLEAN_LD, CORRUPT_LD = logit_diff(clean_logits).item(), logit_diff(corrupt_logits).item()


def metric(logits):
    return (logit_diff(logits) - CORRUPT_LD) / (CLEAN_LD - CORRUPT_LD)


print(f"logit difference: clean {CLEAN_LD:.2f}, corrupt {CORRUPT_LD:.2f}")
assert CLEAN_LD > CORRUPT_LD, "the pair must move the answer for patching to measure anything"
assert abs(metric(clean_logits).item() - 1) < 1e-6 and abs(metric(corrupt_logits).item()) < 1e-6

# %% [markdown]
# ## 1. Language model: every layer x every position
# `get_act_patch_resid_pre` is TransformerLens' own function, unchanged. It receives the `VLMInputs`
# where it expects tokens, and every one of its patched runs keeps the corrupted image attached (tl_vlm
# raises instead of silently running without pixels). We cache only the residual streams: that keeps the
# attention on its fast path, the same one the patched runs use.

# %%
_, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
result = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
n_layers, n_pos = result.shape
print(f"{n_layers} layers x {n_pos} positions = {n_layers * n_pos} patched forward passes")
assert result.shape == (model.cfg.n_layers, clean.shape[1])

image_pos = model.image_token_mask(clean.input_ids)[0].cpu()
first, last = int(image_pos.nonzero()[0]), int(image_pos.nonzero()[-1])
str_tokens = model.to_str_tokens(clean.input_ids[0])
result = result.float().cpu()
print("restored by the single best position, per layer:")
for layer in range(n_layers):
    pos = int(result[layer].argmax())
    where = f"image token {pos - first}" if image_pos[pos] else f"text token {str_tokens[pos]!r}"
    print(f"  layer {layer}: {result[layer, pos]:.2f} at position {pos} ({where}); "
          f"summed over image positions {result[layer, image_pos].sum():.2f}; last position {result[layer, -1]:.2f}")

scale = max(result.abs().max().item(), 1e-6)  # colour scale symmetric around 0, up to the largest effect
fig, ax = plt.subplots(figsize=(10, 0.6 * n_layers + 1.6))
shown = ax.imshow(result, cmap="RdBu", vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
ax.axvspan(first - 0.5, last + 0.5, ymin=1.0, ymax=1.04, color="orange", clip_on=False)
text_ticks = [p for p in range(n_pos) if not image_pos[p]]
ax.set_xticks(text_ticks + [(first + last) / 2], [str_tokens[p] for p in text_ticks] + ["image tokens"], rotation=90)
ax.set_yticks(range(n_layers))
ax.set_ylabel("layer (resid_pre)")
ax.set_title("get_act_patch_resid_pre: image tokens marked in orange", pad=12)
fig.colorbar(shown, ax=ax, label="normalised logit diff")
plt.show()

# %% [markdown]
# A single position restores only what that one token carries, so information spread over many image tokens
# shows up as many small values. The question a researcher asks next is *when* the colour moves from the
# image to the answer position. Patch all image positions at once, and the last
# position alone, at the input of every layer and at the final stream. Two checks must hold whatever the
# model: before layer 0 the image positions are the only difference between the runs, so patching them all
# restores the clean answer exactly; after the last layer only the last position feeds the logits, so
# patching it restores exactly.

# %%
last_pos = torch.zeros_like(image_pos)
last_pos[-1] = True
curves = {"all image positions": [], "last position": []}
for name in lens_hook_names(model):
    _, cache = model.run_with_cache(clean, names_filter=name)
    for label, where in (("all image positions", image_pos), ("last position", last_pos)):
        def paste(act, hook, where=where, name=name):
            act[:, where.to(act.device)] = cache[name][:, where.to(act.device)]
            return act

        curves[label].append(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, paste)])).item())
for label, values in curves.items():
    print(f"{label:20s}", np.round(values, 2))
assert abs(curves["all image positions"][0] - 1) < 1e-4, "all image tokens before layer 0 restore the clean run"
assert abs(curves["last position"][-1] - 1) < 1e-4, "patching the final stream at the last position restores the logits"

fig, ax = plt.subplots(figsize=(5, 3))
for label, values in curves.items():
    ax.plot(values, marker="o", label=label)
ax.set_xticks(range(n_layers + 1), [f"in {l}" for l in range(n_layers)] + ["final"])
ax.set_xlabel("language layer")
ax.set_ylabel("normalised logit diff")
ax.axhline(0, color="grey", linewidth=0.8)
ax.legend()
plt.show()

# %% [markdown]
# ## 2. Vision tower: every layer x every patch
# `model.tower("vision")` presents the vision tower as a TransformerLens model (its `cfg`, hook names relative
# to the tower), whose runs execute the whole VLM. `vision.inputs(corrupt)` has the tower's shape
# `[image, patch]`, so the same TL function now sweeps vision layers x patches (patch 0 is CLIP's class
# token). Each layer's result is drawn over the image through the spatial index, which knows the pixel box
# of every patch.

# %%
vision = model.tower("vision")
_, vision_cache = vision.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
corrupt_v = vision.inputs(corrupt)
vision_result = patching.get_act_patch_resid_pre(vision, corrupt_v, vision_cache, metric).float().cpu()
assert vision_result.shape == (vision.cfg.n_layers, corrupt_v.shape[1])

index = spatial_index(model, clean, [clean_ex.image])  # one row per image token: patch, cell, pixel box
cells = index[index["kind"] == "patch"]
grid_h, grid_w = int(cells["row"].max()) + 1, int(cells["col"].max()) + 1
box = clean_ex.objects[0]["box"]
print("shape's box (x0, y0, x1, y1):", box)


def overlaps(row, box):
    return row.x0 < box[2] and row.x1 > box[0] and row.y0 < box[3] and row.y1 > box[1]


read = max(model.vlm_cfg.feature_layers)  # the projector reads the input of vision block `read`
scale = max(vision_result.abs().max().item(), 1e-6)
fig, axes = plt.subplots(1, vision.cfg.n_layers, figsize=(2.6 * vision.cfg.n_layers, 2.8))
for layer, ax in enumerate(np.atleast_1d(axes)):
    grid = np.zeros((grid_h, grid_w))
    for row in cells.itertuples():
        grid[row.row, row.col] = vision_result[layer, row.patch]
    best = cells.iloc[int(np.argmax([vision_result[layer, p] for p in cells["patch"]]))]
    print(f"vision layer {layer}: best patch {best.patch} restores {vision_result[layer, best.patch]:.2f}, "
          f"on the shape: {overlaps(best, box)}; class token {vision_result[layer, 0]:.2f}")
    ax.imshow(clean_ex.image)
    w, h = clean_ex.image.size
    shown = ax.imshow(grid, cmap="RdBu", vmin=-scale, vmax=scale, alpha=0.8, extent=(0, w, h, 0),
                      interpolation="nearest")
    ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, edgecolor="k", linestyle="--"))
    ax.set_title(f"vision resid_pre {layer}", fontsize=9)
    ax.set_axis_off()
fig.colorbar(shown, ax=axes, label="normalised logit diff", fraction=0.02)
plt.show()

# %% [markdown]
# ## 3. Region patching: the shape's tokens vs the background
# Single patches undercount information that is spread over several tokens. `region_mask` selects every
# image token whose cell overlaps a pixel box, and `patch_image_region` pastes the clean activations of just
# those tokens into the corrupted run. We compare the shape's own box with a box of the same size in the
# image corner farthest from it, at the input of every vision block that matters and of every language block.
# The same spatial index gives the vision-side mask (`[image, patch]`) for the language-side positions.

# %%
# The background box: the shape's block of cells moved to the farthest corner of the patch grid, so both
# regions cover the same number of tokens.
on_shape = cells[[overlaps(row, box) for row in cells.itertuples()]]
r0, r1, c0, c1 = on_shape["row"].min(), on_shape["row"].max(), on_shape["col"].min(), on_shape["col"].max()
corners = [(r, c) for r in (0, grid_h - 1 - (r1 - r0)) for c in (0, grid_w - 1 - (c1 - c0))]
br, bc = max(corners, key=lambda rc: (rc[0] - r0) ** 2 + (rc[1] - c0) ** 2)
cell = lambda r, c: cells[(cells["row"] == r) & (cells["col"] == c)].iloc[0]
top_left, bottom_right = cell(br, bc), cell(br + r1 - r0, bc + c1 - c0)
background = (top_left.x0, top_left.y0, bottom_right.x1, bottom_right.y1)


def masks(box):
    language = region_mask(index, clean.input_ids, 0, box)
    rows = index[language[index["batch"].tolist(), index["position"].tolist()].tolist()]
    vision_mask = torch.zeros(tuple(corrupt_v.shape), dtype=torch.bool)
    vision_mask[rows["tile"].tolist(), rows["patch"].tolist()] = True
    return language, vision_mask


regions = {"shape": masks(box), "background": masks(background)}
assert not (regions["shape"][0] & regions["background"][0]).any(), "the two regions must not share tokens"
vision_layers = [l for l in range(vision.cfg.n_layers) if l <= read]  # later blocks cannot affect the output
hooks = [f"vision.blocks.{l}.hook_resid_pre" for l in vision_layers]
hooks += [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]
labels = [f"V{l}" for l in vision_layers] + [f"L{l}" for l in range(n_layers)]
region_curves = {}
for name, (language_mask, vision_mask) in regions.items():
    mask_of = lambda hook: vision_mask if hook.startswith("vision.") else language_mask
    region_curves[name] = [metric(patch_image_region(model, corrupt, clean, mask_of(h), h)).item() for h in hooks]
    print(f"{name:10s} box {tuple(int(v) for v in (box if name == 'shape' else background))}, "
          f"{int(language_mask.sum())} image tokens:",
          "  ".join(f"{label} {value:.2f}" for label, value in zip(labels, region_curves[name])))
assert regions["shape"][0].sum() == regions["background"][0].sum()

fig, ax = plt.subplots(figsize=(6, 3))
for name, values in region_curves.items():
    ax.plot(values, marker="o", label=f"{name} region")
ax.axvline(len(vision_layers) - 0.5, color="grey", linewidth=0.8)
ax.set_xticks(range(len(labels)), labels)
ax.set_xlabel("patched at the input of (V = vision block, L = language block)")
ax.set_ylabel("normalised logit diff")
ax.legend()
plt.show()

# %% [markdown]
# Read the curve left to right: at the first vision block the two regions differ only in their pixels, so a
# restoration from the shape's tokens alone says the colour enters there, and the background's value says
# how much of the decision rests on the rest of the image. Where the background curve rises in later
# layers, attention has copied the colour into tokens far from the object (large ViTs are known to store
# global information in a few background tokens, Darcet et al. 2024, "Vision transformers need registers");
# where the shape curve falls, the colour has left the shape's tokens. The same
# code on a real LLaVA answers these questions for real images: swap `clean_ex.image` for a photograph and
# `box` for an object's bounding box.

# %%
plt.close("all")  # frees the figures when run as a script, where plt.show() draws nothing
