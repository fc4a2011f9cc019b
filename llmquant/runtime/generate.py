"""Greedy/sampled generation with a KV cache, streaming text and timing prefill and decode.

``generate_stream(model, tok, "Hello", max_new_tokens=32, on_text=print)`` ->
``{"prompt_tokens": 2, "new_tokens": 32, "prefill_s": .., "decode_s": .., "prefill_tok_s": ..,
"decode_tok_s": .., "text": "..."}``. Decode speed counts the tokens after the first one (the
first comes out of the prefill pass).
"""
from __future__ import annotations

import time
from typing import Callable

import torch


@torch.inference_mode()
def generate_ids(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 eos_token_id: int | list[int] | None = None, on_token: Callable[[int], None] | None = None,
                 seed: int = 0) -> dict:
    """``input_ids [1, T]`` -> new ids and timings; stops at ``eos_token_id``."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    new: list[int] = []

    def pick(logits: torch.Tensor) -> int:                               # [vocab]
        if temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / temperature, -1)
        return int(torch.multinomial(probs, 1, generator=gen))

    import inspect
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out):
        return getattr(out, "cache", None) if cache_kw == "cache" else out.past_key_values

    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    tok = pick(out.logits[0, -1])
    t1 = time.perf_counter()
    past = cache_of(out)
    new.append(tok)
    if on_token:
        on_token(tok)
    while len(new) < max_new_tokens and tok not in eos:
        out = model(torch.tensor([[tok]], device=device), use_cache=True, **{cache_kw: past})
        past = cache_of(out)
        tok = pick(out.logits[0, -1])
        new.append(tok)
        if on_token:
            on_token(tok)
    t2 = time.perf_counter()
    n_dec = len(new) - 1
    return {"prompt_tokens": ids.shape[1], "new_tokens": len(new), "ids": new,
            "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "prefill_tok_s": ids.shape[1] / (t1 - t0),
            "decode_tok_s": n_dec / (t2 - t1) if n_dec > 0 and t2 > t1 else float("nan")}


def generate_stream(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                    on_text: Callable[[str], None] | None = None, chat: bool = False, seed: int = 0) -> dict:
    """Tokenize ``prompt`` (through the chat template if ``chat``), generate, stream decoded text."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.bos_token_id or 0]])
    state = {"ids": [], "printed": ""}

    def on_token(t: int) -> None:
        state["ids"].append(t)
        text = tokenizer.decode(state["ids"], skip_special_tokens=True)
        if on_text and len(text) > len(state["printed"]) and not text.endswith("\ufffd"):
            on_text(text[len(state["printed"]):])
            state["printed"] = text

    r = generate_ids(model, ids, max_new_tokens, temperature, tokenizer.eos_token_id, on_token, seed)
    r["text"] = tokenizer.decode(r["ids"], skip_special_tokens=True)
    if on_text and len(r["text"]) > len(state["printed"]):
        on_text(r["text"][len(state["printed"]):])
    return r
