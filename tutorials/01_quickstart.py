# %% [markdown]
# # tl_vlm quickstart: load, ask, cache, hook every tower
#
# Runs offline in seconds on `tl-vlm/toy-llava`, a small LLaVA-1.5-architecture model shipped with the
# package and trained on synthetic scenes (coloured shapes on a 3x3 grid). Every line below also runs on a
# real checkpoint: change `MODEL` (and `DEVICE`) in the next cell.
#
# This file is a jupytext notebook (`jupytext --to ipynb tutorials/01_quickstart.py`); the test suite
# runs it as a script.

# %%
MODEL = "tl-vlm/toy-llava"  # or "llava-hf/llava-1.5-7b-hf"
DEVICE = "cpu"  # "cuda" for a real checkpoint

import matplotlib.pyplot as plt
import torch

from tl_vlm import HookedVLM
from tl_vlm.families import HookedLlava
from tl_vlm import format_prompt
from tl_vlm.zoo.data import make_examples
from tl_vlm.zoo.toys import TOYS, toy_metrics

TOY = MODEL in TOYS
if TOY:
    torch.set_num_threads(1)  # a toy is too small to gain from threads
DTYPE = torch.float32 if DEVICE == "cpu" else torch.float16
# Real chat models answer in sentences unless asked not to; the toys were trained on bare questions.
SUFFIX = "" if TOY else " Answer with one word."

model = HookedVLM.from_pretrained(MODEL, device=DEVICE, dtype=DTYPE)
print(model.vlm_cfg.architecture, "| towers:", list(model.towers()))
print("language:", model.cfg.n_layers, "layers x", model.cfg.d_model, "| vision:", model.vision.cfg.n_layers,
      "layers x", model.vision.cfg.d_model)
if TOY:
    print("toy held-out accuracy per question type:", toy_metrics(MODEL)["held_out_accuracy"])

# %% [markdown]
# ## Ask a question about an image
# `tl_vlm.zoo.data.make_examples` draws synthetic scenes together with their ground truth. The prompt goes
# through `format_prompt`, which applies the checkpoint's own chat template (so the same code builds
# `USER: <image>\n... ASSISTANT:` for LLaVA-1.5), and `model.prepare` runs the checkpoint's HF processor.
# The result is a `VLMInputs`: token ids with the pixel values attached, usable wherever TransformerLens
# takes tokens.

# %%
examples = make_examples(3, seed=0, kinds=("colour", "position", "count"))
answers = []
for ex in examples:
    inputs = model.prepare(images=ex.image, text=format_prompt(model.processor, ex.question + SUFFIX))
    tokens = model.generate(inputs, max_new_tokens=4)
    answer = model.tokenizer.decode(tokens[0, inputs.shape[1]:], skip_special_tokens=True).strip()
    answers.append(answer)
    print(f"{ex.question:35s} truth: {ex.answer:12s} model: {answer!r:16s} correct: {ex.answer in answer.lower()}")

fig, axes = plt.subplots(1, len(examples), figsize=(3 * len(examples), 3))
for ax, ex, answer in zip(axes, examples, answers):
    ax.imshow(ex.image)
    ax.set_title(f"{ex.question}\n-> {answer}", fontsize=8)
    ax.set_axis_off()
plt.show()

# %% [markdown]
# We keep the colour question for the rest of the notebook. Its prompt has one placeholder token per image
# feature (`<image>` repeated): those are the *image positions* of the language model.

# %%
ex = examples[0]
inputs = model.prepare(images=ex.image, text=format_prompt(model.processor, ex.question + SUFFIX))
image_positions = model.image_token_mask(inputs.input_ids)[0]
print("prompt:", repr(format_prompt(model.processor, ex.question + SUFFIX)))
print("tokens:", tuple(inputs.shape), "| image positions:", int(image_positions.sum()),
      "from", int(image_positions.nonzero()[0]), "to", int(image_positions.nonzero()[-1]))

# %% [markdown]
# ## One namespace of hooks for every tower
# The language model sits at the top level under `HookedTransformer`'s names, so every TransformerLens tool
# finds it; the vision tower and the projector are prefixed with `vision.` and `projector.`.
# (`tl-vlm hooks MODEL` prints the full list from the command line.)

# %%
def tower_of(name):
    return name.split(".")[0] if name.startswith(("vision.", "projector.")) else "language"

by_tower = {}
for name in model.hook_dict:
    by_tower.setdefault(tower_of(name), []).append(name)
for tower, names in by_tower.items():
    print(f"{tower:9s} {len(names):4d} hooks; outside the blocks, then block 0:")
    print("   ", [n for n in names if ".blocks." not in f".{n}"])
    block0 = [n for n in names if n.startswith(("blocks.0.", "vision.blocks.0."))]
    if block0:
        print("   ", block0)

# %% [markdown]
# ## One cache for every tower
# `run_with_cache` returns a TransformerLens `ActivationCache` over all of them. Shapes follow TL:
# `[batch, pos, d_model]` in the language model, `[image, patch, d_model]` in the vision tower (CLIP keeps
# its class token at patch 0), patterns `[batch, head, query, key]`.

# %%
logits, cache = model.run_with_cache(inputs)
for name in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "vision.hook_embed",
             "vision.blocks.0.attn.hook_pattern", "projector.hook_in", "projector.hook_out"]:
    print(f"{name:36s} {tuple(cache[name].shape)}")

n_tokens = inputs.shape[1]
assert cache["blocks.0.hook_resid_pre"].shape == (1, n_tokens, model.cfg.d_model)
assert cache["blocks.0.attn.hook_pattern"].shape == (1, model.cfg.n_heads, n_tokens, n_tokens)
# Every projected image feature lands on one image position ...
assert cache["projector.hook_out"].shape[1] == int(image_positions.sum())
# ... and hook_embed holds them there: text and image embeddings add up to it exactly.
assert torch.equal(cache["hook_text_embed"] + cache["hook_image_embed"], cache["hook_embed"])
assert torch.equal(cache["hook_embed"][0, image_positions], cache["projector.hook_out"][0])

# %% [markdown]
# ## Hooks: ablate vision heads and watch the answer
# `run_with_hooks` takes hooks on any tower. Here each vision head is zero-ablated in turn (its `hook_z` set to
# 0) and we read the logit of the model's answer token. Heads of vision layers past the one the projector
# reads (LLaVA-1.5 reads the second-to-last layer) cannot change anything: tl_vlm skips those blocks unless a
# hook is attached, and ablating them must leave the output exactly as it was.

# %%
# Baseline from a plain forward: caching attention patterns switches attention from SDPA to the explicit
# softmax path, which agrees only to ~1e-5.
with torch.no_grad():
    logits = model(inputs)
answer_token = int(logits[0, -1].argmax())
base = logits[0, -1, answer_token].item()
p = logits[0, -1].float().softmax(-1)[answer_token].item()
print(f"answer token {model.tokenizer.decode([answer_token])!r}: logit {base:.2f}, p = {p:.3f}")


def ablate_head(z, hook, head):
    z[:, :, head] = 0.0
    return z


vision = model.vision.cfg
effect = torch.zeros(vision.n_layers, vision.n_heads)
with torch.no_grad():
    for layer in range(vision.n_layers):
        for head in range(vision.n_heads):
            hook = (f"vision.blocks.{layer}.attn.hook_z", lambda z, hook, h=head: ablate_head(z, hook, h))
            out = model.run_with_hooks(inputs, fwd_hooks=[hook])
            effect[layer, head] = out[0, -1, answer_token].item() - base
print("change in the answer logit, [vision layer, head]:")
print(effect.numpy().round(2))
layer, head = divmod(int(effect.abs().argmax()), vision.n_heads)
print(f"largest effect: vision L{layer}H{head}, {effect[layer, head]:+.2f}")

if isinstance(model, HookedLlava):  # LLaVA's projector reads chosen vision layers (LLaVA-NeXT is one too)
    read = max(model.vlm_cfg.feature_layers)  # hidden-state index the projector reads (0 = input of block 0)
    print(f"the projector reads hidden state {read}, the output of vision block {read - 1}")
    assert torch.all(effect[read:] == 0), "blocks after the projector's feature layer cannot matter"

# %% [markdown]
# ## Weights in TransformerLens' layout
# Stacked per tower, with `FactoredMatrix` circuits, so TL's weight-based analyses apply to each tower.

# %%
print("W_Q", tuple(model.W_Q.shape), "| vision W_Q", tuple(model.vision.W_Q.shape))
print("OV circuit of language L0H0:", model.OV[0, 0])

# %%
plt.close("all")  # frees the figures when run as a script, where plt.show() draws nothing
