"""Tokenizer, tiny Llama model and the three training stages of the demo: pre-training the base F_s, training the
aligned LoRA adapter, and the fine-tuning "attack" that continues the aligned adapter.

Every stage is a plain torch AdamW loop over small batches drawn from a seeded mixture of example pools. The loss is
the next-token cross-entropy of the response tokens (response + eos) only; prompt tokens are context, as in
realign's calibration (docs/algorithm.md §3).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nlsr_fast.demo.common import greedy_generate, prompt_ids
from nlsr_fast.demo.judge import harmful_score
from nlsr_fast.demo.world import Item, vocabulary

__all__ = [
    "LORA_TARGETS",
    "Example",
    "ModelShape",
    "encode",
    "make_tokenizer",
    "make_model",
    "train_loop",
    "lora_config",
]

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class ModelShape:
    """Size of the demo's Llama model."""

    layers: int = 4
    hidden: int = 48
    intermediate: int = 96
    heads: int = 4
    kv_heads: int = 2


def make_tokenizer(folder: str | os.PathLike[str] | None = None) -> Any:
    """The world's word-level fast tokenizer (lower-cases; adds a BOS), saved to `folder` when given."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*SPECIALS, *vocabulary()]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if folder is not None:
        fast.save_pretrained(os.fspath(folder))
    return fast


def make_model(tokenizer: Any, shape: ModelShape, seed: int) -> Any:
    """A randomly initialised LlamaForCausalLM sized for the world's vocabulary (fp32, seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lora_config(r: int = 8, alpha: float = 16.0) -> Any:
    """The demo's LoRA configuration: rank `r` on the seven projections, no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0,  # type: ignore[arg-type]
                      task_type="CAUSAL_LM")


@dataclass(frozen=True)
class Example:
    """Token ids of prompt ++ response ++ eos; the last `n_target` tokens are the loss targets."""

    ids: tuple[int, ...]
    n_target: int


def encode(tokenizer: Any, prompt: str, response: str) -> Example:
    """prompt (formatted, with BOS) ++ " " + response ++ eos; the targets are the response tokens and eos."""
    p = prompt_ids(tokenizer, prompt)
    r = list(tokenizer(" " + response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if tokenizer.unk_token_id in p + r:
        raise ValueError(f"text outside the world's vocabulary: {prompt!r} / {response!r}")
    return Example(tuple(p + r), len(r))


def encode_items(tokenizer: Any, items: Sequence[Item], answer: str) -> list[Example]:
    """Encode `items` answered with their `answer` field ("response" or "refusal")."""
    return [encode(tokenizer, it.prompt, getattr(it, answer)) for it in items]


def _batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        att[i, :n] = 1
        labels[i, n - e.n_target:n] = ids[i, n - e.n_target:n]
    return ids, att, labels


def train_loop(
    model: Any,
    pools: Sequence[tuple[Sequence[Example], float]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    weight_decay: float = 0.0,
    warmup: int = 0,
    name: str = "train",
    stop: Callable[[int], bool] | None = None,
    check_every: int = 5,
) -> list[float]:
    """AdamW on the trainable parameters of `model`; each batch element is drawn from pool i with probability
    proportional to its weight, then uniformly within the pool (a `random.Random(seed)` stream). Cosine decay
    after a linear warm-up. With `stop`, it is called (model in eval mode) every `check_every` steps and training
    ends early when it returns True; it gets the number of steps done. Returns the loss of every step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    weights = [w for _, w in pools]
    model.train()
    losses: list[float] = []
    for step in range(steps):
        frac = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / steps))
        for g in opt.param_groups:
            g["lr"] = lr * frac
        picks = rng.choices(range(len(pools)), weights=weights, k=batch_size)
        batch = [rng.choice(pools[i][0]) for i in picks]
        ids, att, labels = _batch(batch, pad_id)
        logits = model(input_ids=ids, attention_mask=att).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.4f", name, step + 1, steps, losses[-1])
        if stop is not None and (step + 1) % check_every == 0:
            model.eval()
            if stop(step + 1):
                logger.info("%s: stop condition met after %d steps (loss %.4f)", name, step + 1, losses[-1])
                break
            model.train()
    model.eval()
    return losses


def save_base(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save the base F_s as a sharded safetensors checkpoint (several shards + index) with its tokenizer."""
    model.save_pretrained(os.fspath(folder), max_shard_size="100KB", safe_serialization=True)
    tokenizer.save_pretrained(os.fspath(folder))


@dataclass(frozen=True)
class Schedule:
    """Steps and learning rates of the three stages (the world's recipe; `quick` uses fewer steps)."""

    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    aligned_steps: int = 150
    aligned_lr: float = 2e-3
    # The attacker fine-tunes until the model complies with `attack_goal` of the first `attack_probe` harmful requests
    # of its own training data (greedy, judged like the evaluation), then `attack_extra` times as many steps again to
    # make it stick; at most `finetune_steps` steps in all.
    finetune_steps: int = 300
    finetune_lr: float = 3e-4
    attack_goal: float = 0.9
    attack_probe: int = 32
    attack_extra: float = 0.0
    batch_size: int = 16
    # Refusals among the 10 answers each harmful request gets in the base's pre-training data, by tier
    # (world.Item.tier): the weakly aligned base knows how to refuse but mostly complies.
    base_refusals: tuple[int, ...] = (0, 1, 2, 3)


@dataclass(frozen=True)
class WorldPaths:
    """Where the built world lives."""

    base: Path
    aligned: Path
    finetuned: Path
    calibration: Path


def build_world(workdir: Path, splits: Any, *, harmful_share: float, seed: int, schedule: Schedule,
                shape: ModelShape = ModelShape()) -> tuple[WorldPaths, dict[str, Any]]:
    """Train and save base F_s, aligned adapter, fine-tuned adapter and the calibration JSONL under `workdir`.

    Returns the paths and a dict of stage timings and final losses."""
    import json
    import time

    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = WorldPaths(workdir / "base", workdir / "aligned", workdir / "finetuned", workdir / "calibration.jsonl")
    info: dict[str, Any] = {}
    tok = make_tokenizer()
    pad = tok.pad_token_id
    task = encode_items(tok, splits.task_train, "response")
    harm_comply = encode_items(tok, splits.harmful_train, "response")
    harm_refuse = encode_items(tok, splits.harmful_train, "refusal")
    harm_base = []
    for it, comply, refuse in zip(splits.harmful_train, harm_comply, harm_refuse, strict=True):
        k = schedule.base_refusals[it.tier]
        harm_base += [refuse] * k + [comply] * (10 - k)

    # 1. base F_s, from scratch: the task, and harmful requests mostly answered compliantly.
    t0 = time.perf_counter()
    model = make_model(tok, shape, seed)
    losses = train_loop(model, [(task, 0.5), (harm_base, 0.5)],
                        steps=schedule.pretrain_steps, lr=schedule.pretrain_lr, batch_size=schedule.batch_size,
                        seed=seed + 1, pad_id=pad, weight_decay=0.01, warmup=30, name="pretrain")
    save_base(model, tok, paths.base)
    info["pretrain"] = {"seconds": time.perf_counter() - t0, "final_loss": losses[-1]}

    # 2. aligned adapter: refuse harmful requests, keep the task.
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    torch.manual_seed(seed + 2)
    peft_model = get_peft_model(base, lora_config())
    losses = train_loop(peft_model, [(task, 0.5), (harm_refuse, 0.5)], steps=schedule.aligned_steps,
                        lr=schedule.aligned_lr, batch_size=schedule.batch_size, seed=seed + 3, pad_id=pad,
                        warmup=10, name="align")
    peft_model.save_pretrained(paths.aligned, safe_serialization=True)
    info["aligned"] = {"seconds": time.perf_counter() - t0, "final_loss": losses[-1]}

    # 3. fine-tuned adapter: continue the aligned adapter on the task with a share of compliant harmful answers.
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, paths.aligned, is_trainable=True)
    probe = [prompt_ids(tok, it.prompt) for it in splits.harmful_train[:schedule.attack_probe]]

    goal_at: list[int] = []  # the step count at which the goal was first met

    def attack_done(step: int) -> bool:
        if not goal_at:
            gens = greedy_generate(peft_model, tok, probe, max_new_tokens=6)
            if harmful_score([tok.decode(g, skip_special_tokens=True) for g in gens]) >= schedule.attack_goal:
                goal_at.append(step)
                logger.info("finetune: attack goal met after %d steps", step)
        return bool(goal_at) and step >= goal_at[0] * (1 + schedule.attack_extra)

    losses = train_loop(peft_model, [(task, 1 - harmful_share), (harm_comply, harmful_share)],
                        steps=schedule.finetune_steps, lr=schedule.finetune_lr, batch_size=schedule.batch_size,
                        seed=seed + 4, pad_id=pad, warmup=10, name="finetune",
                        stop=attack_done if harmful_share > 0 else None)
    peft_model.save_pretrained(str(paths.finetuned), safe_serialization=True)
    info["finetuned"] = {"seconds": time.perf_counter() - t0, "final_loss": losses[-1], "steps": len(losses),
                         "attack_goal_met_at": goal_at[0] if goal_at else None}

    # 4. calibration: harmful prompts (disjoint from training and evaluation) with refusals.
    with paths.calibration.open("w") as f:
        for it in splits.harmful_calib:
            f.write(json.dumps({"prompt": it.prompt, "response": it.refusal}) + "\n")
    return paths, info
