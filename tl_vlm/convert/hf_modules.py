"""HF module names -> the tl_vlm hook point or module whose output equals that module's output.

Tools that hook HF models by module path (VLM-Lens, nnsight, plain ``register_forward_hook``) name what they read
as ``model.language_model.layers.31`` or ``vision_tower.vision_model.encoder.layers.5``. Each family lists, with
the builders below, the HF modules of its towers (HF's in-memory layout of the installed transformers, the names
``named_modules()`` gives) and what holds the same tensor here:

- a hook point (a block's output is ``blocks.{i}.hook_resid_post``, an attention's ``hook_attn_out``, ...), or
- one of our modules, when no hook point holds the value: a norm module's output is HF's norm output (TL's
  ``hook_normalized`` is before the elementwise weight), ``unembed``'s output is the logits of ``lm_head``.

The builders take the same HF prefixes as the weight rules (``convert/text_lms.py``, ``convert/vits.py``,
``convert/qformer.py``); ``{i}`` is a block index of ``tower`` and is expanded over its layers. Modules with no
equivalent (q/k/v projections, the embedding tables, a CLIP head LLaVA never runs) are not listed: a request for
them is refused by name rather than answered with something else.
"""

from __future__ import annotations

from dataclasses import dataclass

from tl_vlm.config import TowerConfig, ViTConfig


@dataclass(frozen=True)
class ModuleRule:
    hf: str  # HF module name, ``{i}`` for the block index
    target: str  # tl_vlm hook name or module path, same ``{i}``
    tower: str | None = None  # the tl_vlm tower whose blocks ``{i}`` runs over


def decoder_lm_modules(hf: str, tower: str = "language") -> list[ModuleRule]:
    """Llama / Mistral / Qwen2 decoder layers (``convert.text_lms.decoder_lm_rules``)."""
    layer = f"{hf}.layers.{{i}}"
    return [
        ModuleRule(layer, "blocks.{i}.hook_resid_post", tower),
        ModuleRule(f"{layer}.self_attn", "blocks.{i}.hook_attn_out", tower),
        ModuleRule(f"{layer}.mlp", "blocks.{i}.hook_mlp_out", tower),
        ModuleRule(f"{layer}.input_layernorm", "blocks.{i}.ln1", tower),
        ModuleRule(f"{layer}.post_attention_layernorm", "blocks.{i}.ln2", tower),
        ModuleRule(f"{hf}.norm", "ln_final"),
    ]


def opt_modules(hf: str, tower: str = "language") -> list[ModuleRule]:
    """OPT decoder layers (``convert.text_lms.opt_rules``); ``fc2`` is the MLP's output."""
    layer = f"{hf}.layers.{{i}}"
    return [
        ModuleRule(layer, "blocks.{i}.hook_resid_post", tower),
        ModuleRule(f"{layer}.self_attn", "blocks.{i}.hook_attn_out", tower),
        ModuleRule(f"{layer}.fc2", "blocks.{i}.hook_mlp_out", tower),
        ModuleRule(f"{layer}.self_attn_layer_norm", "blocks.{i}.ln1", tower),
        ModuleRule(f"{layer}.final_layer_norm", "blocks.{i}.ln2", tower),
        ModuleRule(f"{hf}.final_layer_norm", "ln_final"),
    ]


def t5_modules(hf: str) -> list[ModuleRule]:
    """Flan-T5 encoder and decoder blocks (``convert.text_lms.t5_rules``)."""
    return [
        rule
        for stack in ("encoder", "decoder")
        for rule in (
            ModuleRule(f"{hf}.{stack}.block.{{i}}", f"{stack}.blocks.{{i}}.hook_resid_post", stack),
            ModuleRule(f"{hf}.{stack}.final_layer_norm", f"{stack}.ln_final"),
        )
    ]


def vit_modules(hf: str, tl: str, cfg: ViTConfig) -> list[ModuleRule]:
    """CLIP / SigLIP / EVA encoders (``convert.vits.vit_rules``); ``pre_layrnorm`` / ``post_layernorm`` only where
    the flavour uses them (LLaVA never runs CLIP's ``post_layernorm``, which normalises the unused class token)."""
    layer = f"{hf}.encoder.layers.{{i}}"
    rules = [
        ModuleRule(layer, f"{tl}.blocks.{{i}}.hook_resid_post", tl),
        ModuleRule(f"{layer}.self_attn", f"{tl}.blocks.{{i}}.hook_attn_out", tl),
        ModuleRule(f"{layer}.mlp", f"{tl}.blocks.{{i}}.hook_mlp_out", tl),
        ModuleRule(f"{layer}.layer_norm1", f"{tl}.blocks.{{i}}.ln1", tl),
        ModuleRule(f"{layer}.layer_norm2", f"{tl}.blocks.{{i}}.ln2", tl),
    ]
    if cfg.ln_pre:
        rules.append(ModuleRule(f"{hf}.pre_layrnorm", f"{tl}.ln_pre"))
    if cfg.ln_post:
        rules.append(ModuleRule(f"{hf}.post_layernorm", f"{tl}.ln_post"))
    return rules


def qwen_vit_modules(hf: str, tl: str) -> list[ModuleRule]:
    """Qwen-VL vision blocks and patch merger (``convert.vits.qwen_vit_rules``); HF packs the images of a batch
    into one sequence, tl_vlm keeps one row per image (``[image, patch, d]``)."""
    layer = f"{hf}.blocks.{{i}}"
    return [
        ModuleRule(layer, f"{tl}.blocks.{{i}}.hook_resid_post", tl),
        ModuleRule(f"{layer}.attn", f"{tl}.blocks.{{i}}.hook_attn_out", tl),
        ModuleRule(f"{layer}.mlp", f"{tl}.blocks.{{i}}.hook_mlp_out", tl),
        ModuleRule(f"{layer}.norm1", f"{tl}.blocks.{{i}}.ln1", tl),
        ModuleRule(f"{layer}.norm2", f"{tl}.blocks.{{i}}.ln2", tl),
        ModuleRule(f"{hf}.merger.ln_q", "projector.ln"),
        ModuleRule(f"{hf}.merger", "projector.hook_out"),
    ]


def qformer_modules(hf: str, text_input: bool) -> list[ModuleRule]:
    """BLIP-2 / InstructBLIP Q-Former layers (post-LN BERT blocks, ``convert.qformer.qformer_rules``) and the norm
    of its input embeddings (the queries; InstructBLIP's with the instruction tokens)."""
    return [
        ModuleRule(f"{hf}.encoder.layer.{{i}}", "qformer.blocks.{i}.hook_normalized_resid_post", "qformer"),
        ModuleRule(f"{hf}.embeddings.layernorm" if text_input else f"{hf}.layernorm", "qformer.ln_embed"),
    ]


def expand(rules: list[ModuleRule], towers: dict[str, TowerConfig]) -> dict[str, str]:
    """HF module name -> tl_vlm target, ``{i}`` expanded over each tower's blocks (in rule order per block)."""
    names: dict[str, str] = {}
    for rule in rules:
        if "{i}" not in rule.hf:
            names[rule.hf] = rule.target
            continue
        for i in range(towers[rule.tower].n_layers):
            names[rule.hf.format(i=i)] = rule.target.format(i=i)
    return names
