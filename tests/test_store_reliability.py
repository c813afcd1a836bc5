"""Store reliability (issue 17): one writer per file, read-only readers, string ids, edited images, FIFOs,
resuming a torchrun job in one process, and kill-and-resume of merge."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tl_vlm.store import ExtractConfig, StoreError, extract, load, merge
from tl_vlm.store.dataset import to_rgb
from tl_vlm.store.lock import writer_lock
from tl_vlm.zoo.data import sample_images

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(sample_images(3, seed=5)):
        image.save(folder / f"{i}.png")
    return folder


def folder_config(checkpoints, images, db, **changes) -> ExtractConfig:
    return ExtractConfig(model_path=str(checkpoints["llava15"]), output_db=str(db), modules=[HOOK],
                         input_dir=str(images), prompt="Describe the image.", batch_size=2, **changes)


def test_a_second_writer_is_refused_up_front(checkpoints, images, tmp_path):
    db = tmp_path / "busy.db"
    with writer_lock(db):
        with pytest.raises(StoreError, match="in use"):
            extract(folder_config(checkpoints, images, db), progress=False)
        with pytest.raises(StoreError, match="in use"):
            merge(db, [])
    assert extract(folder_config(checkpoints, images, db), progress=False)["done"] == 3  # the lock died with its holder


def test_two_processes_on_one_store_never_duplicate(checkpoints, images, tmp_path):
    db = tmp_path / "two.db"
    script = textwrap.dedent(f"""
        import sys
        from tl_vlm.store import ExtractConfig, StoreError, extract
        try:
            extract(ExtractConfig(model_path={str(checkpoints["llava15"])!r}, output_db={str(db)!r}, modules=[{HOOK!r}],
                                  input_dir={str(images)!r}, prompt="Describe the image.", batch_size=1), progress=False)
        except StoreError as err:
            sys.exit("refused: " + str(err))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc == 0 or "in use" in err for rc, err in results), results
    frame = load(db)
    assert len(frame) == 3 and frame["image_path"].is_unique


def test_finished_store_reads_from_a_read_only_folder(checkpoints, images, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "out.db"
    extract(folder_config(checkpoints, images, db), progress=False)
    # one self-contained file: no WAL for a reader to need, and readers open it read-only (create nothing)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    os.chmod(folder, 0o555)  # binding for users other than root
    os.chmod(db, 0o444)
    try:
        assert len(load(db)) == 3
        assert sorted(p.name for p in folder.iterdir()) == ["out.db"]
    finally:
        os.chmod(folder, 0o755)


def test_string_ids_and_duplicate_ids(checkpoints, images, tmp_path):
    rows = [{"id": f"img_{i}", "prompt": "What?", "image": f"{i}.png"} for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "ids.csv", index=False)
    cfg = dict(model_path=str(checkpoints["llava15"]), modules=[HOOK],
               dataset={"local_dataset_path": str(tmp_path / "ids.csv"), "image_dataset_path": str(images)})
    db = tmp_path / "ids.db"
    assert extract(ExtractConfig(output_db=str(db), **cfg), progress=False)["done"] == 3
    assert sorted(load(db)["image_id"]) == ["img_0", "img_1", "img_2"]
    assert len(load(db, image_id="img_1")) == 1
    assert extract(ExtractConfig(output_db=str(db), **cfg), progress=False) == {"done": 0, "skipped": 3, "failed": 0}

    pd.DataFrame(rows + rows[:1]).to_csv(tmp_path / "ids.csv", index=False)
    with pytest.raises(ValueError, match="unique.*img_0"):
        extract(ExtractConfig(output_db=str(tmp_path / "dup.db"), **cfg), progress=False)
    assert not (tmp_path / "dup.db").exists(), "refused before anything ran"


def test_edited_image_is_extracted_again_and_replaces_its_rows(checkpoints, images, tmp_path):
    db = tmp_path / "edit.db"
    extract(folder_config(checkpoints, images, db), progress=False)
    before = load(db).set_index("image_path")["tensor"]
    edited = images / "1.png"
    sample_images(1, seed=99)[0].save(edited)
    stamp = edited.stat()
    os.utime(edited, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # a clock that ticks at least once
    assert extract(folder_config(checkpoints, images, db), progress=False) == {"done": 1, "skipped": 2, "failed": 0}
    after = load(db).set_index("image_path")["tensor"]
    assert len(after) == 3 and after.index.is_unique
    assert not torch.equal(after[str(edited)], before[str(edited)])
    assert torch.equal(after[str(images / "0.png")], before[str(images / "0.png")])


def test_fifo_and_folder_named_like_images_never_block(checkpoints, images, tmp_path):
    os.mkfifo(images / "pipe.png")
    (images / "folder.jpg").mkdir()
    db = tmp_path / "fifo.db"
    signal.alarm(120)  # a blocking open would hang the suite; fail it instead
    try:
        counts = extract(folder_config(checkpoints, images, db), progress=False)
    finally:
        signal.alarm(0)
    assert counts == {"done": 3, "skipped": 0, "failed": 1}
    errors = pd.read_sql("SELECT * FROM errors", sqlite3.connect(db))
    assert list(errors["sample_key"]) == ["pipe.png"] and "not a regular file" in errors.loc[0, "reason"]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    grey = np.full((4, 4), 32896, dtype=np.uint16)  # half of 65535
    Image.fromarray(grey).save(tmp_path / "wide.png")
    with Image.open(tmp_path / "wide.png") as image:
        assert image.mode.startswith("I")
        assert np.asarray(to_rgb(image))[0, 0].tolist() == [128, 128, 128]


def test_torchrun_shards_are_merged_when_resuming_in_one_process(checkpoints, images, tmp_path):
    db = tmp_path / "job.db"
    # what a killed 2-rank job leaves: rank 0 finished its share (samples 0 and 2)
    shard = tmp_path / "job.db.rank0"
    only_even = tmp_path / "even"
    only_even.mkdir()
    for name in ("0.png", "2.png"):
        (only_even / name).write_bytes((images / name).read_bytes())
        os.utime(only_even / name, ns=(0, (images / name).stat().st_mtime_ns))
    cfg = folder_config(checkpoints, images, db)
    extract(folder_config(checkpoints, only_even, shard), progress=False)
    conn = sqlite3.connect(shard)  # the shard was written by the same run (same config, same run id)
    with conn:
        conn.execute("UPDATE samples_done SET run_id = ?", (cfg.run_id(),))
        conn.execute("UPDATE tensor_samples SET run_id = ?", (cfg.run_id(),))
    conn.close()
    assert extract(cfg, progress=False) == {"done": 1, "skipped": 2, "failed": 0}
    assert not list(tmp_path.glob("job.db.rank*"))
    assert len(load(db)) == 3


def test_merge_killed_midway_then_rerun(checkpoints, images, tmp_path):
    source, target = tmp_path / "source.db", tmp_path / "target.db"
    extract(folder_config(checkpoints, images, source), progress=False)
    script = textwrap.dedent(f"""
        import os, signal, sys
        from tl_vlm.store import merge
        m = sys.modules["tl_vlm.store.merge"]
        original, calls = m.drop_sample, []
        def dying(*args):
            calls.append(1)
            if len(calls) == 2:  # one sample copied inside the open transaction
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args)
        m.drop_sample = dying
        merge({str(target)!r}, [{str(source)!r}])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9, result.stderr[-2000:]
    assert len(load(target)) == 0, "a killed merge leaves nothing half-copied"
    assert merge(target, [source]) == 3 and merge(target, [source]) == 0
    frame = load(target)
    assert len(frame) == 3 and frame["image_path"].is_unique
