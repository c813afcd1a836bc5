"""Bad input, table-driven (issue 17): each case is (input, expected error type, message fragment).

Every case must fail with a clear error before doing work it cannot finish: never a traceback from deep inside,
a silent wrong result, a hang or a giant allocation. Models are the bundled toys (offline, small).
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.prompts import format_prompt
from tl_vlm.store import ExtractConfig, StoreError, extract, load, merge
from tl_vlm.store.io import from_blob
from tl_vlm.zoo.data import sample_images

_MODELS: dict[str, HookedVLM] = {}


def toy(name: str) -> HookedVLM:
    if name not in _MODELS:
        _MODELS[name] = HookedVLM.from_pretrained(f"tl-vlm/toy-{name}")
    return _MODELS[name]


def prompt(name: str, text: str = "What colour is the shape?"):
    model = toy(name)
    return model.prepare(images=sample_images(1, seed=2), text=format_prompt(model.processor, text))


def yaml_config(tmp: Path, body: str) -> Path:
    (tmp / "images").mkdir(exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(f"model_path: tl-vlm/toy-llava\noutput_db: {tmp / 'out.db'}\nmodules: [blocks.0.hook_resid_post]\n" + body)
    return path


def from_yaml(tmp: Path, body: str):
    return extract(ExtractConfig.from_yaml(yaml_config(tmp, body)), progress=False)


def base(tmp: Path, **changes) -> ExtractConfig:
    kwargs = dict(model_path="tl-vlm/toy-llava", output_db=str(tmp / "out.db"), modules=["blocks.0.hook_resid_post"])
    return ExtractConfig(**{**kwargs, **changes})


def dataset(tmp: Path, ids: list) -> dict:
    (tmp / "images").mkdir(exist_ok=True)
    pd.DataFrame({"id": ids, "prompt": "What?", "image": "0.png"}).to_csv(tmp / "data.csv", index=False)
    return {"local_dataset_path": str(tmp / "data.csv"), "image_dataset_path": str(tmp / "images")}


def blob(tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def sqlite_file(tmp: Path, *statements: str) -> Path:
    path = tmp / "other.db"
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


TOY_LLAVA = Path(__file__).parents[1] / "tl_vlm" / "zoo" / "checkpoints" / "toy-llava"


def edited_checkpoint(tmp: Path, edit) -> Path:
    folder = tmp / "checkpoint"
    shutil.copytree(TOY_LLAVA, folder)
    weights = load_file(folder / "model.safetensors")
    save_file(edit({k: v.clone() for k, v in weights.items()}), folder / "model.safetensors")
    return folder


def more_layers(weights: dict) -> dict:
    extra = {k.replace("layers.1.", "layers.2."): v.clone() for k, v in weights.items() if ".layers.1." in k and "vision" not in k}
    return {**weights, **extra}


def integer_weight(weights: dict) -> dict:
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    return {**weights, key: weights[key].to(torch.int8)}


def qwen_types_disagree():
    inputs = prompt("qwen2-vl")
    types = inputs.mm_token_type_ids.clone() if inputs.mm_token_type_ids is not None else torch.zeros_like(inputs.input_ids)
    types[0, 0] = 1  # marks a text token as image
    return toy("qwen2-vl")({**inputs.as_kwargs(), "mm_token_type_ids": types})


def wrong_mask(shape_change):
    inputs = prompt("llava")
    mask = torch.ones(shape_change(tuple(inputs.input_ids.shape)), dtype=torch.long)
    return toy("llava")(VLMInputs(inputs.input_ids, inputs.pixel_values, mask))


def blip2_long_prompt():
    model = toy("blip2")
    inputs = prompt("blip2", " ".join(["red"] * 200))
    return model(inputs)


CASES = [
    # store: where the samples are
    ("input_dir missing", lambda t: extract(base(t, input_dir=str(t / "nope"), prompt="p"), progress=False),
     FileNotFoundError, "does not exist"),
    ("input_dir is a file", lambda t: extract(base(t, input_dir=__file__, prompt="p"), progress=False),
     NotADirectoryError, "not a folder"),
    ("duplicate ids", lambda t: extract(base(t, dataset=dataset(t, [1, 2, 1])), progress=False), ValueError, "unique"),
    ("missing id", lambda t: extract(base(t, dataset=dataset(t, [1, None])), progress=False), ValueError, "got None"),
    ("missing dataset file", lambda t: extract(base(t, dataset={"local_dataset_path": str(t / "x.csv")}), progress=False),
     FileNotFoundError, "does not exist"),
    # store: the YAML config
    ("float16 as a string", lambda t: from_yaml(t, f"input_dir: {t}\nprompt: p\nfloat16: 'false'\n"), ValueError,
     "float16: Input should be a valid boolean"),
    ("batch_size as a string", lambda t: from_yaml(t, f"input_dir: {t}\nprompt: p\nbatch_size: '8'\n"), ValueError,
     "batch_size"),
    ("unknown dtype", lambda t: from_yaml(t, f"input_dir: {t}\nprompt: p\ndtype: float8\n"), ValueError, "dtype"),
    ("prompt as a list", lambda t: from_yaml(t, f"input_dir: {t}\nprompt: [a, b]\n"), ValueError, "prompt"),
    ("unknown key", lambda t: from_yaml(t, f"input_dir: {t}\nprompt: p\nbatchsize: 2\n"), ValueError, "unknown config keys"),
    ("not a mapping", lambda t: ExtractConfig.from_yaml(Path(t / "c.yaml").write_text("- a\n") and t / "c.yaml"),
     ValueError, "mapping"),
    ("alias bomb", lambda t: ExtractConfig.from_yaml(_bomb(t)), ValueError, "alias"),
    ("config too large", lambda t: ExtractConfig.from_yaml(_large(t)), ValueError, "at most"),
    ("trust_remote_code from the file alone", lambda t: from_yaml(t, f"input_dir: {t}\nprompt: p\nmodel:\n- trust_remote_code: true\n"),
     ValueError, "--trust-remote-code"),
    ("model kwarg not a flag", lambda t: from_yaml(t, f"input_dir: {t}\nprompt: p\nmodel:\n- fold_ln: 'yes'\n"),
     ValueError, "true or false"),
    ("YAML syntax error", lambda t: ExtractConfig.from_yaml(Path(t / "c.yaml").write_text("a: [") and t / "c.yaml"),
     ValueError, "not valid YAML"),
    ("YAML python tag", lambda t: ExtractConfig.from_yaml(Path(t / "c.yaml").write_text("!!python/object:os.system {}")
                                                          and t / "c.yaml"), ValueError, "not valid YAML"),
    # store: reading and merging
    ("blob claiming 1e12 elements", lambda t: from_blob(blob(torch.zeros(1).expand(10**12))), ValueError, "claims"),
    ("empty blob", lambda t: from_blob(b""), ValueError, "empty"),
    ("truncated blob", lambda t: from_blob(blob(torch.zeros(4))[:40]), ValueError, "not a plain tensor"),
    ("read an empty SQLite file", lambda t: load(sqlite_file(t)), StoreError, "empty"),
    ("merge from an empty DB", lambda t: merge(t / "m.db", [sqlite_file(t)]), StoreError, "samples_done"),
    ("merge from a VLM-Lens-only DB", lambda t: merge(t / "m.db", [_vlm_lens_db(t)]), StoreError, "VLM-Lens"),
    ("merge a missing file", lambda t: merge(t / "m.db", [t / "missing.db"]), StoreError, "does not exist"),
    ("merge into itself", lambda t: merge(_vlm_lens_db(t), [_vlm_lens_db(t)]), StoreError, "itself"),
    ("read a folder", lambda t: load(t), StoreError, "folder"),
    # model inputs
    ("token id past the vocabulary", lambda t: toy("llava")(torch.tensor([[10**6]])), ValueError, "outside the vocabulary"),
    ("negative token id", lambda t: toy("llava")(torch.tensor([[-5]])), ValueError, "outside the vocabulary"),
    ("float token ids", lambda t: toy("llava")(torch.tensor([[1.5]])), ValueError, "integer token ids"),
    ("no tokens", lambda t: toy("llava")(torch.zeros(1, 0, dtype=torch.long)), ValueError, "at least one token"),
    ("Qwen mm_token_type_ids disagree", lambda t: qwen_types_disagree(), ValueError, "mm_token_type_ids"),
    ("attention_mask too short", lambda t: wrong_mask(lambda s: (s[0], 3)), ValueError, "attention_mask has shape"),
    ("attention_mask of another batch", lambda t: wrong_mask(lambda s: (2, s[1])), ValueError, "attention_mask has shape"),
    ("attention_mask 3-D", lambda t: wrong_mask(lambda s: (1, *s)), ValueError, "attention_mask has shape"),
    ("generate past the context", lambda t: toy("llava").generate(prompt("llava"), max_new_tokens=10**9), ValueError,
     "context is 512"),
    ("BLIP-2 generate past OPT's positions", lambda t: toy("blip2").generate(prompt("blip2"), max_new_tokens=10**4),
     ValueError, "context is"),
    ("BLIP-2 prompt past OPT's positions", lambda t: blip2_long_prompt(), ValueError, "learned positions"),
    # checkpoints
    ("more layers than the config", lambda t: HookedVLM.from_pretrained(edited_checkpoint(t, more_layers)), ValueError,
     "no parameter 'blocks.2"),
    ("fewer layers than the config", lambda t: HookedVLM.from_pretrained(
        edited_checkpoint(t, lambda w: {k: v for k, v in w.items() if ".layers.1." not in k or "vision" in k})),
     ValueError, "fewer layers"),
    ("integer weights", lambda t: HookedVLM.from_pretrained(edited_checkpoint(t, integer_weight)), ValueError, "torch.int8"),
    ("weight of the wrong shape", lambda t: HookedVLM.from_pretrained(edited_checkpoint(t, _wrong_q_shape)), ValueError,
     "does not fit"),
]


def _bomb(tmp: Path) -> Path:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp / "bomb.yaml"
    path.write_text("model_path: m\noutput_db: o.db\nmodules: [x]\ninput_dir: .\nprompt: p\nmodel:\n  " + "\n  ".join(lines) + "\n")
    return path


def _large(tmp: Path) -> Path:
    path = tmp / "large.yaml"
    path.write_text("prompt: '" + "x" * (2 << 20) + "'\n")
    return path


def _vlm_lens_db(tmp: Path) -> Path:
    from tl_vlm.store.schema import TENSORS

    path = tmp / "vlm_lens.db"
    if not path.exists():
        sqlite_file(tmp, TENSORS).rename(path)
    return path


def test_fifo_in_a_dataset_is_an_error_row_not_a_hang(tmp_path):
    (tmp_path / "images").mkdir()
    os.mkfifo(tmp_path / "images" / "0.png")
    cfg = base(tmp_path, dataset=dataset(tmp_path, ["a"]))
    assert extract(cfg, progress=False) == {"done": 0, "skipped": 0, "failed": 1}


@pytest.mark.parametrize("debug", [False, True])
def test_cli_prints_the_message_and_debug_the_traceback(tmp_path, debug):
    config = yaml_config(tmp_path, f"input_dir: {tmp_path / 'nope'}\nprompt: p\n")
    command = [sys.executable, "-m", "tl_vlm.cli", "extract", str(config), *(["--debug"] if debug else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and "does not exist" in result.stderr
    assert ("Traceback" in result.stderr) == debug, result.stderr[-2000:]


def _wrong_q_shape(weights: dict) -> dict:
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    return {**weights, key: torch.zeros(3, 3)}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path):
    _, run, error, fragment = case
    with pytest.raises(error) as caught:
        run(tmp_path)
    assert fragment in str(caught.value), str(caught.value)
