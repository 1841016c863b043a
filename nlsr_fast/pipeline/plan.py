"""Dry run: what a realign run would do, from headers and the calibration file alone (nothing is written)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from nlsr_fast.calib.data import MAX_LINE_BYTES, read_calibration_records
from nlsr_fast.config import Preset, RealignConfig

__all__ = ["calibration_summary", "format_plan", "make_plan"]

log = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
# Rough sustained throughputs of a layer-streamed forward, in FLOP/s, for the time estimate only.
_FLOPS = {"cpu": 5e10, "cuda": 1e14}
# Template + instruction tokens around a prompt (Alpaca header ~ 40 tokens); chars per token of English text.
_TEMPLATE_TOKENS = 40
_CHARS_PER_TOKEN = 4.0


def calibration_summary(
    path: str | Path,
    *,
    nsamples: int,
    max_response_tokens: int,
    pairs: bool,
    preset: Preset | str = "paper",
    max_line_bytes: int = MAX_LINE_BYTES,
) -> dict[str, Any]:
    """Records in the JSONL file, how many would be used and an estimate of their tokens (no tokenizer).

    Every line goes through the same parser and checks as the real run's `load_calibration`
    (`read_calibration_records`), so a dry run raises the same ValueError (file:line) on a bad line, a folder, a
    missing or empty file, a line over `max_line_bytes` or bytes that are not UTF-8.
    """
    cfile = read_calibration_records(path, pairs=pairs, preset=preset, max_line_bytes=max_line_bytes)
    records = len(cfile.records)
    chars = 0
    resp_chars = 0
    for rec in cfile.records:
        chars += len(rec.prompt)
        for text in rec.responses:
            resp_chars += min(len(text), int(max_response_tokens * _CHARS_PER_TOKEN))
    used = min(records, nsamples)
    per = 2 if pairs else 1
    tokens = used * (per * (_TEMPLATE_TOKENS + chars / records / _CHARS_PER_TOKEN)
                     + resp_chars / records / _CHARS_PER_TOKEN)
    return {"path": str(cfile.path), "records": records, "samples_used": used, "sequences": used * per,
            "tokens_estimate": int(tokens), "sha256": cfile.sha256}


def _layer_bytes(base: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for key in base.keys():
        m = _LAYER_RE.search(key)
        if m:
            info = base.info(key)
            out[int(m.group(1))] = out.get(int(m.group(1)), 0) + int(info.nbytes)
    return out


def make_plan(
    config: RealignConfig,
    *,
    base: Any,
    finetuned: Any,
    reference_given: bool,
    calibration: dict[str, Any] | None,
    device: str,
    paths: dict[str, str | None],
    mode: str = "lora",
    modules: list[str] | None = None,
    repair_flops: float | None = None,
) -> dict[str, Any]:
    """The dry-run plan.

    Args:
        config: the run's configuration.
        base: io.CheckpointReader of the base checkpoint (headers only).
        finetuned: io.LoraAdapter of the fine-tuned adapter.
        reference_given: whether a ready reference adapter replaces amplification.
        calibration: `calibration_summary` of the calibration file, or None.
        device: the device the run would use.
        paths: the input and output paths.
        repair_flops: the FLOPs of the method's own per-module arithmetic when they matter (safelora in dense mode).
    Returns:
        A JSON-able dict: modules (name, layer, rank, shapes), counts, calibration, memory and time estimates.
    """
    from nlsr_fast.io.adapter import layer_of

    records = []
    for name in (finetuned.modules if modules is None else modules):
        layer = layer_of(name)
        if mode == "dense":
            shape = list(finetuned.shape(f"{name}.weight"))
            records.append({"name": name, "layer": layer, "rank": None, "shape_a": shape, "shape_b": []})
            continue
        m = finetuned.module(name)
        records.append({"name": name, "layer": layer, "rank": m.rank,
                        "shape_a": [m.rank, m.d_in], "shape_b": [m.d_out, m.rank]})
    modules_out = records
    layer_bytes = _layer_bytes(base)
    largest = max(layer_bytes.values(), default=0)
    hidden = int(base.config.get("hidden_size", 0) or 0)
    n_params = sum(int(base.info(k).nbytes) // max(base.dtype(k).itemsize, 1) for k in base.keys())
    needs_calib = config.method_spec.needs_calibration
    tokens = calibration["tokens_estimate"] if calibration else 0
    act_bytes = 4 if config.calib_dtype == "float32" else 2
    # Streamed calibration keeps every sequence's hidden state at one layer boundary, in and out.
    activations = 2 * tokens * hidden * act_bytes if needs_calib else 0
    if config.method_spec.gradients:
        passes = 3.0  # forward + backward (about twice a forward)
    elif config.sequential and needs_calib:
        passes = 2.0  # the layer again with its projected / masked factors
    else:
        passes = 1.0 if needs_calib else 0.0
    flops = 2.0 * n_params * tokens * passes
    dev = "cuda" if device.startswith("cuda") else "cpu"
    adapter_bytes = int(finetuned.nbytes) if mode == "lora" else 0
    return {
        "paths": paths,
        "config": config.to_dict(),
        "device": device,
        "reference": _reference_line(config, reference_given),
        "mode": mode,
        "modules": modules_out,
        "counts": {"modules": len(modules_out), "layers": len(layer_bytes), "base_tensors": len(base.keys())},
        "calibration": calibration,
        "estimate": {
            "peak_memory_bytes": int(largest + 3 * adapter_bytes + activations),
            "largest_layer_bytes": int(largest),
            "activation_bytes": int(activations),
            "base_read_bytes": int(base.nbytes) if needs_calib else 0,
            "calibration_flops": flops,
            "repair_flops": repair_flops,
            "seconds": round(flops / _FLOPS[dev] + adapter_bytes * 6 / 1e9, 1),
        },
    }


def _reference_line(config: RealignConfig, given: bool) -> str:
    """What the plan says the run compares with: NLSR's reference, or what the other defences use instead."""
    repair = config.method_spec.repair
    if repair == "project":
        return "none: the projection on the aligned model's change from the base (V = W_a - W_0)"
    if repair == "add":
        return f"none: beta {config.beta} x (aligned - unaligned) added to the fine-tuned weights"
    if repair == "prune":
        return "none: the fine-tuned model's own weights are scored and pruned"
    return "given" if given else f"amplified aligned adapter ({config.preset} preset)"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text for stdout."""
    cfg = plan["config"]
    lines = [f"dry run: nothing written; would write {plan['paths'].get('out')}",
             f"{plan['mode']} mode, preset {cfg['preset']}, method {cfg['method']}, sparsity {cfg['sparsity']}, "
             f"selection {cfg['selection']}, device {plan['device']}",
             f"reference: {plan['reference']}",
             f"{plan['counts']['modules']} modules matched over {plan['counts']['layers']} layers:"]
    shown = plan["modules"] if len(plan["modules"]) <= 16 else plan["modules"][:8] + [None] + plan["modules"][-7:]
    for m in shown:
        if m is None:
            lines.append("  ...")
            continue
        lines.append(f"  {m['name']:<50} layer {m['layer']:>3}  r={str(m['rank']):<4} A {tuple(m['shape_a'])} "
                     f"B {tuple(m['shape_b'])}")
    cal = plan.get("calibration")
    if cal:
        lines.append(f"calibration: {cal['samples_used']} of {cal['records']} samples from {cal['path']} "
                     f"(~{cal['tokens_estimate']} tokens)")
    else:
        lines.append(f"calibration: none (method {cfg['method']})")
    est = plan["estimate"]
    lines.append(f"estimate: peak memory ~{_human(est['peak_memory_bytes'])} (largest layer "
                 f"{_human(est['largest_layer_bytes'])}, activations {_human(est['activation_bytes'])}), "
                 f"reads ~{_human(est['base_read_bytes'])} of base, ~{est['seconds']:.0f} s (rough)")
    if est.get("repair_flops"):
        lines.append(f"{cfg['method']}: C dW costs {est['repair_flops'] / 1e12:.3g} TFLOP over the modules")
    return "\n".join(lines)
