"""Fidelity report on any checkpoint: is the converted model the same model as HF's?

``verify(model_or_name, ...)`` builds the HF reference and the HookedVLM from the same weights (the
HookedVLM shares the HF model's storage, so no second copy), runs both on sample inputs (generated
images and prompts unless given), and reports per tower and layer the max / mean abs diff and relative
error of the hidden states, the logits' max diff, KL of the next-token distributions, top-1 agreement
and greedy-generation agreement. In fp16/bf16 the reference is HF in that dtype (0 means the conversion is
bit for bit); HF in fp32 is also run (when ``reference_fp32``), and the table reports it on a row of its own, with
HF's own distance to it, so the dtype's noise is never read as conversion error. Weight processing that
changes logits by design (``center_unembed``, ``center_writing_weights``) switches the comparison to
probabilities (and skips hidden states that centering moves).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tl_vlm.dtypes import resolve_dtype

# Per dtype: hidden-state relative error, logits (or probabilities) max abs diff, mean KL, top-1 agreement.
TOLERANCES = {
    torch.float32: {"hidden_rel": 1e-4, "logits": 1e-4, "kl": 1e-6, "top1": 1.0},
    torch.float16: {"hidden_rel": 2e-2, "logits": 5e-2, "kl": 1e-3, "top1": 0.98},
    torch.bfloat16: {"hidden_rel": 8e-2, "logits": 2e-1, "kl": 1e-2, "top1": 0.95},
}
DEFAULT_PROMPTS = ["Describe the image.", "What colour is the shape?"]
# Report.dtype_noise keys: HF and tl_vlm in half precision against HF in fp32.
HF_FP32, OURS_FP32 = "HF in dtype vs HF fp32, logits max|d|", "tl_vlm in dtype vs HF fp32, logits max|d|"
HF_KL, OURS_KL = "HF in dtype vs HF fp32, mean KL", "tl_vlm in dtype vs HF fp32, mean KL"


@dataclass
class LayerDiff:
    tower: str
    layer: int
    max_abs: float
    mean_abs: float
    rel: float


@dataclass
class Report:
    model: str
    dtype: str
    layers: list[LayerDiff]
    logits_max_abs: float
    compared: str  # "logits" or "probabilities"
    kl_mean: float
    kl_max: float
    top1_agreement: float
    generation_agreement: float
    dtype_noise: dict = field(default_factory=dict)  # HF in dtype vs HF fp32, and ours vs HF fp32
    tolerances: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lines = [f"tl_vlm verify {self.model} ({self.dtype}): {'PASS' if self.passed else 'FAIL'}",
                 f"{'tower':10s} {'layer':>5s} {'max|d|':>10s} {'mean|d|':>10s} {'rel':>10s}"]
        lines += [f"{d.tower:10s} {d.layer:5d} {d.max_abs:10.2e} {d.mean_abs:10.2e} {d.rel:10.2e}" for d in self.layers]
        lines.append(f"{self.compared} max|d| {self.logits_max_abs:.2e}  KL mean {self.kl_mean:.2e} max {self.kl_max:.2e}  "
                     f"top-1 {self.top1_agreement:.3f}  greedy generation {self.generation_agreement:.3f}")
        if self.dtype != "float32":
            lines += self.reference_rows()
        lines += [f"FAIL: {f}" for f in self.failures]
        return "\n".join(lines)

    def reference_rows(self) -> list[str]:
        """Half precision: the conversion's error (vs HF in the same dtype) apart from the dtype's noise (vs fp32)."""
        added = "bit for bit" if self.logits_max_abs == 0 else "added by the conversion"
        amount = "0" if self.logits_max_abs == 0 else f"{self.logits_max_abs:.2e}"
        rows = [f"vs HF in {self.dtype}: {self.compared} max|d| {amount} ({added})"]
        noise = self.dtype_noise
        if noise:
            rows.append(f"vs HF in float32: logits max|d| {noise[OURS_FP32]:.2e}, mean KL {noise[OURS_KL]:.2e} "
                        f"({self.dtype} noise: HF in {self.dtype} itself is at {noise[HF_FP32]:.2e}, "
                        f"mean KL {noise[HF_KL]:.2e})")
        return rows

    def write(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "verify.json").write_text(json.dumps({**asdict(self), "passed": self.passed}, indent=2))
        (out / "verify.md").write_text("```\n" + self.table() + "\n```\n")


def verify(
    model_or_name,
    images=None,
    prompts: list[str] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    max_new_tokens: int = 8,
    reference_fp32: bool = True,
    tolerances: dict | None = None,
    **processing,
) -> Report:
    from transformers import AutoModelForImageTextToText

    from tl_vlm import HookedVLM
    from tl_vlm.checkpoints import bundled_checkpoint
    from tl_vlm.families import family_for
    from tl_vlm.prompts import format_prompt
    from tl_vlm.zoo.data import sample_images

    dtype = resolve_dtype(dtype or torch.float32, None)
    ours = model_or_name if isinstance(model_or_name, HookedVLM) else None
    name = ours.name_or_path if ours is not None else str(model_or_name)
    name = str(bundled_checkpoint(name) or name)  # HF's loader does not know the bundled models' names
    device = device or (str(ours.device) if ours is not None else "cpu")
    hf = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).to(device).eval()
    processor = ours.processor if ours is not None else family_for(hf.config).load_processor(name, False)
    if ours is None:
        ours = HookedVLM.from_hf_model(hf, processor, **processing)
    elif processing:
        raise ValueError("pass weight-processing flags only with a model name; this HookedVLM is already built")
    processed = any(processing.get(k) for k in ("center_unembed", "center_writing_weights"))
    tol = {**TOLERANCES[dtype], **(tolerances or {})}

    images = images if images is not None else sample_images(len(prompts or DEFAULT_PROMPTS), seed=0)
    texts = [format_prompt(processor, p) for p in (prompts or DEFAULT_PROMPTS)]
    inputs = ours.scoring_inputs(ours.prepare(images=images, text=texts))  # T5: the first decoder step
    real = inputs.attention_mask.bool()

    hf_logits, hf_layers = _hf_run(ours, hf, inputs)
    with torch.no_grad():
        logits, cache = ours.run_with_cache(inputs, names_filter=lambda n: n.endswith("resid_post"))
    layers, failures = [], []
    if not processing.get("center_writing_weights"):
        for tower, outputs in hf_layers.items():
            prefix = "" if tower == "language" else f"{tower}."
            refs, select = ours.align_hf_outputs(tower, outputs, inputs)
            for i, ref in enumerate(refs):
                # Post-LN blocks (Q-Former) output their normalized stream, as TL's BertBlock names it.
                post_ln = f"{prefix}blocks.{i}.hook_normalized_resid_post"
                got = cache[post_ln if post_ln in cache.cache_dict else f"{prefix}blocks.{i}.hook_resid_post"]
                got = got if select is None else got[select]
                mask = real if tower in ("language", "encoder") else None
                diff = ((got.float() - ref.float()).abs())[mask] if mask is not None else (got.float() - ref.float()).abs()
                scale = (ref.float().abs()[mask] if mask is not None else ref.float().abs()).max().clamp(min=1e-6)
                layers.append(LayerDiff(tower, i, diff.max().item(), diff.mean().item(), (diff.max() / scale).item()))
                if layers[-1].rel > tol["hidden_rel"]:
                    failures.append(f"{tower} layer {i}: relative error {layers[-1].rel:.2e} > {tol['hidden_rel']:.0e}")

    compared = "probabilities" if processed else "logits"
    a, b = (logits.float().softmax(-1), hf_logits.float().softmax(-1)) if processed else (logits.float(), hf_logits.float())
    out_mask = real if logits.shape[:2] == real.shape else torch.ones(logits.shape[:2], dtype=torch.bool)
    logits_max = (a - b).abs()[out_mask].max().item()
    kl = _kl(hf_logits, logits)[out_mask]
    top1 = (logits.argmax(-1) == hf_logits.argmax(-1))[out_mask].float().mean().item()
    ours_tokens = ours.generate(inputs, max_new_tokens=max_new_tokens)
    with torch.no_grad():
        hf_tokens = hf.generate(**inputs.as_kwargs(), max_new_tokens=max_new_tokens, do_sample=False)
    n = min(ours_tokens.shape[1], hf_tokens.shape[1])
    new = slice(inputs.shape[1], n)
    generation = (ours_tokens[:, new] == hf_tokens[:, new]).float().mean().item() if n > inputs.shape[1] else 1.0
    for check, value, bad in (
        ("logits" if not processed else "probabilities", logits_max, logits_max > tol["logits"]),
        ("mean KL", kl.mean().item(), kl.mean().item() > tol["kl"]),
        ("top-1 agreement", top1, top1 < tol["top1"]),
    ):
        if bad:
            failures.append(f"{check} {value:.3g} outside tolerance")

    noise = {}
    if dtype != torch.float32 and reference_fp32:
        hf32 = AutoModelForImageTextToText.from_pretrained(name, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            ref = hf32(**inputs.as_kwargs()).logits.float()
        del hf32
        noise[HF_FP32] = (hf_logits.float() - ref).abs()[out_mask].max().item()
        noise[OURS_FP32] = (logits.float() - ref).abs()[out_mask].max().item()
        noise[HF_KL] = _kl(ref, hf_logits)[out_mask].mean().item()
        noise[OURS_KL] = _kl(ref, logits)[out_mask].mean().item()
    return Report(name, str(dtype).removeprefix("torch."), layers, logits_max, compared, kl.mean().item(), kl.max().item(),
                  top1, generation, noise, tol, failures)


def _kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) of next-token distributions, per position."""
    p = reference.float().log_softmax(-1)
    q = other.float().log_softmax(-1)
    return F.kl_div(q, p, log_target=True, reduction="none").sum(-1)


def _hf_run(model, hf, inputs) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """HF logits and per-layer outputs of each tower the family can map (forward hooks on HF's layers)."""
    layers = model.hf_layers(hf)
    outputs: dict[str, list[torch.Tensor]] = {tower: [] for tower in layers}
    handles = []
    for tower, modules in layers.items():
        for module in modules:
            handles.append(module.register_forward_hook(
                lambda m, i, o, t=tower: outputs[t].append((o[0] if isinstance(o, tuple) else o).detach())
            ))
    try:
        with torch.no_grad():
            logits = hf(**inputs.as_kwargs()).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs
