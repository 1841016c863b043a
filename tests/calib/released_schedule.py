"""Test-only references on the full Hugging Face model + PEFT adapter (no streaming), importable by benches.

* `hf_peft_model`: the base model with the adapter loaded by `PeftModel.from_pretrained`, factors optionally
  overwritten (e.g. amplified), fp32, eval.
* `hook_statistics`: ModuleStats from forward hooks on the `lora_A` linears, response tokens only.
* `released_schedule`: the released code's sequential low_rank schedule: for each layer ℓ run the WHOLE model
  forward over all samples with layers < ℓ already projected, record layer ℓ's inputs, project layer ℓ, continue.
* `per_sample_grad_scores`: snip / pref_snip scores by plain autograd, one sample at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from nlsr_fast.calib.data import CalibrationSet, Sample
from nlsr_fast.calib.engine import ModuleStats
from nlsr_fast.calib.lowrank import project_factors

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


def lora_layers(peft) -> dict[str, torch.nn.Module]:
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


def _response_logprob(logits: torch.Tensor, s: Sample) -> torch.Tensor:
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
    for item in calib.samples:
        if not running:
            peft.zero_grad(set_to_none=False)
        if loss == "nll":
            lp, n = _response_logprob(peft(input_ids=item.input_ids[None]).logits, item)
            L = -lp / n
        else:
            lc, _ = _response_logprob(peft(input_ids=item.chosen.input_ids[None]).logits, item.chosen)
            lr, _ = _response_logprob(peft(input_ids=item.rejected.input_ids[None]).logits, item.rejected)
            with torch.no_grad(), peft.disable_adapter():
                l0c, _ = _response_logprob(peft(input_ids=item.chosen.input_ids[None]).logits, item.chosen)
                l0r, _ = _response_logprob(peft(input_ids=item.rejected.input_ids[None]).logits, item.rejected)
            L = -F.logsigmoid(beta * ((lc - lr) - (l0c - l0r)))
        L.backward()
        for n, (a, b) in params.items():
            acc[n][0].add_(a.grad.abs())
            acc[n][1].add_(b.grad.abs())
    return acc
