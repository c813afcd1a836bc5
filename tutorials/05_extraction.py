# %% [markdown]
# # Extracting activations to SQLite, and reading them back the VLM-Lens way
#
# For analyses over thousands of images you do not want a model in the loop: extract the activations once, then
# probe, cluster and plot from a file. `tl-vlm extract` does this from a YAML config with VLM-Lens's keys into an
# SQLite file with VLM-Lens's `tensors` table, so VLM-Lens notebooks and scripts read it unchanged. Extraction is
# batched, and resumable: a rerun of the same config only does the samples that are not stored yet.
#
# Runs offline in seconds on the toy LLaVA shipped with tl_vlm; change `MODEL` and `DEVICE` for a real checkpoint.
# This file is a jupytext notebook (`jupytext --to ipynb`); the tests run it as a script.

# %%
MODEL = "tl-vlm/toy-llava"  # or "llava-hf/llava-1.5-7b-hf"
DEVICE = "cpu"  # or "cuda"

import io
import json
import shlex
import sqlite3
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
import yaml
from PIL import Image
from threadpoolctl import threadpool_limits

from tl_vlm import HookedVLM
from tl_vlm.analysis.geometry import pca
from tl_vlm.analysis.probing import probe, store_features
from tl_vlm.cli import main as tl_vlm_cli
from tl_vlm.store import ExtractConfig, extract, load
from tl_vlm import format_prompt
from tl_vlm.store.io import from_blob
from tl_vlm.zoo.data import COLOURS, make_examples
from tl_vlm.zoo.toys import TOYS

TOY = MODEL in TOYS
if TOY:  # a toy and its probes are too small to gain from threads
    torch.set_num_threads(1)
    threadpool_limits(1)
DTYPE = "float32" if DEVICE == "cpu" else "float16"
PER_COLOUR = 8  # images per shape colour
WORK = Path(tempfile.mkdtemp(prefix="tl_vlm_extraction_"))
pd.set_option("display.width", 140)
pd.set_option("display.max_colwidth", 40)

model = HookedVLM.from_pretrained(MODEL, device=DEVICE, dtype=getattr(torch, DTYPE))
print(model.vlm_cfg.architecture, "| work folder:", WORK)

# %% [markdown]
# ## Which hooks, with which shapes?
# `tl-vlm hooks MODEL --shapes` runs a generated image through the model and prints every hook's activation shape
# (`--filter` takes a regular expression). Here: the output of every vision block, the projector and every language
# block. Called in-process through `tl_vlm.cli.main`, the same as the shell command printed first. The command
# loads its own copy of the model (float32, no `--device` / `--dtype` option): for a 7B model run it in a shell.

# %%
HOOKS = [r"vision\.blocks\.\d+\.hook_resid_post", r"projector\.hook_out", r"blocks\.\d+\.hook_resid_post"]
command = ["hooks", MODEL, "--shapes", "--filter", "^(" + "|".join(HOOKS) + ")$"]
print("$", shlex.join(["tl-vlm", *command]))
tl_vlm_cli(command)

# %% [markdown]
# ## A dataset on disk
# VLM-Lens reads a table with one row per sample (`id`, `prompt`, `label`, and `image_path` or `image`), images in a
# folder. We
# draw single shapes, the same number per colour, ask each for its colour, and keep the true colour as the label.

# %%
examples, seen = [], {}
for ex in make_examples(40 * PER_COLOUR * len(COLOURS), seed=5, kinds=("colour",)):
    if seen.get(ex.answer, 0) < PER_COLOUR:
        seen[ex.answer] = seen.get(ex.answer, 0) + 1
        examples.append(ex)
assert len(examples) == PER_COLOUR * len(COLOURS)

(WORK / "images").mkdir()
rows = []
for i, ex in enumerate(examples):
    ex.image.save(WORK / "images" / f"{i:04d}.png")
    rows.append({"id": i, "prompt": ex.question, "image_path": f"{i:04d}.png", "label": ex.answer})
table = pd.DataFrame(rows)
print(table.head(3).to_string(index=False), f"\n... {len(table)} rows")

fig, axes = plt.subplots(1, 6, figsize=(9, 1.8))
for ax, ex in zip(axes, examples):
    ax.imshow(ex.image)
    ax.set_title(ex.answer, fontsize=9)
    ax.set_axis_off()
plt.show()

# %% [markdown]
# ## The config
# VLM-Lens's keys: `architecture`, `model_path`, `model` (from_pretrained kwargs) and `dataset` (both as VLM-Lens's
# lists of one-key mappings; plain mappings work too), `output_db`, `pooling_method`, `modules` (regular expressions over hook names, here tl_vlm's
# hook names rather than HF module paths). `image_mean` pools language activations over the image-token positions only
# and vision activations over all patches, so each row is one `[1, d_model]` vector. tl_vlm adds `batch_size` and
# `device`. `architecture` is only recorded in the rows; tl_vlm reads the real one from the checkpoint.

# %%
DB = WORK / "activations.db"
config = {
    "architecture": model.vlm_cfg.family,
    "model_path": MODEL,
    "model": [{"torch_dtype": DTYPE}],
    "output_db": str(DB),
    "dataset": [{"local_dataset_path": str(WORK / "data.csv")}, {"image_dataset_path": str(WORK / "images")}],
    "pooling_method": "image_mean",
    "modules": HOOKS,
    "batch_size": 16,
    "device": DEVICE,
}
CONFIG = WORK / "extract.yaml"
CONFIG.write_text(yaml.safe_dump(config, sort_keys=False))
print(CONFIG.read_text())

# %% [markdown]
# ## Extract, stop, resume
# First as if a run had stopped after two thirds of the data: the table on disk holds only those rows, and we run the
# command line tool. Then the full table, through the Python API: the stored samples are skipped and only the rest is
# extracted. A third run finds nothing to do. A batch's rows and its samples' "done" marks are written in one
# transaction, so a run killed at any point leaves only whole batches behind and resumes the same way
# (`tests/test_store.py` kills runs mid-batch to check this).

# %%
first = 2 * len(table) // 3
table.iloc[:first].to_csv(WORK / "data.csv", index=False)
assert tl_vlm_cli(["extract", str(CONFIG)]) == 0

table.to_csv(WORK / "data.csv", index=False)
resumed = extract(ExtractConfig.from_yaml(CONFIG), progress=False)
again = extract(ExtractConfig.from_yaml(CONFIG), progress=False)
print("resumed run:", resumed, "| third run:", again)
assert resumed == {"done": len(table) - first, "skipped": first, "failed": 0}
assert again == {"done": 0, "skipped": len(table), "failed": 0}

# %% [markdown]
# ## Reading it back as VLM-Lens does
# Plain `sqlite3` + pandas, one `torch.load` per BLOB, exactly as VLM-Lens's database notebook. One row per
# (sample, hook); after three runs there is still exactly one of each.

# %%
conn = sqlite3.connect(DB)
print("columns:", [r[1] for r in conn.execute("PRAGMA table_info(tensors)")])
frame = pd.read_sql("SELECT * FROM tensors", conn)
conn.close()
frame["tensor"] = [torch.load(io.BytesIO(blob)) for blob in frame["tensor"]]
print(frame.drop(columns=["tensor", "timestamp"]).head(3).to_string(index=False))

layers = list(dict.fromkeys(frame["layer"]))
print(len(frame), "rows =", len(table), "samples x", len(layers), "hooks:", layers)
assert len(frame) == len(table) * len(layers)
assert frame.groupby(["image_id", "layer"]).size().max() == 1  # resuming wrote no duplicates
assert all(t.shape == (1, d) for t, d in zip(frame["tensor"], frame["tensor_dim"]))

# %% [markdown]
# ## ... and with tl_vlm's reader
# `tl_vlm.store.load` returns the same rows, decoding the BLOBs with `weights_only` loading: a database is untrusted
# input, and a BLOB holding anything but a tensor is refused instead of unpickled. `stack=True` gives one
# `[sample, d]` tensor per hook. The side tables record the run (model, hooks, pooling, full config).

# %%
ours = load(DB)
assert ours["id"].tolist() == frame["id"].tolist()
assert all(torch.equal(a, b) for a, b in zip(ours["tensor"], frame["tensor"]))
stacked = load(DB, stack=True)
print({layer: tuple(t.shape) for layer, t in stacked.items()})

run = pd.read_sql("SELECT run_id, model, pooling, hooks, created FROM runs", sqlite3.connect(DB))
run["hooks"] = [f"{len(json.loads(h))} hooks" for h in run["hooks"]]
print(run.to_string(index=False))

buffer = io.BytesIO()
torch.save({"not": "a tensor"}, buffer)
try:
    from_blob(buffer.getvalue())
except ValueError as err:
    print("refused:", err)

# %% [markdown]
# ## A stored row equals `run_with_cache`
# Load one sample's image from disk, run it through the model with its prompt, pool the cache the way the config
# says (image positions for the language tower, all patches for the vision tower), and compare with every stored
# row of that sample.

# %%
sample = frame[frame["image_id"] == 0]
image = Image.open(sample["image_path"].iloc[0]).convert("RGB")
inputs = model.prepare(images=image, text=format_prompt(model.processor, sample["prompt"].iloc[0]))
_, cache = model.run_with_cache(inputs, names_filter=layers)
at_image = model.image_token_mask(inputs.input_ids)[0]
worst = 0.0  # largest |stored - recomputed| / (1 + |recomputed|)
for row in sample.itertuples():
    act = cache[row.layer][0].float()
    expected = act[at_image].mean(0) if row.layer.startswith("blocks.") else act.mean(0)
    worst = max(worst, ((row.tensor[0].float() - expected).abs() / (1 + expected.abs())).max().item())
print(f"largest difference over {len(sample)} hooks: {worst:.2e}")
assert worst < (1e-4 if DTYPE == "float32" else 5e-2)  # float16 runs differ with the batch they ran in

# %% [markdown]
# ## A first analysis from the file: where is colour?
# No model needed from here on. PCA of the stored vectors of the last vision block, the projector and the last
# language block, each point coloured by the shape's true colour; then a linear probe for the colour at every stored
# hook (`store_features` turns rows into features, labels come from the `label` column), with its shuffled-label
# control.

# %%
last = lambda prefix: [layer for layer in layers if layer.startswith(prefix)][-1]  # noqa: E731
shown = [last("vision."), "projector.hook_out", last("blocks.")]
fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6))
for ax, layer in zip(axes, shown):
    features, rows_of = store_features(frame, layer)
    coords, explained = pca(features)
    ax.scatter(coords["pc1"], coords["pc2"], c=[np.array(COLOURS[c]) / 255 for c in rows_of["label"]],
               edgecolors="k", linewidths=0.5, s=30)
    ax.set_title(f"{layer}\nPC1+PC2 explain {explained.sum():.0%}", fontsize=9)
    ax.set_xlabel("pc1")
    ax.set_ylabel("pc2")
plt.show()

results = []
for layer in layers:
    features, rows_of = store_features(frame, layer)
    result = probe(features, rows_of["label"].tolist(), folds=3, grid={"logisticregression__C": [0.1, 1.0]})
    results.append({"layer": layer, "accuracy": result.accuracy, "control": result.control_accuracy,
                    "selectivity": result.selectivity, "p_value": result.p_value, "n_test": result.n_test})
print(pd.DataFrame(results).round(3).to_string(index=False))
print("chance:", f"{1 / len(COLOURS):.3f}")
