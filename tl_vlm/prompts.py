"""Prompts with the model's image placeholder, as its processor expects them."""

from __future__ import annotations


def format_prompt(processor, prompt: str) -> str:
    """The prompt with the model's image placeholder, through its chat template when it has one."""
    if getattr(processor, "num_query_tokens", None) is not None:
        return prompt  # BLIP-2 / InstructBLIP processors insert the query placeholders themselves
    token = getattr(processor, "image_token", None)
    if token and token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    if token is None:
        raise ValueError("the processor has neither an image token nor a chat template; put the placeholder in the prompt")
    return f"{token}\n{prompt}"
