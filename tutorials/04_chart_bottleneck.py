# %% [markdown]
# # A chart "perception bottleneck" study, in miniature
#
# When a VLM misreads a chart, is the number missing from what its vision tower sees, or is it there and lost
# (or left unused) on the way to the answer? The recipe: ask the model one question about many charts, score its
# answers, then train linear probes for the right answer on pooled activations of **every** layer of every tower
# (vision blocks, projector, language blocks). Each probe gets a control: the same probe on shuffled labels, so
# *selectivity* = accuracy - control accuracy says how much of the probe's accuracy comes from the activations
# and not from the probe. Where the probe beats the model's own answers, the information is present but the model
# does not use it.
#
# Runs offline in seconds on the toy LLaVA shipped with tl_vlm (trained on synthetic shapes and bar charts).
# For a real checkpoint change `MODEL` and `DEVICE` below; the rest follows (more charts, the full probe grid).
# This file is a jupytext notebook (`jupytext --to ipynb`); the tests run it as a script.

# %%
MODEL = "tl-vlm/toy-llava"  # or "llava-hf/llava-1.5-7b-hf"
DEVICE = "cpu"  # or "cuda"
SECOND_MODEL = "tl-vlm/toy-qwen2-vl"  # the same study on a second family, or None; e.g. "Qwen/Qwen2-VL-2B-Instruct"

import dataclasses
import sys
import tempfile
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # run as a script (as the tests do): draw off-screen, never block
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from tl_vlm import HookedVLM
from tl_vlm.analysis.probing import answer_accuracy, layer_sweep, two_proportion_z_test
from tl_vlm.analysis.viz import layer_sweep_plot
from tl_vlm import format_prompt
from tl_vlm.zoo.data import QUESTIONS, make_examples
from tl_vlm.zoo.toys import TOYS

TOY = MODEL in TOYS
if TOY:  # a toy and its probes are too small to gain from threads (on a busy CPU they cost several times over)
    torch.set_num_threads(1)
    threadpool_limits(1)
DTYPE = torch.float32 if DEVICE == "cpu" else torch.float16  # probe features are cast to float32
ANSWER_HINT = "" if TOY else " Answer with a single number."  # real chat models otherwise answer in sentences
COLOUR = "red"  # every chart asks for the value of this bar
N_CHARTS = 160 if TOY else 600
SEED = 99  # not a seed the toys were trained on
BATCH = 32 if TOY else 8
# The toolkit's default search (5 folds x C in {0.01, 0.1, 1, 10}) for real runs; a smaller one keeps the toy fast.
PROBE = dict(kind="linear", folds=3, grid={"logisticregression__C": [0.1, 1.0]}) if TOY else dict(kind="linear")
FIGURES = Path(tempfile.mkdtemp(prefix="chart_bottleneck_"))
pd.set_option("display.width", 140)

model = HookedVLM.from_pretrained(MODEL, device=DEVICE, dtype=DTYPE)
print(model.vlm_cfg.architecture, "| vision:", model.vision.cfg.n_layers, "layers | language:", model.cfg.n_layers,
      "layers")

# %% [markdown]
# ## The charts and the question
# `make_examples` draws bar charts with 3-4 bars of distinct colours and values 1-5. We keep the charts that have a
# bar of `COLOUR` and ask every one of them for that bar's value, so the label depends on the image alone: a probe on
# the vision tower (which never sees the question) is asked for the same thing as the language tower.

# %%
def charts_with(colour: str, n: int, seed: int) -> list:
    """n bar charts that contain a `colour` bar, each asking for that bar's value."""
    question = QUESTIONS["bar_value"].format(colour=colour)
    picked = []
    for ex in make_examples(6 * n, seed=seed, kinds=("bar_value",)):
        values = {bar["colour"]: bar["value"] for bar in ex.objects}
        if colour in values:
            picked.append(dataclasses.replace(ex, question=question, answer=str(values[colour])))
    return picked[:n]


charts = charts_with(COLOUR, N_CHARTS, SEED)
assert len(charts) == N_CHARTS
labels = [int(ex.answer) for ex in charts]
print("question:", repr(charts[0].question), "| charts per value:",
      dict(sorted(pd.Series(labels).value_counts().items())))


def batches_for(model, examples) -> list:
    """VLMInputs in batches, each chart with its question through the model's own prompt format."""
    out = []
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        prompts = [format_prompt(model.processor, ex.question + ANSWER_HINT) for ex in chunk]
        out.append(model.prepare(images=[ex.image for ex in chunk], text=prompts, padding_side="left"))  # for generate
    return out


inputs = batches_for(model, charts)
assert sum(b.input_ids.shape[0] for b in inputs) == N_CHARTS
print("prompt:", repr(format_prompt(model.processor, charts[0].question + ANSWER_HINT)))

# %% [markdown]
# ## How well does the model answer?
# Greedy generation, scored on the first word of the reply; `answer_accuracy` is the toolkit's version of the same
# measure (whole words, so a tokenizer that splits " 3" into a space token and a digit does not blur the numbers).

# %%
def generated_answers(model, batches, max_new_tokens: int = 4) -> list[str]:
    replies = []
    with torch.no_grad():
        for batch in batches:
            tokens = model.generate(batch, max_new_tokens=max_new_tokens)
            replies += model.tokenizer.batch_decode(tokens[:, batch.shape[1] :], skip_special_tokens=True)
    return replies


def first_word(reply: str) -> str:
    words = reply.strip().split()
    return words[0].strip(".,:;!").lower() if words else ""


def answer_scores(model, examples, batches) -> dict:
    replies = generated_answers(model, batches)
    correct = [first_word(r) == ex.answer for r, ex in zip(replies, examples)]
    return {
        "replies": replies,
        "generated": float(np.mean(correct)),
        "answer_accuracy": answer_accuracy(model, batches, [ex.answer for ex in examples]),
        "n": len(examples),
    }


scores = answer_scores(model, charts, inputs)
print(f"answer accuracy (generated, first word): {scores['generated']:.3f} on {scores['n']} charts")
print(f"answer_accuracy (toolkit):               {scores['answer_accuracy']:.3f}")
print("chance (most frequent value):           ", f"{pd.Series(labels).value_counts(normalize=True).max():.3f}")

fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
for ax, ex, reply in zip(axes, charts, scores["replies"]):
    ax.imshow(ex.image)
    ax.set_title(f"{COLOUR} = {ex.answer}, model: {first_word(reply) or '-'}", fontsize=9)
    ax.set_axis_off()
plt.show()

# %% [markdown]
# ## Probe every layer of every tower
# `layer_sweep` pools each hook per chart (vision and projector: mean over the image's patches / tokens; language:
# the last prompt position, where the answer is produced), then for each hook runs a cross-validated logistic
# regression on a stratified 75/25 split and the same search on shuffled labels. `p_value` tests probe vs control
# accuracy on the held-out charts.

# %%
sweep = layer_sweep(model, inputs, labels, **PROBE)
columns = ["tower", "layer", "hook", "accuracy", "control_accuracy", "selectivity", "p_value"]
print(sweep[columns].round(3).to_string(index=False))
assert (sweep["tower"] == "vision").sum() == model.vision.cfg.n_layers  # one row per vision block
assert (sweep["tower"] == "language").sum() == model.cfg.n_layers  # and per language block
assert sweep["n_test"].nunique() == 1  # every hook probed on the same held-out charts

# %% [markdown]
# ## Probe accuracy along the towers vs. the model's answers
# Solid: probe accuracy per hook, dashed: its shuffled-label control, dotted: how often the model's generated answer
# is right. Grey lines separate the towers.

# %%
def show_png(paths):
    fig, axes = plt.subplots(1, len(paths), figsize=(6 * len(paths), 4))
    for ax, path in zip(np.atleast_1d(axes), paths):
        ax.imshow(plt.imread(path))
        ax.set_axis_off()
    plt.show()


plot = layer_sweep_plot(sweep, FIGURES / "sweep.png", answer_accuracy=scores["generated"],
                        title=f"{MODEL}: value of the {COLOUR} bar")
show_png([plot])

# %% [markdown]
# ## What the numbers say
# The comparison that matters: the best vision-tower probe against the model's answers (a two-proportion z-test,
# probe on its held-out charts, answers on all charts), and the last language layer's probe against the answers.
# The verdict below is picked by these tests, not written in advance.

# %%
def verdict(sweep: pd.DataFrame, scores: dict, alpha: float = 0.05) -> str:
    vision = sweep[sweep["tower"] == "vision"]
    best = vision.loc[vision["accuracy"].idxmax()]
    last = sweep.iloc[-1]
    answer, n = scores["generated"], scores["n"]
    z, p = two_proportion_z_test(best["accuracy"], int(best["n_test"]), answer, n)
    z_last, p_last = two_proportion_z_test(last["accuracy"], int(last["n_test"]), answer, n)
    lines = [
        f"best vision probe: {best['hook']} accuracy {best['accuracy']:.3f} (control {best['control_accuracy']:.3f}, "
        f"selectivity {best['selectivity']:.3f}, p={best['p_value']:.2g})",
        f"last language layer probe: {last['hook']} accuracy {last['accuracy']:.3f} "
        f"(control {last['control_accuracy']:.3f})",
        f"model answers: {answer:.3f}; best vision probe vs answers z={z:.2f} p={p:.2g}; "
        f"last language probe vs answers z={z_last:.2f} p={p_last:.2g}",
    ]
    if best["p_value"] >= alpha:
        lines.append("-> the value is not linearly decodable above control from pooled vision features: "
                     "the probe finds no perceptual evidence to lose downstream.")
    elif z > 0 and p < alpha:
        where = ("the last language position still beats the answers too, so the model holds the value where it "
                 "answers but does not read it out" if z_last > 0 and p_last < alpha else
                 "at the last language position the probe is not significantly better than the answers, so the value "
                 "is lost between the vision tower and the answer (or too little of it is left for this many charts)")
        lines.append(f"-> bottleneck after perception: the vision tower encodes the value better than the model "
                     f"answers; {where}.")
    elif z < 0 and p < alpha:
        lines.append("-> the model answers better than a linear probe on mean-pooled vision features: the probe is "
                     "only a lower bound on what the vision tower holds (the model reads every patch, the probe their "
                     "mean); no bottleneck shown.")
    else:
        lines.append("-> no significant gap between what the vision tower encodes (linearly, pooled) and the "
                     "model's answers at this sample size.")
    return "\n".join(lines)


print(verdict(sweep, scores))

# %% [markdown]
# ## The same study on a second family
# Same charts, same question, same probes on another architecture. Comparing the two verdicts separates "charts
# are hard to see" (both vision towers fail) from "this model loses what it sees".

# %%
if SECOND_MODEL is not None:
    del model
    second = HookedVLM.from_pretrained(SECOND_MODEL, device=DEVICE, dtype=DTYPE)
    second_inputs = batches_for(second, charts)
    second_scores = answer_scores(second, charts, second_inputs)
    second_sweep = layer_sweep(second, second_inputs, labels, **PROBE)
    print(second_sweep[columns].round(3).to_string(index=False))
    print(verdict(second_sweep, second_scores))
    second_plot = layer_sweep_plot(second_sweep, FIGURES / "sweep_second.png",
                                   answer_accuracy=second_scores["generated"],
                                   title=f"{SECOND_MODEL}: value of the {COLOUR} bar")
    show_png([plot, second_plot])
    print("figures in", FIGURES)
