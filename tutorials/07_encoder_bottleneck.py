# %% [markdown]
# # The two bottlenecks: what the encoder tells apart, and what the VLM makes of it
#
# Tutorial 04 probes where a VLM loses information its vision encoder holds (the *extraction* bottleneck). This one
# measures the first half of the chart-perception study: what the vision encoder itself can tell apart (the
# *encoder* bottleneck), with image-text retrieval on hard negatives, then improves it with hard-negative
# contrastive tuning (NegCLIP), swaps the tuned encoder back into the VLM and retrains only the projector.
#
# On the toys: `tl-vlm/toy-clip` is a text twin of the toy LLaVA's own encoder (its vision tower *is* that encoder;
# a CLIP text tower was trained against it, `python -m tl_vlm.zoo.toy_clip`). For real models, take the VLM's encoder
# and its CLIP twin (LLaVA-1.5 and `openai/clip-vit-large-patch14-336`) and run the same cells with more data and
# steps. This file is a jupytext notebook; the tests run it as a script in about a minute.

# %%
MODEL, TWIN = "tl-vlm/toy-llava", "tl-vlm/toy-clip"
TUNE_STEPS, PROJECTOR_STEPS = 30, 40  # a real run: thousands

import copy
import dataclasses
import tempfile

import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from tl_vlm import HookedCLIP, HookedVLM, format_prompt
from tl_vlm.analysis.probing import answer_accuracy, layer_sweep
from tl_vlm.analysis.retrieval import evaluate
from tl_vlm.tuning.negclip import tune_negclip
from tl_vlm.tuning.swap import train_projector, with_vision_encoder
from tl_vlm.zoo.data import QUESTIONS, make_examples

torch.set_num_threads(1)  # toys gain nothing from threads
threadpool_limits(1)
pd.set_option("display.width", 140)
vlm = HookedVLM.from_pretrained(MODEL)
twin = HookedCLIP.from_pretrained(TWIN)
probe = vlm.processor.image_processor(make_examples(1, 0)[0].image, return_tensors="pt").pixel_values
with torch.no_grad():  # the twin's ViT is the VLM's encoder, weight for weight
    assert torch.equal(vlm.vision(probe, keep=[4])[4], twin.vision(probe, keep=[4])[4])

# %% [markdown]
# ## 1. The encoder bottleneck: retrieval with hard negatives
# Each image's caption against the same caption with one fact swapped: a colour, a shape, a position, a bar's value,
# or the two sides of "the A bar is higher than the B bar". Chance is 0.5; a swap type near chance is a distinction
# the encoder (with its text twin) does not make.

# %%
KINDS = ("colour", "shape", "position", "bar_value", "highest_bar")
held_out = make_examples(150, seed=99, kinds=KINDS)  # seeds the toys never trained on
before = evaluate(twin, held_out)
print(before.to_string(index=False))

# %% [markdown]
# ## 2. Hard-negative tuning (NegCLIP)
# Batches of images with their captions and one hard negative each, drawn from charts here (where the toy is weakest).
# The loss: image-to-text cross-entropy over captions *and* negatives, text-to-image over the captions. Checkpoints
# go to a folder every 10 steps, so an interrupted run resumes where it stopped; `save_pretrained` writes a HF
# checkpoint.

# %%
tuned = copy.deepcopy(twin)
work = tempfile.mkdtemp(prefix="negclip_")
tune_negclip(tuned, TUNE_STEPS, work, batch_size=32, lr=3e-4, save_every=10, kinds=("bar_value", "highest_bar"),
             progress=False)
after = evaluate(tuned, held_out)
comparison = before.rename(columns={"value": "before"}).assign(after=after["value"].values)
print(comparison.to_string(index=False))
tuned.save_pretrained(f"{work}/tuned")

# %% [markdown]
# ## 3. The extraction bottleneck, before and after the swap
# The tuned vision tower goes into a copy of the VLM (`with_vision_encoder`); the projector alone is retrained on the
# toy task (encoder and language model frozen, as LLaVA's first stage). Then, on charts that ask for one bar's value:
# linear probes for the value on every vision layer (what the encoder holds) and the VLM's answer accuracy (what
# reaches the answer), before and after.

# %%
swapped = with_vision_encoder(vlm, tuned)
losses = train_projector(swapped, PROJECTOR_STEPS, batch_size=16, lr=1e-3, progress=False)
print(f"projector loss: {losses[0]:.3f} -> {losses[-1]:.3f}")


def red_bar_charts(n: int, seed: int) -> list:
    question = QUESTIONS["bar_value"].format(colour="red")
    picked = []
    for ex in make_examples(6 * n, seed=seed, kinds=("bar_value",)):
        values = {bar["colour"]: bar["value"] for bar in ex.objects}
        if "red" in values:
            picked.append(dataclasses.replace(ex, question=question, answer=str(values["red"])))
    return picked[:n]


charts = red_bar_charts(80, seed=98)
batches = [vlm.prepare(images=[ex.image for ex in charts[i:i + 40]],
                       text=[format_prompt(vlm.processor, ex.question) for ex in charts[i:i + 40]], padding_side="left")
           for i in range(0, len(charts), 40)]
labels = [int(ex.answer) for ex in charts]
hooks = [f"vision.blocks.{i}.hook_resid_post" for i in range(vlm.vision.cfg.n_layers)]
probe_kwargs = dict(kind="linear", folds=3, grid={"logisticregression__C": [1.0]})
rows = []
for name, model in (("original", vlm), ("tuned encoder", swapped)):
    sweep = layer_sweep(model, batches, labels, hooks=hooks, **probe_kwargs)
    accuracy = answer_accuracy(model, batches, [ex.answer for ex in charts])
    rows.append({"model": name, "answer accuracy": accuracy,
                 **{f"probe L{i}": round(a, 3) for i, a in enumerate(sweep["accuracy"])}})
print(pd.DataFrame(rows).to_string(index=False))

# %% [markdown]
# Reading the table: probes at or near 1 with answers far below say the information is in the encoder and lost on
# the way (extraction); swap types near 0.5 in section 1 say the encoder never separated them (encoder). With the
# toy's few tuning steps the numbers move little; the recipe is the point, and it runs unchanged on real checkpoints.
