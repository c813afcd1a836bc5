"""The toy CLIP: a text twin for the toy LLaVA's vision encoder, trained offline in about a minute.

``python -m tl_vlm.zoo.toy_clip OUT`` builds it; the package ships the result as ``tl-vlm/toy-clip``. Its vision
tower IS the toy LLaVA's encoder (``tl-vlm/toy-llava``, frozen); a CLIP text tower (and the vision side's pooling
norm and projection) is trained from scratch against it with the plain CLIP loss on captions of the zoo's scenes and
charts (locked-image tuning, as LiT). The dual encoder then measures what the VLM's own encoder separates, with
retrieval and hard negatives (``analysis.retrieval``), and its vision tower swaps back into the VLM after tuning.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from tl_vlm.tuning.negclip import triples
from tl_vlm.zoo.tiny_clip import TEXT_POSITIONS, build_dual_tokenizer

VLM = "tl-vlm/toy-llava"


def train_toy_clip(out: str | pathlib.Path, steps: int = 150, batch_size: int = 32, lr: float = 2e-3, seed: int = 0):
    from tl_vlm import HookedCLIP, HookedVLM
    from tl_vlm.tuning.swap import with_vision_encoder

    vlm = HookedVLM.from_pretrained(VLM)
    tok = build_dual_tokenizer("clip")
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=TEXT_POSITIONS, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, hidden_act="quick_gelu")
    hf = CLIPModel(CLIPConfig(text_config=text, vision_config=vlm.vlm_cfg.vision.hf_config.to_dict(), projection_dim=64))
    processor = CLIPProcessor(image_processor=vlm.processor.image_processor, tokenizer=tok)
    clip = with_vision_encoder(HookedCLIP.from_hf_model(hf.eval(), processor), vlm)
    for name, p in clip.named_parameters():  # the encoder is the VLM's: locked
        p.requires_grad_(not name.startswith(("vision.embed", "vision.ln_pre", "vision.blocks")))
    optimizer = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=lr)
    target = torch.arange(batch_size)
    for step in range(steps):
        images, captions, _ = triples(batch_size, seed, start=step * batch_size)
        texts = clip.prepare(text=captions)
        logits = clip.similarity(clip.encode_image(clip.pixel_values(images)), clip.encode_text(texts.input_ids, texts.attention_mask))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    clip.eval().save_pretrained(out)
    record = {"vision_encoder": VLM, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "final_loss": round(loss.item(), 3)}
    (pathlib.Path(out) / "toy_metrics.json").write_text(json.dumps(record, indent=1))
    return clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_toy_clip(args.out, steps=args.steps)


if __name__ == "__main__":
    main()
