"""Activation store: VLM-Lens round trip, pooling, resume after a kill, faults, data-parallel merge."""

from __future__ import annotations

import io
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
import yaml

from tl_vlm.store import ExtractConfig, StoreError, extract, load, merge
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo.data import sample_images

HOOKS = [r"blocks\.\d+\.hook_resid_post", "vision.blocks.0.hook_resid_post"]


def config(dataset, checkpoints, db, **changes) -> ExtractConfig:
    base = dict(model_path=str(checkpoints["llava15"]), output_db=str(db), modules=HOOKS, batch_size=2,
                dataset={"local_dataset_path": str(dataset / "data.csv"), "image_dataset_path": str(dataset / "images")})
    base.update(changes)
    return ExtractConfig(**base)


def vlm_lens_read(db) -> pd.DataFrame:
    """Exactly how VLM-Lens's notebooks read a store."""
    conn = sqlite3.connect(db)
    frame = pd.read_sql("SELECT * FROM tensors", conn)
    conn.close()
    frame["tensor"] = [torch.load(io.BytesIO(blob)) for blob in frame["tensor"]]
    return frame


def test_store_reads_as_vlm_lens_reads_it(dataset, checkpoints, tmp_path):
    db = tmp_path / "out.db"
    counts = extract(config(dataset, checkpoints, db), progress=False)
    assert counts == {"done": 5, "skipped": 0, "failed": 0}
    frame = vlm_lens_read(db)
    assert len(frame) == 5 * 3 and set(frame["layer"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "vision.blocks.0.hook_resid_post"}
    # The tensors equal run_with_cache on every entry: tests/conformance; here, what VLM-Lens reads.
    for row in frame.itertuples():
        assert row.tensor_dim == row.tensor.shape[-1] and row.architecture == "llava"
        assert row.image_path == str(dataset / "images" / f"{row.image_id}.png")
    runs = pd.read_sql("SELECT * FROM runs", sqlite3.connect(db))
    assert len(runs) == 1 and runs.loc[0, "pooling"] == "none"
    stacked = load(db, stack=True)
    assert stacked["vision.blocks.0.hook_resid_post"].shape[0] == 5


@pytest.mark.parametrize("method", ["mean", "max", "last", "image_mean", "text_mean"])
def test_pooling(dataset, checkpoints, llava15, tmp_path, method):
    db = tmp_path / f"{method}.db"
    extract(config(dataset, checkpoints, db, pooling_method=method, modules=["blocks.1.hook_resid_post"], float16=True), progress=False)
    row = load(db).iloc[0]
    assert row["tensor"].dtype == torch.float16 and row["tensor"].shape == (1, llava15.model.cfg.d_model)
    model = llava15.model
    inputs = model.prepare(images=sample_images(5, seed=21)[0], text=format_prompt(model.processor, row["prompt"]))
    _, cache = model.run_with_cache(inputs, names_filter="blocks.1.hook_resid_post")
    act, image = cache["blocks.1.hook_resid_post"][0], model.image_token_mask(inputs.input_ids)[0]
    expected = {"mean": act.mean(0), "max": act.max(0).values, "last": act[-1], "image_mean": act[image].mean(0),
                "text_mean": act[~image].mean(0)}[method]
    assert torch.allclose(row["tensor"][0].float(), expected, atol=2e-2)


def test_resume_after_kill_inside_and_between_batches(dataset, checkpoints, tmp_path):
    db = tmp_path / "killed.db"
    path = tmp_path / "cfg.yaml"
    cfg = config(dataset, checkpoints, db)
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.__dict__.items() if v not in (None, [], {})}))
    for run in (1, 2):  # each run is SIGKILLed in the middle of its 2nd batch's transaction
        script = textwrap.dedent(f"""
            import os, signal, sys
            from tl_vlm.store import ExtractConfig, extract
            ex = sys.modules["tl_vlm.store.extract"]
            original, calls = ex.to_blob, []
            def dying_to_blob(tensor):
                calls.append(1)
                if len(calls) == 6 + 2:  # one batch committed, one row of the next already inserted
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(tensor)
            ex.to_blob = dying_to_blob
            extract(ExtractConfig.from_yaml({str(path)!r}), progress=False)
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True)
        assert result.returncode == -9, (result.stdout, result.stderr[-3000:])
        frame = load(db)
        assert len(frame) == 3 * 2 * run, "only whole batches are visible"
    counts = extract(ExtractConfig.from_yaml(path), progress=False)
    assert counts == {"done": 1, "skipped": 4, "failed": 0}
    frame = load(db)
    assert len(frame) == 15 and frame.groupby(["image_id", "layer"]).size().max() == 1, "no duplicates"
    assert extract(ExtractConfig.from_yaml(path), progress=False)["done"] == 0


def test_bad_image_is_recorded_and_run_goes_on(dataset, checkpoints, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i, image in enumerate(sample_images(2, seed=3)):
        image.save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    db = tmp_path / "errors.db"
    counts = extract(ExtractConfig(model_path=str(checkpoints["llava15"]), output_db=str(db), modules=["blocks.0.hook_resid_post"],
                                   input_dir=str(images), prompt="Describe the image."), progress=False)
    assert counts == {"done": 2, "skipped": 0, "failed": 1}
    errors = pd.read_sql("SELECT * FROM errors", sqlite3.connect(db))
    assert list(errors["sample_key"]) == ["broken.png"] and "UnidentifiedImageError" in errors.loc[0, "reason"]


def test_bad_patterns_files_and_blobs(dataset, checkpoints, tmp_path):
    with pytest.raises(ValueError, match="close names"):
        extract(config(dataset, checkpoints, tmp_path / "x.db", modules=["blocks.0.hook_resid_postt"]), progress=False)
    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("hello")
    with pytest.raises(StoreError, match="not an SQLite"):
        load(not_sqlite)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE people (name TEXT)")
    with pytest.raises(StoreError, match="tensors"):
        load(foreign)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    db = tmp_path / "evil.db"
    extract(config(dataset, checkpoints, db, modules=["blocks.0.hook_resid_post"]), progress=False)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE tensors SET tensor = ? WHERE id = 1", (pickle.dumps(Exploit()),))
    conn.close()
    with pytest.raises(ValueError, match="refused"):
        load(db)


def test_merge_without_duplicates(dataset, checkpoints, tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    extract(config(dataset, checkpoints, a), progress=False)
    extract(config(dataset, checkpoints, b), progress=False)
    target = tmp_path / "merged.db"
    assert merge(target, [a, b]) == 15
    assert merge(target, [a]) == 0
    assert len(load(target)) == 15


def test_torchrun_two_ranks(dataset, checkpoints, tmp_path):
    db = tmp_path / "dp.db"
    path = tmp_path / "dp.yaml"
    cfg = config(dataset, checkpoints, db)
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.__dict__.items() if v not in (None, [], {})}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tl_vlm.cli", "extract", str(path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    frame = load(db)
    assert len(frame) == 15 and frame.groupby(["image_id", "layer"]).size().max() == 1
    assert not list(tmp_path.glob("dp.db.rank*"))


def test_vlm_lens_dataset_list_and_image_path_column(dataset, checkpoints, tmp_path):
    frame = pd.read_csv(dataset / "data.csv").rename(columns={"image": "image_path"})
    frame.to_csv(tmp_path / "vlm_lens.csv", index=False)
    cfg = ExtractConfig(model_path=str(checkpoints["llava15"]), output_db=str(tmp_path / "a.db"),
                        modules=["vision.blocks.0.hook_resid_post"], dataset=[{"local_dataset_path": str(tmp_path / "vlm_lens.csv")},
                          {"image_dataset_path": str(dataset / "images")}])
    assert cfg.dataset == {"local_dataset_path": str(tmp_path / "vlm_lens.csv"), "image_dataset_path": str(dataset / "images")}
    assert extract(cfg, progress=False)["done"] == 5
    assert set(vlm_lens_read(tmp_path / "a.db")["image_path"]) == {str(dataset / "images" / f"{i}.png") for i in range(5)}
