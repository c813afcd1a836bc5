"""``tl-vlm extract``: batched, resumable, optionally data-parallel extraction of hook activations to SQLite.

One transaction per batch writes the tensors rows and marks the batch's samples done, so a run killed
at any point leaves only whole batches behind and a rerun of the same config continues where it
stopped. Under ``torchrun`` (one machine or several) each rank extracts its share of the samples into
``<db>.rank<r>`` and rank 0 merges the shards into ``<db>`` at the end, receiving over the process group the
shards it cannot see on its own disk.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
import sqlite3
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from tl_vlm.hf_names import run_with_outputs, select_hf_modules, unknown_module_message
from tl_vlm.families.clip import HookedCLIP
from tl_vlm.prompts import format_prompt
from tl_vlm.store.config import ExtractConfig
from tl_vlm.store.dual import extract_dual_batch
from tl_vlm.store.dataset import Sample, samples
from tl_vlm.store.io import to_blob
from tl_vlm.store.lock import writer_lock
from tl_vlm.store.merge import merge
from tl_vlm.store.pooling import pool
from tl_vlm.store.schema import connect, done_samples, drop_sample, finish, has_side_tables

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MULTI_POSITION = ("hook_attn_scores", "hook_pattern")  # [batch, head, q, k]: stored whole, never pooled


def select_hooks(names: list[str], patterns: list[str]) -> list[str]:
    """Hook names fully matching any pattern, as a regular expression or a glob."""
    chosen = []
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [n for n in names if regex.fullmatch(n) or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4)
            raise ValueError(f"hook pattern {pattern!r} matches no hook; close names: {close} (list them with tl-vlm hooks MODEL)")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def select_layers(model, patterns: list[str]) -> dict[str, str]:
    """Stored layer name -> hook point or module to read: HF module names (as the pattern matched them, today's
    spelling or VLM-Lens's older one) map to their equivalents, hook-name patterns select hooks."""
    chosen, rest = select_hf_modules(model, patterns)
    for pattern in rest:
        if not any(re.fullmatch(pattern, n) or fnmatch.fnmatchcase(n, pattern) for n in model.hook_dict):
            raise ValueError(unknown_module_message(model, pattern))
    hooks = select_hooks(list(model.hook_dict), rest) if rest else []
    return {**chosen, **{h: h for h in hooks if h not in chosen}}


def extract(config: ExtractConfig, progress: bool = True, trust_remote_code: bool = False) -> dict:
    """Run (or resume) an extraction; returns counts of samples done, skipped and failed.

    ``trust_remote_code``: the caller's permission to run code shipped with the checkpoint; a config that asks
    for it (``model: [{trust_remote_code: true}]``) is refused without it, since a config file may come from
    anyone. Samples, ids and the model kwargs are checked before the model loads, and the output file is held
    by one writer at a time (another ``extract`` or ``merge`` on it is refused up front).
    """
    from tl_vlm import __version__
    from tl_vlm.loading import load_model

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    every = samples(config)
    load_kwargs = _load_kwargs(config, trust_remote_code)
    run_id = config.run_id()
    db = Path(config.output_db)
    out = db.with_name(f"{db.name}.rank{rank}") if world > 1 else db
    with writer_lock(out):
        if world == 1:
            _adopt_shards(db)
        done: dict[str, str | None] = {}
        for store in [db, *_shards(db)] if world > 1 else [db]:
            done.update(_done(store, run_id))
        mine = [s for i, s in enumerate(every) if i % world == rank]
        todo = [s for s in mine if s.key not in done or _changed(done[s.key], s.fingerprint)]
        model = load_model(config.model_path, device=device, revision=config.revision, **load_kwargs)
        if isinstance(model, HookedCLIP):  # no HF module names for dual encoders: hook names only
            layers = {h: h for h in select_hooks(list(model.hook_dict), config.modules)}
        else:
            layers = select_layers(model, config.modules)
        changed = [k for k in ("fold_ln", "center_writing_weights", "center_unembed") if load_kwargs.get(k)]
        if changed and any(name != target for name, target in layers.items()):
            raise ValueError(
                f"HF module names read HF's outputs, which {changed} change by design (folded norms, centred "
                "streams); drop those model kwargs or select hook names"
            )
        if config.pooling_method != "none" and any(t.endswith(_MULTI_POSITION) for t in layers.values()):
            raise ValueError("attention scores/patterns cannot be pooled over positions; use pooling_method none for them")
        conn = connect(out)
        try:
            with conn:
                conn.execute(
                    "INSERT OR IGNORE INTO runs (run_id, model, revision, config_hash, tl_vlm_version, dtype, pooling, "
                    "hooks, config) VALUES (?,?,?,?,?,?,?,?,?)",
                    (run_id, config.model_path, config.revision, run_id, __version__, config.dtype,
                     config.pooling_method, json.dumps(layers), json.dumps(asdict(config), default=str)),
                )
            counts = {"done": 0, "skipped": len(mine) - len(todo), "failed": 0}
            architecture = config.architecture or model.vlm_cfg.family
            bar = tqdm(total=len(todo), unit="img", disable=not progress, desc=f"extract{f' rank {rank}' if world > 1 else ''}")
            try:
                for start in range(0, len(todo), config.batch_size):
                    batch = todo[start : start + config.batch_size]
                    loaded = _load_images(conn, run_id, batch, counts)
                    if loaded:
                        rows = _extract_batch(model, layers, config, loaded)
                        _write(conn, run_id, config, architecture, loaded, rows)
                        counts["done"] += len(loaded)
                    bar.update(len(batch))
            finally:
                bar.close()
            finish(conn)
        finally:
            conn.close()
    if world > 1:
        _merge_ranks(db, rank, world)
    return counts


def _changed(stored: str | None, current: str | None) -> bool:
    """Resume keys on the sample key; a file whose size or modification time changed is extracted again."""
    return stored is not None and current is not None and stored != current


def _shards(db: Path) -> list[Path]:
    """Per-rank stores of a torchrun job writing ``db`` (``<db>.rank<r>``), finished or killed."""
    pattern = re.compile(re.escape(db.name) + r"\.rank\d+")
    return sorted(p for p in db.parent.glob(f"{db.name}.rank*") if pattern.fullmatch(p.name))


def _adopt_shards(db: Path) -> None:
    """A single process resuming a killed torchrun job: merge what the ranks finished into ``db`` first (so it is
    not extracted again) and remove the shards. A shard still being written is refused by its lock."""
    for shard in _shards(db):
        with writer_lock(shard):
            merge(db, [shard], lock=False)
            _remove_store(shard)


def _remove_store(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


_LOAD_KEYS = {"fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases", "trust_remote_code"}


def _load_kwargs(config: ExtractConfig, trust_remote_code: bool) -> dict:
    """VLM-Lens's ``model`` kwargs mapped onto HookedVLM.from_pretrained; anything else is an error."""
    kwargs = config.model_kwargs()
    asked = kwargs.pop("trust_remote_code", False)
    if not isinstance(asked, bool):
        raise ValueError(f"model kwarg trust_remote_code must be true or false, got {asked!r}")
    if asked and not trust_remote_code:
        raise ValueError(
            "the config sets trust_remote_code: true, which runs Python code shipped with the checkpoint; a config "
            "file alone cannot allow that: if you trust model_path, pass --trust-remote-code to tl-vlm extract "
            "(extract(config, trust_remote_code=True) from Python)"
        )
    dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None) or config.dtype
    unknown = set(kwargs) - _LOAD_KEYS
    if unknown:
        raise ValueError(f"model kwargs {sorted(unknown)} are not supported; use {sorted(_LOAD_KEYS | {'torch_dtype'})}")
    if str(dtype).removeprefix("torch.") not in DTYPES and dtype != "auto":  # auto: the checkpoint's (VLM-Lens)
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)} or auto")
    for flag, value in kwargs.items():
        if not isinstance(value, bool):
            raise ValueError(f"model kwarg {flag} must be true or false, got {value!r}")
    return {**kwargs, "trust_remote_code": trust_remote_code,
            "dtype": "auto" if dtype == "auto" else DTYPES[str(dtype).removeprefix("torch.")]}


def _done(db: Path, run_id: str) -> dict[str, str | None]:
    """Sample key -> fingerprint of what ``db`` holds for this run (nothing for a missing or new file)."""
    if not db.exists() or db.stat().st_size == 0:
        return {}
    conn = connect(db, create=False)
    try:
        if not has_side_tables(conn):  # new, or a VLM-Lens store: nothing of ours is finished in it
            return {}
        return done_samples(conn, run_id)
    finally:
        conn.close()


def _load_images(conn: sqlite3.Connection, run_id: str, batch: list[Sample], counts: dict) -> list[tuple[Sample, object]]:
    loaded = []
    for sample in batch:
        try:
            loaded.append((sample, sample.load_image()))
        except Exception as err:  # any unreadable image is recorded, never fatal
            counts["failed"] += 1
            with conn:
                conn.execute(
                    "INSERT OR REPLACE INTO errors (run_id, sample_key, image_path, reason) VALUES (?,?,?,?)",
                    (run_id, sample.key, sample.image_path, f"{type(err).__name__}: {err}"),
                )
    return loaded


def _extract_batch(model, layers: dict[str, str], config: ExtractConfig, loaded) -> list[list[tuple[str, torch.Tensor]]]:
    """Per sample, (stored layer name, pooled activation) pairs."""
    if isinstance(model, HookedCLIP):
        return extract_dual_batch(model, list(layers.values()), config.pooling_method, config.float16, loaded)
    texts = [format_prompt(model.processor, sample.prompt) for sample, _ in loaded]
    inputs = model.scoring_inputs(model.prepare(images=[image for _, image in loaded], text=texts))
    targets = list(dict.fromkeys(layers.values()))
    _, outputs = run_with_outputs(model, inputs, targets, stop_at_layer=_stop_layer(model, targets))
    batch = inputs.input_ids.shape[0]
    real = inputs.attention_mask.bool() if inputs.attention_mask is not None else torch.ones_like(inputs.input_ids, dtype=torch.bool)
    image = model.image_token_mask(inputs.input_ids)
    # The tower over prompt positions: pooled by image / text tokens (a T5 decoder's one step is pooled plainly).
    prompt_tower = model.tower("encoder" if model.capabilities.encoder_decoder else "language")
    language = set(prompt_tower.hook_dict)
    per_sample: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(batch)]
    for name, hook in layers.items():
        act = outputs[hook]
        rows = _sample_rows(act.shape[0], batch, hook)
        on_prompt = hook in language if hook in model.hook_dict else prompt_tower.relative_name(hook) == hook
        # Rows padded to the batch's largest image (Qwen-VL, Pixtral) pool their real positions only.
        padded = not on_prompt and model.capabilities.padded_vision_rows
        valid = model.padded_rows(inputs, hook) if padded else None
        for b, selection in enumerate(rows):
            if on_prompt:
                one = act[b]
                if hook.endswith(_MULTI_POSITION):
                    pooled = one[None]
                else:
                    pooled = pool(one, config.pooling_method, image[b], real[b])
            else:
                one = act[selection]
                if hook.endswith(_MULTI_POSITION):
                    pooled = one
                else:
                    reals = valid[selection].to(one.device) if valid is not None else [None] * len(one)
                    pooled = torch.cat([pool(r, config.pooling_method, None, v) for r, v in zip(one, reals)])
            per_sample[b].append((name, pooled.half() if config.float16 else pooled))
    return per_sample


def _stop_layer(model, hooks: list[str]) -> int | None:
    """Run the language tower only as deep as the hooks need: the unembedding alone was a quarter of the
    compute at vocab 32k, and VLM-Lens's loop always pays for it."""
    if "language" not in model.towers():  # a dual encoder runs both towers whole
        return None
    language, deepest = model.tower("language"), -1
    for hook in hooks:
        name = language.relative_name(hook)
        if name is None:
            continue
        block = re.match(r"blocks\.(\d+)\.", name)
        if block is None and not name.startswith(("hook_", "pos_embed")):
            return None  # ln_final and beyond
        deepest = max(deepest, int(block.group(1)) if block else -1)
    return deepest + 1


def _sample_rows(n_rows: int, batch: int, hook: str) -> list[slice]:
    """Which rows of a vision-side activation belong to each sample (one image per sample)."""
    if n_rows % batch:
        raise ValueError(f"{hook}: {n_rows} rows for {batch} samples; images of different tile counts, use batch_size 1")
    per = n_rows // batch
    return [slice(b * per, (b + 1) * per) for b in range(batch)]


def _write(conn, run_id, config, architecture, loaded, rows) -> None:
    with conn:  # one transaction: the batch's tensors and its done marks land together or not at all
        for (sample, _), hooks in zip(loaded, rows):
            drop_sample(conn, run_id, sample.key)  # rows of an earlier version of this image, if any
            for hook, tensor in hooks:
                cursor = conn.execute(
                    "INSERT INTO tensors (name, architecture, image_path, image_id, prompt, label, layer, pooling_method, "
                    "tensor_dim, tensor) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (config.model_path, architecture, sample.image_path, sample.image_id, sample.prompt, sample.label,
                     hook, config.pooling_method, int(tensor.shape[-1]), to_blob(tensor)),
                )
                conn.execute("INSERT INTO tensor_samples VALUES (?,?,?)", (cursor.lastrowid, run_id, sample.key))
            conn.execute("INSERT INTO samples_done VALUES (?,?,?)", (run_id, sample.key, sample.fingerprint))
            conn.execute("DELETE FROM errors WHERE run_id = ? AND sample_key = ?", (run_id, sample.key))


def _merge_ranks(db: Path, rank: int, world: int) -> None:
    """Rank 0 merges every rank's shard into ``db``. Shards rank 0 cannot see (nodes with their own disks) are
    streamed to it over the process group first, so shared and per-node storage both end with one store."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    files = dist.new_group(backend="gloo")  # file bytes travel as CPU tensors whatever the compute backend
    dist.barrier(group=files)  # every rank has closed (and unlocked) its shard
    missing = [[r for r in range(world) if not db.with_name(f"{db.name}.rank{r}").exists()] if rank == 0 else None]
    dist.broadcast_object_list(missing, src=0, group=files)
    for r in missing[0]:
        shard = db.with_name(f"{db.name}.rank{r}")
        if rank == r:
            data = torch.frombuffer(bytearray(shard.read_bytes()), dtype=torch.uint8)
            dist.send(torch.tensor([data.numel()]), dst=0, group=files)
            dist.send(data, dst=0, group=files)
            _remove_store(shard)  # rank 0 holds it now
        elif rank == 0:
            size = torch.zeros(1, dtype=torch.long)
            dist.recv(size, src=r, group=files)
            data = torch.empty(int(size), dtype=torch.uint8)
            dist.recv(data, src=r, group=files)
            shard.write_bytes(data.numpy().tobytes())
    if rank == 0:
        shards = _shards(db)
        merge(db, shards)
        for shard in shards:
            _remove_store(shard)
    dist.barrier(group=files)
    dist.destroy_process_group()
