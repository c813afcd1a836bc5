"""VLM-Lens's configs and commands run unchanged: ``tl-vlm extract -c cfg.yaml`` with its flags, its current
dataset keys (a text dataset joined to an image folder), ``pooled_output`` and HF module names; the DB holds the
names the config asked for, read the way VLM-Lens's notebooks read it."""

from __future__ import annotations

import io
import sqlite3

import datasets
import pandas as pd
import pytest
import torch
import yaml

from tl_vlm.cli import main
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo.data import sample_images

LLAVA_MODULES = [  # as VLM-Lens's llava configs write them (transformers < 4.52)
    "language_model.model.layers.1",
    "language_model.model.layers.1.post_attention_layernorm",
    "vision_tower.vision_model.encoder.layers.1",
    "multi_modal_projector",
    "language_model.lm_head",
]


@pytest.fixture(scope="module")
def clevr_like(tmp_path_factory):
    """VLM-Lens's CLEVR layout: a text dataset with a ``color`` split (several questions per image) saved locally,
    and the images under ``images/val``."""
    root = tmp_path_factory.mktemp("clevr")
    (root / "images" / "val").mkdir(parents=True)
    rows = []
    for i, image in enumerate(sample_images(3, seed=4)):
        name = f"CLEVR_val_{i:06d}.png"
        image.save(root / "images" / "val" / name)
        rows += [{"image_filename": name, "Q": q, "A": image.info["colour"]} for q in ("What colour?", "Is it red?")]
    datasets.DatasetDict({"color": datasets.Dataset.from_pandas(pd.DataFrame(rows))}).save_to_disk(str(root / "text"))
    return root


def vlm_lens_config(path, root, model_path, **changes) -> str:
    """A config in VLM-Lens's current form (its configs/models/*/clevr/*.yaml), unchanged but for the paths."""
    config = {
        "architecture": "llava",
        "model_path": str(model_path),
        "dataset": [
            {"text_dataset_path": str(root / "text")},
            {"image_dataset_path": str(root / "images")},
            {"text_split": "color"},
            {"image_split": "val"},
            {"prompt_column": "Q"},
            {"label_column": "A"},
            {"image_column": "image_filename"},
        ],
        "output_db": str(path.parent / "llava_color.db"),
        "pooled_output": True,
        "modules": LLAVA_MODULES,
        **changes,
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def read_like_vlm_lens(db) -> pd.DataFrame:
    conn = sqlite3.connect(db)
    frame = pd.read_sql("SELECT layer, tensor, label, image_id, image_path, prompt, pooling_method, tensor_dim, "
                        "architecture FROM tensors", conn)
    conn.close()
    frame["tensor"] = [torch.load(io.BytesIO(blob)) for blob in frame["tensor"]]
    return frame


def test_unchanged_vlm_lens_config_runs(clevr_like, checkpoints, llava15, tmp_path):
    cfg = vlm_lens_config(tmp_path / "color.yaml", clevr_like, checkpoints["llava15"])
    assert main(["extract", "-c", cfg, "--device", "cpu"]) == 0
    frame = read_like_vlm_lens(tmp_path / "llava_color.db")
    assert len(frame) == 6 * len(LLAVA_MODULES) and list(frame["layer"].unique()) == LLAVA_MODULES
    assert set(frame["pooling_method"]) == {"mean"} and set(frame["architecture"]) == {"llava"}
    assert frame["image_id"].iloc[0] == "CLEVR_val_000000.png" and frame["prompt"].iloc[1] == "What colour?"
    model = llava15.model
    images = sample_images(3, seed=4)
    targets = {"language_model.model.layers.1": "blocks.1.hook_resid_post",
               "vision_tower.vision_model.encoder.layers.1": "vision.blocks.1.hook_resid_post",
               "multi_modal_projector": "projector.hook_out"}
    for row in frame[frame["layer"].isin(list(targets))].itertuples():
        image = images[int(row.image_id[-10:-4])]
        inputs = model.prepare(images=image, text=format_prompt(model.processor, row.prompt))
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=targets[row.layer])
        expected = cache[targets[row.layer]].mean(1)  # VLM-Lens's pooled_output: the mean over dim 1
        assert row.tensor.shape == expected.shape and row.tensor_dim == expected.shape[-1]
        assert torch.allclose(row.tensor, expected, atol=1e-5), row.layer
        assert row.label == image.info["colour"]
    logits = frame[frame["layer"] == "language_model.lm_head"]["tensor"].iloc[0]
    assert logits.shape == (1, model.cfg.d_vocab)
    # a rerun resumes: nothing left to do
    assert main(["extract", cfg, "--device", "cpu"]) == 0
    assert len(read_like_vlm_lens(tmp_path / "llava_color.db")) == len(frame)


def test_flags_override_the_config(checkpoints, tmp_path, capsys):
    """VLM-Lens's README form: input_dir + prompt, ``pooling_method: None``; -m / -i / -o / -a as its flags."""
    images = tmp_path / "imgs"
    images.mkdir()
    for i, image in enumerate(sample_images(2, seed=9)):
        image.save(images / f"{i}.png")
    cfg = tmp_path / "qwen.yaml"
    cfg.write_text(yaml.safe_dump({
        "architecture": "qwen", "model_path": "Qwen/Qwen2-VL-2B-Instruct", "model": [{"torch_dtype": "auto"}],
        "output_db": "output/qwen.db", "input_dir": "./data/", "prompt": "Describe the color in this image in one word.",
        "pooling_method": "None", "modules": ["lm_head", "visual.blocks.1"],
    }))
    db = tmp_path / "q.db"
    args = ["extract", "-c", str(cfg), "-m", str(checkpoints["qwen2_vl"]), "-i", str(images), "-o", str(db),
            "-a", "qwen", "--device", "cpu"]
    assert main(args) == 0
    frame = read_like_vlm_lens(db)
    assert sorted(frame["layer"].unique()) == ["lm_head", "visual.blocks.1"] and set(frame["architecture"]) == {"qwen"}
    logits = frame[frame["layer"] == "lm_head"]["tensor"].iloc[0]
    assert logits.ndim == 3 and logits.shape[0] == 1  # unpooled [1, pos, vocab], as VLM-Lens stores a module output


def test_hub_dataset_is_refused_with_what_to_do(clevr_like, checkpoints, tmp_path, capsys):
    cfg = vlm_lens_config(tmp_path / "hub.yaml", clevr_like, checkpoints["llava15"])
    raw = yaml.safe_load(open(cfg))
    raw["dataset"][0] = {"text_dataset_path": "compling/CLEVR_val_categories"}
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(raw))
    assert main(["extract", "-c", cfg]) == 2
    err = capsys.readouterr().err
    assert "local datasets only" in err and "save_to_disk" in err


def test_rows_without_their_image_are_an_error(clevr_like, checkpoints, tmp_path, capsys):
    cfg = vlm_lens_config(tmp_path / "regex.yaml", clevr_like, checkpoints["llava15"])
    raw = yaml.safe_load(open(cfg))
    raw["dataset"].append({"image_regex": "{id}.jpg"})
    (tmp_path / "regex.yaml").write_text(yaml.safe_dump(raw))
    assert main(["extract", "-c", cfg]) == 2
    assert "6 rows name images not in" in capsys.readouterr().err


def test_unmapped_module_and_download_path_are_refused(clevr_like, checkpoints, tmp_path, capsys):
    cfg = vlm_lens_config(tmp_path / "qproj.yaml", clevr_like, checkpoints["llava15"],
                          modules=["language_model.model.layers.1.self_attn.q_proj"])
    assert main(["extract", "-c", cfg]) == 2
    assert "matches no hook name and no HF module" in capsys.readouterr().err
    assert main(["extract", "-c", cfg, "--download-path", "/tmp/x"]) == 2
    assert "never downloads" in capsys.readouterr().err


def test_processed_weights_refuse_hf_names(clevr_like, checkpoints, tmp_path, capsys):
    """Folded norms would give a norm module's output without HF's weight: refused, not stored."""
    cfg = vlm_lens_config(tmp_path / "fold.yaml", clevr_like, checkpoints["llava15"], model=[{"fold_ln": True}])
    assert main(["extract", "-c", cfg]) == 2
    assert "change by design" in capsys.readouterr().err


def test_hf_names_listing(checkpoints, capsys):
    assert main(["hooks", str(checkpoints["llava15"]), "--hf-names", "--filter", r"layers\.1$"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["HF", "module", "older", "transformers", "tl_vlm"]
    assert ["model.language_model.layers.1", "language_model.model.layers.1", "blocks.1.hook_resid_post"] in rows
    assert ["model.vision_tower.encoder.layers.1", "vision_tower.vision_model.encoder.layers.1",
            "vision.blocks.1.hook_resid_post"] in rows
    assert main(["extract", "-l", "-m", str(checkpoints["llava15"])]) == 0  # VLM-Lens's --log-named-modules
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["lm_head", "language_model.lm_head", "unembed", "(module", "output)"] in rows
