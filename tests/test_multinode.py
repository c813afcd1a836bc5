"""Extraction across machines (issue 24): two torchrun "nodes" on this machine over loopback (``--nnodes 2``,
``--node-rank 0/1``) with per-node storage: each node writes its own folder and rank 0 receives the other node's
shard over the process group. Shared storage (every shard in one folder) is tests/test_store.py's torchrun test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import yaml

from tl_vlm.store import ExtractConfig, load

HOOKS = [r"blocks\.\d+\.hook_resid_post"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path, dataset, checkpoints, db) -> None:
    cfg = ExtractConfig(model_path=str(checkpoints["llava15"]), output_db=str(db), modules=HOOKS, batch_size=2,
                        dataset={"local_dataset_path": str(dataset / "data.csv"), "image_dataset_path": str(dataset / "images")})
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.__dict__.items() if v not in (None, [], {})}))


def run_two_nodes(configs) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "tl_vlm.cli", "extract", str(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for rank, cfg in enumerate(configs)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-2000:]


def check_store(db) -> None:
    frame = load(db)
    assert len(frame) == 5 * 2  # 5 images, 2 language blocks: each once
    assert frame.groupby(["image_id", "layer"]).size().max() == 1


def test_two_nodes_with_their_own_disks(dataset, checkpoints, tmp_path):
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    for node in ("node0", "node1"):
        write_config(tmp_path / node / "job.yaml", dataset, checkpoints, tmp_path / node / "out.db")
    run_two_nodes([tmp_path / "node0" / "job.yaml", tmp_path / "node1" / "job.yaml"])
    check_store(tmp_path / "node0" / "out.db")  # rank 0's store holds node 1's samples too
    assert not list((tmp_path / "node1").glob("out.db*")) and not list((tmp_path / "node0").glob("out.db.rank*"))
