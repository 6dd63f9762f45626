"""Greedy decoding with each layer's cache (a KV cache for attention): see what a fine-tuned model answers."""

from __future__ import annotations

from collections.abc import Collection

import torch

from sftplug.model.attention import KVCache

__all__ = ["KVCache", "generate_ids", "answer"]  # KVCache lived here; the attention mixer makes it now


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled blocks have training shapes; a growing cache would recompile
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | Collection[int] | None) -> list[int]:
    """Greedy continuation of ``prompt_ids``, up to the first of the ``eos_id`` (one id or several)."""
    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # each block's own kind of cache; a contract model's block without new_cache() keeps keys and values
    caches = [block.new_cache() if hasattr(block, "new_cache") else KVCache() for block in model.layers]
    ids = torch.tensor([prompt_ids], device=device)  # [1, T]
    positions = torch.arange(len(prompt_ids), device=device)[None]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids, positions, caches=caches)  # [1, T, vocab]
        next_id = int(logits[0, -1].argmax())
        if next_id in stop:
            break
        out.append(next_id)
        positions = positions[:, -1:] + 1
        ids = torch.tensor([[next_id]], device=device)
    model.train(was_training)
    return out


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """The model's greedy answer to one user prompt, rendered with the chat template."""
    text = tokenizer.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    new = generate_ids(model, tokenizer.encode(text), max_new_tokens, tokenizer.stop_ids)
    return tokenizer.decode(new).strip()
