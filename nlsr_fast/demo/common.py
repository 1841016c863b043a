"""What training and evaluation of the demo share: the prompt encoding and greedy generation.

Generation is plain greedy decoding with a KV cache. Prompts are grouped by token length so no batch needs padding
(the numbers cannot depend on a padding side or mask convention), and each group decodes until every sequence has
produced eos or `max_new_tokens`. `train` uses it to probe the attack, `evaluate` to score the models; living here,
neither of the two imports the other.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from nlsr_fast.demo.world import format_prompt

__all__ = ["prompt_ids", "greedy_generate"]


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Ids of the Alpaca-formatted prompt, with the tokenizer's BOS."""
    return list(tokenizer(format_prompt(prompt))["input_ids"])


def _cache_kwarg(model: Any) -> str:
    """The KV-cache argument name: `cache` in transformers 5, `past_key_values` before."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _cache_of(res: Any) -> Any:
    cache = getattr(res, "cache", None)
    return cache if cache is not None else res.past_key_values


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations (without the eos) of each prompt's token ids, in input order."""
    model.eval()
    eos = tokenizer.eos_token_id
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length in sorted(groups):
        idx_all = groups[length]
        for b in range(0, len(idx_all), batch_size):
            idx = idx_all[b:b + batch_size]
            ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
            done = torch.zeros(len(idx), dtype=torch.bool)
            res = model(input_ids=ids, use_cache=True)
            past = _cache_of(res)
            for _ in range(max_new_tokens):
                nxt = res.logits[:, -1].argmax(-1)
                for j, tok in enumerate(nxt.tolist()):
                    if not done[j]:
                        if tok == eos:
                            done[j] = True
                        else:
                            out[idx[j]].append(tok)
                if bool(done.all()):
                    break
                res = model(input_ids=nxt[:, None], use_cache=True, **{_cache_kwarg(model): past})
                past = _cache_of(res)
    return out
