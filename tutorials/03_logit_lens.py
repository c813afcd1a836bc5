# %% [markdown]
# # Logit lens on image tokens: what the language model reads into the picture
#
# The logit lens decodes a residual-stream vector through the unembedding, as if the model stopped there.
# Applied to the *image* positions of a VLM's language model it asks: which words do the image features
# already look like, at which layer, and where in the picture? Jiang et al. (2025, "Interpreting and editing
# vision-language representations to mitigate hallucinations") build three tools on it, all in
# `tl_vlm.analysis`:
#
# 1. `confidence_map`: the probability of a word at every image token and layer, and `localization`, the same
#    painted onto the image's pixels (zero-shot localisation);
# 2. `internal_confidence`: its maximum over layers and image tokens, a score of "is this object in the
#    image" that the paper uses to flag hallucinated objects;
# 3. `ProjectAway`: erase an object from the image features by removing its text direction.
#
# Here the object is the colour of a shape in a synthetic scene. Runs offline in seconds on the toy LLaVA
# shipped with the package; switch `MODEL` for a real checkpoint.

# %%
MODEL = "tl-vlm/toy-llava"  # or "llava-hf/llava-1.5-7b-hf"
DEVICE = "cpu"  # "cuda" for a real checkpoint

import matplotlib.pyplot as plt
import numpy as np
import torch

from tl_vlm import HookedVLM
from tl_vlm.analysis.confidence import (
    confidence_map, image_token_probs, internal_confidence, localization, object_token_ids,
)
from tl_vlm.analysis.editing import ProjectAway, project_away
from tl_vlm.analysis.logit_lens import hidden_state, image_positions, lens_hook_names, lens_probs
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm import format_prompt
from tl_vlm.zoo.data import COLOURS, make_examples
from tl_vlm.zoo.toys import TOYS

TOY = MODEL in TOYS
if TOY:
    torch.set_num_threads(1)  # a toy is too small to gain from threads
DTYPE = torch.float32 if DEVICE == "cpu" else torch.float16
SUFFIX = "" if TOY else " Answer with one word."  # real chat models otherwise answer in sentences
BATCH = 8  # images per forward pass in the statistics below
# The paper's lens: HF's hidden_states[l] unembedded as they are (the last one is already through the final
# norm), top-50 logits renormalised. The classic logit lens is dict(normed=True, top_k=None).
LENS = dict(normed=False, top_k=50)

model = HookedVLM.from_pretrained(MODEL, device=DEVICE, dtype=DTYPE)
assert model.capabilities.spatial_cells, (
    "this tutorial maps image tokens to image patches (LLaVA, LLaVA-NeXT, Qwen-VL); BLIP-2's image tokens are "
    "Q-Former queries: see query_patch_attention in the README, and tutorials 04-05, which run on BLIP-2 too"
)
torch.set_grad_enabled(False)
colours = sorted(COLOURS)
n_lens = model.cfg.n_layers + 1  # each layer's input, then the final stream through ln_final (HF's hidden_states)
print(f"{model.cfg.n_layers} language layers -> {n_lens} lens read-outs:", lens_hook_names(model)[:2], "...",
      lens_hook_names(model)[-1])

# %% [markdown]
# ## What do the image tokens decode to?
# One colour scene (the first one drawn, no selection); at each lens layer, the most frequent top-1 words
# over the image tokens. Early layers hold the projector's output, which was never trained to be read as
# words; words that do appear show which parts of the vocabulary the image features have moved towards.

# %%
examples = make_examples(4, seed=0, kinds=("colour",))
ex = examples[0]
prompt = format_prompt(model.processor, ex.question + SUFFIX)
inputs = model.prepare(images=ex.image, text=prompt)
at_image = image_positions(model, inputs.input_ids)[0]
answer = model.tokenizer.decode(model.generate(inputs, max_new_tokens=4)[0, inputs.shape[1]:], skip_special_tokens=True)
print(f"shape colour: {ex.answer}; model says {answer.strip()!r}; {int(at_image.sum())} image tokens")

_, cache = model.run_with_cache(inputs, names_filter=lens_hook_names(model))
for layer in range(n_lens):  # HF's hidden_states[layer]; the last one through the final norm, as HF returns it
    top = lens_probs(model, hidden_state(model, cache, layer, LENS["normed"])[0, at_image], False, LENS["top_k"]).argmax(-1)
    words, counts = np.unique(model.tokenizer.convert_ids_to_tokens(top.tolist()), return_counts=True)
    order = np.argsort(-counts)[:5]
    print(f"lens layer {layer}: " + ", ".join(f"{str(words[i])!r} x{counts[i]}" for i in order))

# %% [markdown]
# ## 1. Where is the colour word? `confidence_map` and `localization`
# `confidence_map(model, inputs, word)` is p(word) at every (lens layer, image token), one layer at a time
# so it fits for 7B models. Through the spatial index (pixel box of every image token) each layer becomes a
# map over the image; the dashed box is the shape's ground truth. `localization` is the max over layers
# painted onto the image's pixels (the paper's zero-shot segmentation), shown for the first four scenes.

# %%
box = ex.objects[0]["box"]
cmap = confidence_map(model, inputs, ex.answer, **LENS)[:, 0].float().cpu()  # [lens layer, image token]
assert cmap.shape == (n_lens, int(at_image.sum()))
index = spatial_index(model, inputs, [ex.image])
cells = index[index["kind"] == "patch"]
grid_h, grid_w = int(cells["row"].max()) + 1, int(cells["col"].max()) + 1


def on_box(row, box):
    return row.x0 < box[2] and row.x1 > box[0] and row.y0 < box[3] and row.y1 > box[1]


inside = torch.tensor([row.kind == "patch" and on_box(row, box) for row in index.itertuples()])
print(f"colour {ex.answer!r}, box {box}: {int(inside.sum())} of {len(index)} image tokens overlap the shape")
for layer in range(n_lens):
    best = int(cmap[layer].argmax())
    where = (f"at image token {best} (on the shape: {bool(inside[best])})" if cmap[layer, best] > 0
             else "(0 everywhere: not among the top-k tokens)")
    print(f"lens layer {layer}: max p = {cmap[layer, best]:.3g} {where}; "
          f"mean p on the shape {cmap[layer, inside].mean():.3f}, elsewhere {cmap[layer, ~inside].mean():.3f}")

fig, ax = plt.subplots(figsize=(8, 0.3 * n_lens + 1.5))
shown = ax.imshow(cmap, aspect="auto", origin="lower", interpolation="nearest")
for token in inside.nonzero().flatten().tolist():
    ax.axvline(token, ymin=0, ymax=0.03, color="red", linewidth=2)
ax.set_xlabel("image token (red ticks: on the shape)")
ax.set_yticks(range(n_lens))
ax.set_ylabel("lens layer")
fig.colorbar(shown, ax=ax, label=f"p({ex.answer})")
plt.show()

layers_shown = sorted(set(np.linspace(0, n_lens - 1, min(n_lens, 6)).round().astype(int).tolist()))
fig, axes = plt.subplots(1, len(layers_shown), figsize=(2.6 * len(layers_shown), 2.8))
w, h = ex.image.size
for ax, layer in zip(np.atleast_1d(axes), layers_shown):
    grid = np.full((grid_h, grid_w), np.nan)
    for k, row in enumerate(index.itertuples()):
        if row.kind == "patch":
            grid[row.row, row.col] = cmap[layer, k]
    ax.imshow(ex.image)
    ax.imshow(grid, alpha=0.75, extent=(0, w, h, 0), interpolation="nearest", vmin=0, vmax=max(cmap.max().item(), 1e-6))
    ax.set_title(f"p({ex.answer}), lens layer {layer}", fontsize=9)
    ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, edgecolor="w", linestyle="--"))
    ax.set_axis_off()
plt.show()

fig, axes = plt.subplots(1, len(examples), figsize=(2.6 * len(examples), 2.8))
for ax, scene in zip(axes, examples):
    row = model.prepare(images=scene.image, text=prompt)
    heat = localization(model, row, scene.answer, [scene.image], **LENS)[0]
    assert heat.shape == (scene.image.size[1], scene.image.size[0])  # in the original image's pixels
    b = scene.objects[0]["box"]
    ax.imshow(scene.image)
    ax.imshow(heat.numpy(), alpha=0.75, cmap="jet", vmin=0, vmax=max(heat.max().item(), 1e-6))
    ax.add_patch(plt.Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, edgecolor="w", linestyle="--"))
    ax.set_title(f"localization: {scene.answer} (max {heat.max():.2g})", fontsize=9)
    ax.set_axis_off()
plt.show()

# %% [markdown]
# One image proves little. Over many scenes: how often does the image token with the highest p(colour)
# overlap the shape, per lens layer and for `localization`'s max over layers, against chance (the share of
# image tokens on the shape)? And how much of the map's mass falls on the shape, relative to that share
# (1 = no better than uniform)? A map that is 0 everywhere counts as a miss. For speed, each batch of scenes
# runs once through `image_token_probs`, the function under `confidence_map`, for all colour tokens at once.

# %%
scenes = make_examples(32, seed=1, kinds=("colour",))
colour_ids = {c: object_token_ids(model, c) for c in colours}
union = sorted({t for ids in colour_ids.values() for t in ids})
hits = np.zeros((len(scenes), n_lens + 1))  # last column: max over layers
mass = np.zeros((len(scenes), n_lens + 1))
chance = np.zeros(len(scenes))
confidence = []  # internal confidence of every colour word, for the next section
for start in range(0, len(scenes), BATCH):
    chunk = scenes[start:start + BATCH]
    batch = model.prepare(images=[s.image for s in chunk], text=[prompt] * len(chunk))
    confidence.append(internal_confidence(model, batch, colours, **LENS).float().cpu())
    probs = image_token_probs(model, batch, union, **LENS).float().cpu()  # [lens layer, batch, image token, token]
    index = spatial_index(model, batch, [s.image for s in chunk])
    for b, scene in enumerate(chunk):
        maps = probs[:, b, :, [union.index(t) for t in colour_ids[scene.answer]]].amax(-1)  # = confidence_map
        maps = torch.cat([maps, maps.amax(0, keepdim=True)])
        rows = index[index["batch"] == b]
        on = torch.tensor([r.kind == "patch" and on_box(r, scene.objects[0]["box"]) for r in rows.itertuples()])
        i = start + b
        chance[i] = on.float().mean().item()
        hits[i] = (on[maps.argmax(-1)] & (maps.amax(-1) > 0)).numpy()
        mass[i] = (maps[:, on].sum(-1) / maps.sum(-1).clamp(min=1e-12)).numpy() / chance[i]
confidence = torch.cat(confidence)  # [scene, colour]

print(f"{len(scenes)} scenes; chance that a random image token is on the shape: {chance.mean():.2f}")
for layer in range(n_lens + 1):
    label = f"lens layer {layer}" if layer < n_lens else "max over layers"
    print(f"{label:16s} argmax on the shape: {hits[:, layer].mean():.2f}   "
          f"mass on the shape / chance: {mass[:, layer].mean():.2f}")
answers = np.array([s.answer for s in scenes])
print("max over layers, argmax on the shape by colour:",
      ", ".join(f"{c} {hits[answers == c, -1].mean():.2f} ({(answers == c).sum()})"
                for c in colours if (answers == c).any()))

# %% [markdown]
# ## 2. Internal confidence: present vs absent colours
# `internal_confidence(model, inputs, words)` is c(o) = max over layers and image tokens of p(o), for every
# word at once. The paper's observation is that c(o) is higher for objects in the image than for objects the
# model hallucinates; here the test is the true colour vs the colours that are not in the scene. The
# AUROC is the chance that a random present colour scores higher than a random absent one (0.5 = no signal).

# %%
present = torch.tensor([[c == s.answer for c in colours] for s in scenes])
pos, neg = confidence[present], confidence[~present]
auroc = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean().item()
top_is_true = (confidence.argmax(-1) == present.float().argmax(-1)).float().mean().item()
print(f"c(o) of the colour in the scene:    median {pos.median():.3f}, mean {pos.mean():.3f}  ({len(pos)} scores)")
print(f"c(o) of colours not in the scene:   median {neg.median():.3f}, mean {neg.mean():.3f}  ({len(neg)} scores)")
print(f"AUROC present vs absent: {auroc:.2f}; the true colour has the highest c(o) in {top_is_true:.0%} of scenes "
      f"(chance {1 / len(colours):.0%})")
assert confidence.shape == (len(scenes), len(colours)) and ((confidence >= 0) & (confidence <= 1)).all()

fig, ax = plt.subplots(figsize=(5, 3))
bins = np.linspace(0, 1, 21)
ax.hist(neg.numpy(), bins=bins, alpha=0.6, density=True, label="absent colours")
ax.hist(pos.numpy(), bins=bins, alpha=0.6, density=True, label="colour in the scene")
ax.set_xlabel("internal confidence c(o)")
ax.set_ylabel("density")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. ProjectAway: erase the colour from the image features
# `ProjectAway(model, [word], text_layer, image_layer)` takes the word's *text direction* t (the stream
# entering `text_layer` when the word is run alone) and, on the output of `image_layer` at image positions,
# removes `alpha` times each image token's positive component along t. If the image tokens encode the colour
# along its text direction, the answer should lose the colour. A control edit removes a colour that is
# *not* in the scene: it should leave the answer alone.

# %%
TEXT_LAYER = 1
IMAGE_LAYER = 0 if TOY else model.cfg.n_layers // 2  # the toy has 2 layers; tune both for a real model


def answer_probs(row):
    return model(row)[0, -1].float().softmax(-1)


def answer_token(word, probs):
    """The word's first token as the model would start its answer (lower-case or capitalised, whichever it prefers)."""
    return max({object_token_ids(model, w)[0] for w in (word, word.capitalize())}, key=lambda t: probs[t].item())


rows = []
for scene in scenes[:BATCH]:
    row = model.prepare(images=scene.image, text=prompt)
    control = colours[(colours.index(scene.answer) + 1) % len(colours)]
    before = answer_probs(row)
    token = answer_token(scene.answer, before)
    edits = {name: ProjectAway(model, [word], text_layer=TEXT_LAYER, image_layer=IMAGE_LAYER)
             for name, word in (("erase", scene.answer), ("control", control))}
    after = {}
    for name, edit in edits.items():
        with edit.applied(row):
            after[name] = answer_probs(row)
    # Why an edit does (not) bite: the share of image tokens with a positive component along t.
    _, image_cache = model.run_with_cache(row, names_filter=edits["erase"].hook_name)
    h = image_cache[edits["erase"].hook_name][0, image_positions(model, row.input_ids)[0]]
    t = edits["erase"].directions[0]
    rows.append(dict(colour=scene.answer, p_before=before[token].item(), p_erased=after["erase"][token].item(),
                     p_control=after["control"][token].item(),
                     top_erased=model.tokenizer.decode([int(after["erase"].argmax())]),
                     positive_share=((h @ t) > 0).float().mean().item(),
                     cosine=torch.nn.functional.cosine_similarity(h.float(), t.float()[None], dim=-1).mean().item()))
for r in rows:
    print(f"{r['colour']:7s} p before {r['p_before']:.3f} | erased {r['p_erased']:.3f} (now says {r['top_erased']!r}) "
          f"| control {r['p_control']:.3f} | image tokens with <h, t> > 0: {r['positive_share']:.0%}, "
          f"mean cos(h, t) {r['cosine']:+.2f}")
mean = {k: np.mean([r[k] for r in rows]) for k in ("p_before", "p_erased", "p_control")}
changed = np.mean([r["top_erased"].strip().lower() != r["colour"] for r in rows])
print(f"mean p(true colour): before {mean['p_before']:.3f}, erased {mean['p_erased']:.3f}, "
      f"control {mean['p_control']:.3f}; "
      f"answer changed in {changed:.0%} of scenes")

# %% [markdown]
# ProjectAway only removes components *along the word's text direction* and only where they are positive.
# The last two columns above say how much there is to remove: the share of image tokens with a positive
# projection and their mean cosine with t. Where the edit does not move the answer and these are small, the
# image tokens carry the colour along other directions, and the edit cannot erase it: a statement about the
# model's geometry, not about the tool. `project_away` itself
# accepts any directions. As a contrast, remove a direction read off the image tokens themselves: the mean
# image-token state of reference scenes with that colour minus that of scenes without it, at the same layer.

# %%
reference = make_examples(64, seed=2, kinds=("colour",))
edit_hook = f"blocks.{IMAGE_LAYER}.hook_resid_post"  # where ProjectAway edits
states, labels = [], []
for start in range(0, len(reference), BATCH):
    chunk = reference[start:start + BATCH]
    batch = model.prepare(images=[s.image for s in chunk], text=[prompt] * len(chunk))
    _, ref_cache = model.run_with_cache(batch, names_filter=edit_hook)
    mask = image_positions(model, batch.input_ids)
    states.append(ref_cache[edit_hook][mask].view(len(chunk), -1, model.cfg.d_model).mean(1).float())
    labels += [s.answer for s in chunk]
states, labels = torch.cat(states), np.array(labels)


def image_direction(colour):
    return states[labels == colour].mean(0) - states[labels != colour].mean(0)


def erase_with(direction, row):
    mask = image_positions(model, row.input_ids)

    def edit(resid, hook):
        resid[mask] = project_away(resid[mask], direction[None].to(resid.dtype))
        return resid

    return model.run_with_hooks(row, fwd_hooks=[(edit_hook, edit)])[0, -1].float().softmax(-1)


image_rows = []
for scene in scenes[:BATCH]:
    later = colours[colours.index(scene.answer) + 1:] + colours  # the next colour with reference scenes is the control
    control = next(c for c in later if c != scene.answer and c in labels)
    if scene.answer not in labels:
        continue  # no reference scene of this colour
    row = model.prepare(images=scene.image, text=prompt)
    token = answer_token(scene.answer, answer_probs(row))
    erased, ctrl = erase_with(image_direction(scene.answer), row), erase_with(image_direction(control), row)
    says = model.tokenizer.decode([int(erased.argmax())])
    image_rows.append((scene.answer, erased[token].item(), ctrl[token].item(), says))
print("image-derived direction, mean p(true colour): erased "
      f"{np.mean([r[1] for r in image_rows]):.3f}, control {np.mean([r[2] for r in image_rows]):.3f}; "
      "answer changed in "
      f"{np.mean([r[3].strip().lower() != r[0] for r in image_rows]):.0%} of {len(image_rows)} scenes")

fig, ax = plt.subplots(figsize=(7, 3))
bars = {"before": mean["p_before"], "ProjectAway\n(text dir.)": mean["p_erased"],
        "ProjectAway\ncontrol": mean["p_control"],
        "image dir.": np.mean([r[1] for r in image_rows]), "image dir.\ncontrol": np.mean([r[2] for r in image_rows])}
ax.bar(range(len(bars)), list(bars.values()), color=["grey", "C0", "C0", "C1", "C1"])
ax.set_xticks(range(len(bars)), list(bars), fontsize=8)
ax.set_ylabel("mean p(true colour)")
ax.set_ylim(0, 1.05)
plt.show()

# %% [markdown]
# ## 4. The paper's story in a biased world: `tl-vlm/toy-llava-bias`
# The colour toy above was trained end to end from scratch, so nothing makes its image tokens look like words,
# and the lens finds little. `tl-vlm/toy-llava-bias` (`tl_vlm.zoo.world`, `tl_vlm.zoo.train_world`) is trained as
# LLaVA is: a language model first trained on text (word pictures of scenes and their captions), then only the
# projector trained to caption images, with a dataset bias: every sky photo is captioned with a bird, even when
# none is visible. On held-out sky scenes without a bird it says "bird"; the lens sees the real objects where
# they are drawn and gives the hallucinated bird a low internal confidence; removing the "bird" direction from
# the image tokens removes it. Not at the paper's hook, though: this 4-layer language model reads the image in its
# first block, so an edit at any decoder layer's output comes too late, and the edit that works is the same
# projection on the image tokens entering the language model (`world_metrics.edited_input`).
# `world_metrics.measure` computes the paper's numbers with the functions used above (captions by beam search);
# `zoo/world_reference.py` recomputes them on the HF model alone (`toy_metrics.json` keeps both columns).

# %%
from tl_vlm.zoo import world, world_metrics

biased = HookedVLM.from_pretrained("tl-vlm/toy-llava-bias", device=DEVICE)
held_out = world_metrics.held_out(16, seed=3)  # half ordinary scenes, half sky without a bird
story = world_metrics.measure(biased, held_out)
for scene, caption in list(zip(held_out, story["captions"]))[6:10]:
    print(f"drawn: {sorted(scene.objects)} on {scene.background:5s} -> caption: {caption!r}")
h, c, p, e = (story[k] for k in ("hallucination", "confidence", "pointing", "project_away"))
print(f"bird on sky scenes without a bird: {h['bird_on_sky_without_bird']:.0%} of captions; other absent objects: "
      f"{h['other_objects_mean']:.0%}")
print(f"internal confidence, real {c['mean_real']:.2f} vs hallucinated {c['mean_hallucinated']:.2f}: AUROC {c['auroc']:.2f} "
      f"over {c['mentions']} mentions ({c['hallucinated']} hallucinated)")
print(f"pointing game: {p['accuracy']:.0%} of {p['objects']} drawn objects (chance {p['chance']:.0%})")
print(f"ProjectAway (text layer {e['text_layer']}, image layer {e['image_layer']}): {e['removed']:.0%} of "
      f"{e['hallucinated_mentions']} hallucinated mentions removed, {e['kept']:.0%} of {e['correct_mentions']} correct kept")
e = story["project_away_at_input"]
print(f"the same edit on the image tokens entering the language model (alpha {world_metrics.INPUT_ALPHA}): "
      f"{e['removed']:.0%} removed, {e['kept']:.0%} kept")

bait = next(s for s in held_out if s.background == "sky" and "bird" not in s.objects)
real = next(s for s in held_out if "bird" in s.objects)
fig, axes = plt.subplots(1, 2, figsize=(6, 3))
for ax, scene in zip(axes, (real, bait)):
    row = biased.prepare(images=scene.image, text=format_prompt(biased.processor, world.PROMPT))
    heat = localization(biased, row, "bird", [scene.image])[0]
    ax.imshow(scene.image)
    ax.imshow(heat.numpy(), alpha=0.6, cmap="jet", vmin=0, vmax=1)
    ax.set_title(f"p(bird), max {heat.max():.2f}", fontsize=9)
    ax.set_axis_off()
plt.show()

# %% [markdown]
# What to take away: the lens read-outs, the localisation hit rates and the c(o) separation printed above
# are measurements of this checkpoint, to be compared against chance (printed next to each). On a real
# LLaVA the same cells measure the paper's claims directly: whether real objects get higher internal
# confidence than absent ones, whether the confident image tokens sit on the object, and whether
# removing an object's text direction removes it from the answer.

# %%
plt.close("all")  # frees the figures when run as a script, where plt.show() draws nothing
