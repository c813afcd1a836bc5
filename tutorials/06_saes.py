# %% [markdown]
# # Sparse autoencoders on a VLM's vision tower, with SAELens
#
# SAELens' SAEs attach to a HookedVLM as they do to a HookedTransformer (`add_sae`, `run_with_saes`,
# `run_with_cache_with_saes`, `reset_saes`), at any hook of any tower. Here we train a tiny SAE on the toy LLaVA's
# vision residual stream with SAELens' own training SAE and loss, splice it into the model, measure what the
# reconstruction costs the answers, and read which patches each feature fires on.
#
# Needs sae-lens (`pip install "tl-vlm[sae]"`, which selects transformer-lens 3.9). Runs offline in seconds on the
# toy; for a real checkpoint change `MODEL` and train on many more images.
# This file is a jupytext notebook (`jupytext --to ipynb`); the tests run it as a script (requires: sae_lens).

# %%
MODEL = "tl-vlm/toy-llava"  # or "llava-hf/llava-1.5-7b-hf"
HOOK = "vision.blocks.1.hook_resid_post"
STEPS, D_SAE = 300, 256

import torch
from sae_lens import StandardSAE, StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata, TrainStepInput

from tl_vlm import HookedVLM
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo import data

torch.manual_seed(0)
torch.set_num_threads(1)  # toy-sized: one thread is fastest on shared cores
model = HookedVLM.from_pretrained(MODEL)

# %% [markdown]
# ## Activations: the vision stream over many scenes (every patch is one training vector)

# %%
examples = data.make_examples(96, seed=5, kinds=("colour", "shape"))
prompts = [format_prompt(model.processor, ex.question) for ex in examples]
inputs = model.prepare(images=[ex.image for ex in examples], text=prompts, padding_side="left")
with torch.no_grad():
    _, cache = model.run_with_cache(inputs, names_filter=HOOK)
acts = cache[HOOK].flatten(0, 1)  # [image * patch, d_model]
print(acts.shape)

# %% [markdown]
# ## Train with SAELens' training SAE (its L1 loss), then keep the inference SAE

# %%
cfg = StandardTrainingSAEConfig(d_in=acts.shape[-1], d_sae=D_SAE, l1_coefficient=0.3,
                                metadata=SAEMetadata(hook_name=HOOK))
trainer = StandardTrainingSAE(cfg)
optimizer = torch.optim.Adam(trainer.parameters(), lr=3e-3)
for step in range(STEPS):
    batch = acts[torch.randint(len(acts), (512,))]
    out = trainer.training_forward_pass(TrainStepInput(
        sae_in=batch, coefficients={"l1": cfg.l1_coefficient}, dead_neuron_mask=None, n_training_steps=step,
        is_logging_step=False))
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
print(f"final loss {out.loss.item():.4f}")

sae = StandardSAE(StandardSAEConfig(d_in=cfg.d_in, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK)))
sae.load_state_dict(trainer.state_dict(), strict=False)
sae.eval()
with torch.no_grad():
    features = sae.encode(acts)
    recon = sae.decode(features)
explained = 1 - (recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
print(f"variance explained {explained:.3f}, mean active features per patch {(features > 0).float().sum(-1).mean():.1f}")

# %% [markdown]
# ## Splice it in: answers with the reconstruction, and with the error term (exactly the model)

# %%
with torch.no_grad():
    clean = model(inputs)[:, -1]
    spliced = model.run_with_saes(inputs, saes=[sae])[:, -1]
    exact, sae_cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True)
agree = (spliced.argmax(-1) == clean.argmax(-1)).float().mean()
print(f"answers kept with the SAE spliced in: {agree:.2f}")
assert torch.allclose(exact[:, -1], clean, atol=1e-4)  # the error term restores the run

# %% [markdown]
# ## What a feature fires on: its activation per patch, over the 8x8 grid of one image

# %%
acts_post = sae_cache[f"{HOOK}.hook_sae_acts_post"]  # [image, patch, d_sae]; patch 0 is CLIP's class token
top = int(acts_post[:, 1:].amax((0, 1)).argmax())
image = int(acts_post[:, 1:, top].amax(1).argmax())
grid = acts_post[image, 1:, top].reshape(8, 8)
print(f"feature {top} on image {image} ({examples[image].answer}):\n{grid.numpy().round(2)}")
model.reset_saes()
