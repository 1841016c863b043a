"""References on the full Hugging Face model (no streaming) that the streamed calibration engine is tested and
benchmarked against. They need `transformers` (and `peft` for the LoRA ones), load the whole model, and are meant
for tiny models: tests and benches, never the realign path.

* `hf_peft_model`: the base model with the adapter loaded by `PeftModel.from_pretrained`, factors optionally
  overwritten (e.g. amplified), fp32, eval.
* `hook_statistics`: ModuleStats from forward hooks on the `lora_A` linears, response tokens only.
* `released_schedule`: the released code's sequential low_rank schedule: for each layer ℓ run the WHOLE model
  forward over all samples with layers < ℓ already projected, record layer ℓ's inputs, project layer ℓ, continue.
* `per_sample_grad_scores`: snip / pref_snip scores by plain autograd, one sample at a time.
* `hf_dense_model`: a full model from a checkpoint folder with some tensors replaced (a dense reference).
* `dense_hook_statistics`: DenseStats (Σ_t x_t² of the input of each target linear) from forward hooks.
* `dense_per_sample_grad_scores`: Σ_n |∂L_n/∂W| of each target weight by plain autograd, one sample at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nlsr_fast.calib.data import CalibrationSet, Sample
from nlsr_fast.calib.lowrank import project_factors
from nlsr_fast.calib.statistics import DenseStats, ModuleStats

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def hf_peft_model(base: str | os.PathLike[str], adapter: str | os.PathLike[str], factors: Factors | None = None,
                  dtype: torch.dtype = torch.float32):
    """PeftModel.from_pretrained(base, adapter) in `dtype`, eval, lora weights trainable, factors overwritten."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.fspath(base), dtype=dtype)
    peft = PeftModel.from_pretrained(model, os.fspath(adapter), is_trainable=True)
    peft.eval()
    for n, p in peft.named_parameters():
        p.requires_grad_("lora_" in n)
    if factors is not None:
        set_factors(peft, factors)
    return peft


def lora_layers(peft: Any) -> dict[str, Any]:
    """Module name as in the adapter ("model.layers.0.self_attn.q_proj") → the PEFT LoraLayer."""
    out = {}
    for name, mod in peft.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = mod
    return out


def set_factors(peft, factors: dict[str, tuple]) -> None:
    """Write (A, B[, scale]) into the PEFT model's lora_A / lora_B (and scaling)."""
    mods = lora_layers(peft)
    with torch.no_grad():
        for name, fac in factors.items():
            m = mods[name]
            m.lora_A["default"].weight.copy_(fac[0])
            m.lora_B["default"].weight.copy_(fac[1])
            if len(fac) > 2:
                m.scaling["default"] = float(fac[2])


def _padded(seqs: Sequence[Sample], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(seqs[i].n_tokens for i in idx)
    ids = torch.zeros(len(idx), T, dtype=torch.long)
    att = torch.zeros(len(idx), T, dtype=torch.long)
    resp = torch.zeros(len(idx), T, dtype=torch.bool)
    for j, i in enumerate(idx):
        n = seqs[i].n_tokens
        ids[j, :n], att[j, :n], resp[j, :n] = seqs[i].input_ids, 1, seqs[i].response_mask
    return ids, att, resp


@torch.no_grad()
def hook_statistics(peft, calib: CalibrationSet, names: Sequence[str] | None = None,
                    batch_size: int = 1) -> dict[str, ModuleStats]:
    """ModuleStats of `names` (default all) from hooks on lora_A, one whole-model forward per batch."""
    mods = lora_layers(peft)
    names = list(mods) if names is None else list(names)
    state: dict[str, torch.Tensor] = {}
    stats: dict[str, ModuleStats] = {}
    handles = []
    for n in names:
        lin = mods[n].lora_A["default"]
        r, d_in = lin.weight.shape
        stats[n] = ModuleStats(torch.zeros(r, r, dtype=torch.float64), torch.zeros(d_in, dtype=torch.float64),
                               torch.zeros(r, dtype=torch.float64))

        def hook(_m, inputs, output, n=n):
            mask = state["mask"]
            x = inputs[0][mask].double()
            z = output[mask].double()
            st = stats[n]
            st.gram += z.T @ z
            st.x_sq += x.square().sum(0)
            st.z_sq += z.square().sum(0)
            st.n_tokens += int(mask.sum())
            st.n_samples += int(mask.any(1).sum())

        handles.append(lin.register_forward_hook(hook))
    seqs = calib.sequences()
    try:
        for start in range(0, len(seqs), batch_size):
            ids, att, resp = _padded(seqs, list(range(start, min(start + batch_size, len(seqs)))))
            state["mask"] = resp
            peft(input_ids=ids, attention_mask=att)
    finally:
        for h in handles:
            h.remove()
    return stats


def released_schedule(peft, calib: CalibrationSet, sparsity: float, n_layers: int, batch_size: int = 1,
                      project: Callable | None = None) -> tuple[dict[str, ModuleStats], dict[str, tuple]]:
    """The released sequential low_rank schedule on a full PEFT model (modified in place).

    Returns (stats of every module as recorded just before its layer was projected, projected (A, B) per module).
    """
    project = project or project_factors
    mods = lora_layers(peft)
    all_stats: dict[str, ModuleStats] = {}
    projected: dict[str, tuple] = {}
    for layer in range(n_layers):
        names = [n for n in mods if n.startswith(f"model.layers.{layer}.")]
        stats = hook_statistics(peft, calib, names, batch_size=batch_size)
        new = {}
        for n in names:
            A = mods[n].lora_A["default"].weight.detach().clone()
            B = mods[n].lora_B["default"].weight.detach().clone()
            new[n] = project(A, B, stats[n].gram, sparsity)
        set_factors(peft, new)
        all_stats.update(stats)
        projected.update(new)
    return all_stats, projected


def _response_logprob(logits: torch.Tensor, s: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, s.input_ids[1:, None])[:, 0]
    tgt = s.response_mask[1:]
    return (lp * tgt).sum(), tgt.sum()


def per_sample_grad_scores(peft, calib: CalibrationSet, loss: str = "nll", beta: float = 0.1,
                           running: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Σ_n |∂L_n/∂A|, Σ_n |∂L_n/∂B| by full-model autograd, sample by sample (never zeroed when `running`)."""
    mods = lora_layers(peft)
    params = {n: (m.lora_A["default"].weight, m.lora_B["default"].weight) for n, m in mods.items()}
    acc = {n: (torch.zeros_like(a), torch.zeros_like(b)) for n, (a, b) in params.items()}
    peft.zero_grad(set_to_none=False)
    item: Any
    for item in calib.samples:
        if not running:
            peft.zero_grad(set_to_none=False)
        if loss == "nll":
            lp, cnt = _response_logprob(peft(input_ids=item.input_ids[None]).logits, item)
            L = -lp / cnt
        else:
            lc, _ = _response_logprob(peft(input_ids=item.chosen.input_ids[None]).logits, item.chosen)
            lr, _ = _response_logprob(peft(input_ids=item.rejected.input_ids[None]).logits, item.rejected)
            with torch.no_grad(), peft.disable_adapter():
                l0c, _ = _response_logprob(peft(input_ids=item.chosen.input_ids[None]).logits, item.chosen)
                l0r, _ = _response_logprob(peft(input_ids=item.rejected.input_ids[None]).logits, item.rejected)
            L = -F.logsigmoid(beta * ((lc - lr) - (l0c - l0r)))
        L.backward()
        for name, (a, b) in params.items():
            acc[name][0].add_(a.grad.abs())
            acc[name][1].add_(b.grad.abs())
    return acc


def hf_dense_model(base: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor] | None = None,
                   dtype: torch.dtype = torch.float32) -> Any:
    """AutoModelForCausalLM.from_pretrained(base) in `dtype`, eval, frozen, with `tensors` (checkpoint names) loaded
    over its weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.fspath(base), dtype=dtype)
    if tensors:
        sd = model.state_dict()
        unknown = sorted(set(tensors) - set(sd))
        if unknown:
            raise ValueError(f"tensors not in the model: {unknown[:3]}")
        with torch.no_grad():
            for k, t in tensors.items():
                sd[k].copy_(t)
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def dense_hook_statistics(model: Any, calib: CalibrationSet, targets: Sequence[str],
                          batch_size: int = 1) -> dict[str, DenseStats]:
    """DenseStats of each target linear ("model.layers.0.mlp.down_proj") from forward hooks, one whole-model forward
    per batch, response tokens only, float64."""
    stats: dict[str, DenseStats] = {}
    state: dict[str, torch.Tensor] = {}
    handles = []
    for n in targets:
        lin = model.get_submodule(n)
        stats[n] = DenseStats(torch.zeros(lin.in_features, dtype=torch.float64))

        def hook(_m: Any, inputs: Any, output: Any, n: str = n) -> None:
            mask = state["mask"]
            x = inputs[0][mask].double()
            st = stats[n]
            st.x_sq += x.square().sum(0)
            st.n_tokens += int(mask.sum())
            st.n_samples += int(mask.any(1).sum())

        handles.append(lin.register_forward_hook(hook))
    seqs = calib.sequences()
    try:
        for start in range(0, len(seqs), batch_size):
            ids, att, resp = _padded(seqs, list(range(start, min(start + batch_size, len(seqs)))))
            state["mask"] = resp
            model(input_ids=ids, attention_mask=att)
    finally:
        for h in handles:
            h.remove()
    return stats


def dense_per_sample_grad_scores(model: Any, calib: CalibrationSet, targets: Sequence[str],
                                 running: bool = False) -> dict[str, torch.Tensor]:
    """Σ_n |∂L_n/∂W| of each target weight by full-model autograd, sample by sample, L_n the mean NLL of sample n's
    response tokens (with `running`, gradients are never zeroed: Σ_n |Σ_{j≤n} ∂L_j/∂W|)."""
    weights = {n: model.get_submodule(n).weight for n in targets}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    acc = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    try:
        item: Any
        for item in calib.samples:
            if not running:
                for w in weights.values():
                    w.grad = None
            lp, cnt = _response_logprob(model(input_ids=item.input_ids[None]).logits, item)
            (-lp / cnt).backward()
            for n, w in weights.items():
                assert w.grad is not None
                acc[n] += w.grad.double().abs()
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
    return acc
