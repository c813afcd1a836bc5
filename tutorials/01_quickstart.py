# %% [markdown]
# # tl_vlm quickstart: load, cache, hook every tower
#
# Runs offline on the tiny LLaVA-1.5 fixture. To use a real checkpoint, set `MODEL` to a hub id or a
# local folder, e.g. `MODEL = "llava-hf/llava-1.5-7b-hf"` (and `DEVICE = "cuda"`).
#
# This file is a jupytext notebook (`jupytext --to ipynb tutorials/01_quickstart.py`); the test suite
# runs it as a script.

# %%
import tempfile

import torch

from tl_vlm import HookedVLM
from tl_vlm.zoo.tiny import build_tiny_vlm, sample_images

MODEL = None  # e.g. "llava-hf/llava-1.5-7b-hf"
DEVICE = "cpu"
if MODEL is None:
    MODEL = str(build_tiny_vlm(tempfile.mkdtemp() + "/llava15", "llava15"))

model = HookedVLM.from_pretrained(MODEL, device=DEVICE)
print(model.vlm_cfg.architecture, "| language:", model.cfg.n_layers, "layers x", model.cfg.d_model,
      "| vision:", model.vision.cfg.n_layers, "layers x", model.vision.cfg.d_model)

# %% [markdown]
# ## Inputs carry their images
# `model.prepare` runs the checkpoint's own HF processor and returns a `VLMInputs`: token ids with the
# pixel values attached. Pass it wherever TransformerLens passes tokens.

# %%
image = sample_images(1, seed=3)[0]
inputs = model.prepare(images=image, text="USER: <image>\nWhat is the colour of the shape? ASSISTANT:")
image_positions = model.image_token_mask(inputs.input_ids)[0]
print("tokens:", inputs.shape, "| image positions:", int(image_positions.sum()))

# %% [markdown]
# ## One cache for every tower
# Language hooks have HookedTransformer's names; the vision tower and projector are prefixed.

# %%
logits, cache = model.run_with_cache(inputs)
for name in ["hook_embed", "blocks.0.attn.hook_pattern", "vision.hook_embed",
             "vision.blocks.0.attn.hook_pattern", "projector.hook_out"]:
    print(f"{name:40s} {tuple(cache[name].shape)}")

# hook_embed holds the image features at image positions; the two halves add up exactly.
assert torch.equal(cache["hook_text_embed"] + cache["hook_image_embed"], cache["hook_embed"])

# %% [markdown]
# ## Hooks: ablate a vision head, see the answer move

# %%
def ablate_head(z, hook, head=0):
    z[:, :, head] = 0.0
    return z

answer = logits[0, -1].argmax()
ablated = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.0.attn.hook_z", ablate_head)])
print("answer logit", logits[0, -1, answer].item(), "-> after ablating vision L0H0", ablated[0, -1, answer].item())

# %% [markdown]
# ## Weights in TransformerLens' layout

# %%
print("W_Q", tuple(model.W_Q.shape), "| vision W_Q", tuple(model.vision.W_Q.shape))
print("OV circuit of language L0H0:", model.OV[0, 0])

# %% [markdown]
# ## Generate

# %%
tokens = model.generate(inputs, max_new_tokens=8)
print(model.to_string(tokens[0, inputs.shape[1]:]))
