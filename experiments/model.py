"""Model-side helpers of the end-to-end experiment: LoRA training on a small causal LM, one in-memory base whose
projection weights are swapped for W0 + s*B*A per evaluated adapter, the library's batched greedy decoding
(nlsr_fast.evaluation) that also returns the teacher-forced log-probability of fixed response openings (the judge-free
safety margin).

Everything here is plain torch + transformers/PEFT; nothing calls the realign internals.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nlsr_fast import evaluation
from nlsr_fast.calib.data import format_prompt

__all__ = ["TARGETS", "read_factors", "write_adapter", "encode", "train_lora", "SwapModel", "greedy_with_margins"]

PEFT_PREFIX = "base_model.model."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

log = logging.getLogger("e2e")


def read_factors(adapter: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """{module: (A, B)} in fp32 from a PEFT adapter folder, and its adapter_config.json. Module names are the key
    prefixes before '.lora_A.weight' without PEFT's 'base_model.model.' (as realign's report and masks name them)."""
    import json

    from safetensors.torch import load_file

    adapter = Path(adapter)
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    names = [k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")]
    out = {
        n.removeprefix(PEFT_PREFIX): (sd[f"{n}.lora_A.weight"].float(), sd[f"{n}.lora_B.weight"].float()) for n in names
    }
    return out, json.loads((adapter / "adapter_config.json").read_text())


def write_adapter(
    folder: str | Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config_from: str | Path
) -> Path:
    """A PEFT adapter folder holding `factors` (fp32) with the adapter_config.json of `config_from`."""
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {}
    for n, (a, b) in factors.items():
        n = n if n.startswith(PEFT_PREFIX) else PEFT_PREFIX + n
        sd[f"{n}.lora_A.weight"] = a.detach().float().contiguous()
        sd[f"{n}.lora_B.weight"] = b.detach().float().contiguous()
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(Path(config_from) / "adapter_config.json", folder / "adapter_config.json")
    return folder


def encode(tok: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt ids (Alpaca template, as realign's calibration formats them) and response ids (" " + response + eos)."""
    p = list(tok(format_prompt(prompt))["input_ids"])
    r = list(tok(" " + response, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    return p, r


def train_lora(
    model: Any,
    tok: Any,
    pools: Sequence[tuple[Sequence[tuple[str, str]], float]],
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    name: str,
    max_response_tokens: int = 32,
    warmup: int = 3,
    on_step: Any = None,
) -> list[float]:
    """AdamW on the trainable (LoRA) parameters; each batch item drawn from the pools by weight (seeded).

    Left padding, so every response ends at the last position and only the last K logits are computed (the 49k-word
    head is a large share of the cost). Linear warm-up over the first `warmup` steps, then a constant rate, so the
    first k steps of a longer run are exactly a k-step run (the pilot evaluates checkpoints of one trajectory).
    `on_step(step, model)` is called after each step (1-based).
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    enc = []
    for items, w in pools:
        if w > 0:
            ex = []
            for p, r in items:
                pi, ri = encode(tok, p, r)
                ex.append((pi, ri[:max_response_tokens]))
            enc.append((ex, w))
    weights = [w for _, w in enc]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    losses: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        picks = rng.choices(range(len(enc)), weights=weights, k=batch)
        exs = [rng.choice(enc[i][0]) for i in picks]
        width = max(len(pi) + len(ri) for pi, ri in exs)
        k = max(len(ri) for _, ri in exs)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        att = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, k), -100, dtype=torch.long)
        for i, (pi, ri) in enumerate(exs):
            seq = pi + ri
            ids[i, width - len(seq) :] = torch.tensor(seq)
            att[i, width - len(seq) :] = 1
            labels[i, k - len(ri) :] = torch.tensor(ri)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=k + 1).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.3f", name, step + 1, steps, losses[-1])
        if on_step is not None:
            on_step(step + 1, model)
    model.eval()
    return losses


class SwapModel:
    """One fp32 base model in memory; `load(factors, scale)` sets every adapted projection to W0 + scale*B@A (a merged
    LoRA, exact in fp32), `load(None)` restores the base, `load(None, weights=...)` sets the projections given (a
    dense checkpoint's)."""

    def __init__(self, base: str | Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
        self.params = dict(self.model.named_parameters())
        self.w0: dict[str, torch.Tensor] = {}
        for n, p in self.params.items():
            if n.endswith(".weight") and n.split(".")[-2] in TARGETS:
                self.w0[n] = p.detach().clone()

    @staticmethod
    def param_name(module: str) -> str:
        name = module
        for prefix in ("base_model.model.",):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        return name + ".weight"

    @torch.no_grad()
    def load(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None, scale: float = 1.0,
             weights: Mapping[str, torch.Tensor] | None = None) -> None:
        for n, w in self.w0.items():
            self.params[n].copy_(w)
        for n, w in (weights or {}).items():
            if n not in self.w0:
                raise KeyError(f"weight {n!r} is not a target projection of the base")
            self.params[n].copy_(w)
        if factors is None:
            return
        for module, (a, b) in factors.items():
            n = self.param_name(module)
            if n not in self.w0:
                raise KeyError(f"adapter module {module!r} has no base weight {n!r}")
            self.params[n].add_(scale * (b.float() @ a.float()))


@torch.inference_mode()
def greedy_with_margins(
    model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int, openings: Sequence[str] = (), batch: int = 100
) -> tuple[list[str], list[list[float]]]:
    """The library's greedy decoder (nlsr_fast.evaluation.greedy_with_margins, as `nlsr-fast eval` uses it) on the
    Alpaca-formatted `prompts`: (outputs, logprobs[prompt][opening])."""
    return evaluation.greedy_with_margins(
        model, tok, [format_prompt(p) for p in prompts], max_new_tokens=max_new_tokens, openings=openings, batch=batch
    )
