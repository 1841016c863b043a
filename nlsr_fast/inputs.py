"""A run's inputs: the base, aligned, fine-tuned (and reference) models and the calibration data, opened and
checked from their headers before any computation, and the mode they call for (docs/architecture.md, "One run,
step by step")."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nlsr_fast import methods
from nlsr_fast.config import RealignConfig
from nlsr_fast.io.finite import NonFinite

__all__ = ["Inputs", "check_calibration_file", "load_calibration_for", "open_inputs", "resolve_device"]

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """The run's inputs, opened and checked (headers only), and what the mode needs of them."""

    mode: str
    base: Any
    finetuned: Any
    aligned: Any
    reference: Any
    modules: list[str]
    paths: dict[str, Path | None]
    calibration: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    extra_records: list[dict[str, Any]] = field(default_factory=list)
    hub: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> Hub id, revision, commit (report.json)
    unaligned: Any = None  # resta's unaligned model (dense mode), None for the base

    def record(self, role: str, **fields: Any) -> dict[str, Any]:
        """`fields` of an input's report.json record, plus its Hub id, revision and commit when it was given by id."""
        return {**fields, **({"hub": self.hub[role]} if role in self.hub else {})}

    def files(self, role: str) -> list[Path]:
        model = {"finetuned": self.finetuned, "aligned": self.aligned, "reference": self.reference,
                 "unaligned": self.unaligned}.get(role)
        if role == "base":
            folder = self.base.folder
            meta = [p for p in (folder / "config.json", self.base.index_file) if p is not None and p.is_file()]
            return [*meta, *self.base.files]
        if role == "calibration":
            return [self.paths["calibration"]] if self.paths["calibration"] is not None else []
        return list(model.files) if model is not None else []


def _is_adapter(path: Path) -> bool:
    from nlsr_fast.io.adapter import ADAPTER_CONFIG

    return (path / ADAPTER_CONFIG).is_file()


def _open_model(role: str, path: Path, base: Any, nonfinite: NonFinite) -> Any:
    """A LoraAdapter when `path` is an adapter folder, else a CheckpointReader; names the role on failure."""
    from nlsr_fast.io import CheckpointReader, LoraAdapter

    if not path.is_dir():
        raise ValueError(f"{role} {path} does not exist or is not a folder")
    if _is_adapter(path):
        return LoraAdapter.load(path)
    try:
        return CheckpointReader(path, streamed=True)
    except ValueError as exc:
        raise ValueError(f"{role} {path} is neither a PEFT adapter (no adapter_config.json) nor a checkpoint: "
                         f"{exc}") from None


def _lora_compatible(ft: Any, aligned: Any) -> str | None:
    """None when LoRA mode applies (both adapters, same modules and ranks), else why not."""
    from nlsr_fast.io import LoraAdapter, check_compatible

    if not isinstance(ft, LoraAdapter) or not isinstance(aligned, LoraAdapter):
        return "the fine-tuned and aligned inputs are not both LoRA adapters"
    try:
        check_compatible(ft, aligned)
    except ValueError as exc:
        return str(exc)
    return None


def _resolve_mode(config: RealignConfig, ft: Any, aligned: Any, reference: Any) -> str:
    why_not = _lora_compatible(ft, reference if reference is not None else aligned)
    if config.mode == "lora" and why_not is not None:
        raise ValueError(f"mode lora: {why_not}")
    if why_not is None and "lora" not in config.method_spec.modes:  # auto: a dense-only method merges the adapters
        why_not = f"method {config.method!r} runs in dense mode only"
    mode = config.mode if config.mode != "auto" else ("lora" if why_not is None else "dense")
    try:
        methods.get(config.method, mode)
    except ValueError as exc:
        detail = "" if config.mode != "auto" else f" (mode auto chose {mode}: {why_not or 'adapters match'})"
        raise ValueError(f"{exc}{detail}") from None
    log.info("mode %s%s", mode, "" if config.mode != "auto" else " (auto)")
    return mode


def open_inputs(config: RealignConfig, base_p: Path, aligned_p: Path, ft_p: Path, ref_p: Path | None,
                 calib_p: Path | None, nonfinite: NonFinite, unaligned_p: Path | None = None) -> Inputs:
    """Open and check every input from headers alone, before any computation (a dry run stops after this)."""
    from nlsr_fast.io import CheckpointReader, check_adapter_matches_base, check_compatible

    if not base_p.is_dir():
        raise ValueError(f"base {base_p} does not exist or is not a folder")
    base = CheckpointReader(base_p, streamed=True)
    ft = _open_model("fine-tuned", ft_p, base, nonfinite)
    aligned = _open_model("aligned", aligned_p, base, nonfinite)
    reference = _open_model("reference", ref_p, base, nonfinite) if ref_p is not None else None
    if unaligned_p is not None and "unaligned" not in config.method_spec.options:
        users = [n for n, m in methods.METHODS.items() if "unaligned" in m.options]
        raise ValueError(f"an unaligned model (--unaligned {unaligned_p}) applies to {users}, not to method "
                         f"{config.method!r}")
    unaligned = _open_model("unaligned", unaligned_p, base, nonfinite) if unaligned_p is not None else None
    mode = _resolve_mode(config, ft, aligned, reference)
    paths = {"base": base_p, "aligned": aligned_p, "finetuned": ft_p, "reference": ref_p, "unaligned": unaligned_p,
             "calibration": calib_p}
    if mode == "lora":
        from nlsr_fast.lora import plan_extras

        check_compatible(ft, aligned)
        if reference is not None:
            check_compatible(ft, reference)
        check_adapter_matches_base(ft, base)
        if len(ft.modules) == 0:
            raise ValueError(f"fine-tuned adapter {ft_p} has no LoRA modules")
        for adapter in (ft, aligned, reference):
            _check_float_factors(adapter)
        extras, records = plan_extras(ft, aligned, base, config.extra_tensors, nonfinite)
        inputs = Inputs(mode, base, ft, aligned, reference, ft.modules, paths, extras=extras, extra_records=records)
    else:
        inputs = _open_dense(config, base, ft, aligned, reference, paths, nonfinite, unaligned)
    if config.method_spec.repair == "project":
        _check_projection(config, inputs)
    check_calibration_file(config, calib_p)
    check_calibrated_architecture(config, base)
    return inputs


def _check_projection(config: RealignConfig, inputs: Inputs) -> None:
    """safelora, before any long computation: no --reference (it projects on the aligned model's own change); in
    LoRA mode every module's aligned change V is non-zero (the factors are small: read them all); in dense mode, an
    aligned adapter adapts every target (V is then its rank-r change), and the GEMMs of a full-rank V (a full aligned
    checkpoint) fit the CPU budget (from the shapes alone).
    A full aligned checkpoint equal to the base in a module is found when pass 1 reads it."""
    from nlsr_fast.methods import safelora

    if inputs.reference is not None:
        raise ValueError(f"method {config.method!r} projects on the aligned model's own change (V = W_aligned - "
                         "W_base); a reference (--reference) does not apply")
    if inputs.mode == "lora":
        from nlsr_fast.dense import adapter_factors

        for name in inputs.modules:
            a, b, _ = adapter_factors(inputs.aligned, name, None)
            if float(safelora.change_norm(b, a)) == 0.0:
                raise safelora.no_delta(name)
        return
    adapter = inputs.aligned.adapter  # dense mode from an aligned adapter: a module it does not adapt has V = 0
    if adapter is not None:
        missing = [name for name in inputs.modules if name not in adapter]
        if missing:
            raise safelora.no_delta(missing[0])
        return  # V = s B A is rank r: two thin GEMMs per module (4 r d_out d_in FLOPs), no budget to check
    if resolve_device(config.device).type != "cpu":
        return
    shapes = [inputs.finetuned.shape(f"{name}.weight") for name in inputs.modules]
    flops = sum(safelora.dense_flops(*shape) for shape in shapes)
    if flops > safelora.CPU_FLOP_LIMIT:
        raise ValueError(f"method {config.method!r} in dense mode on a CPU: C dW for {len(shapes)} modules costs "
                         f"{flops / 1e12:.0f} TFLOP (4 d_out d_in min(d_out, d_in) each), above the "
                         f"{safelora.CPU_FLOP_LIMIT / 1e12:.0f} TFLOP this tool runs on a CPU (hours at CPU speed); "
                         "run it on a GPU (--device cuda), or on fewer modules (--targets)")


def _check_float_factors(adapter: Any) -> None:
    """LoRA factors must be float32, float16 or bfloat16 (an integer tensor would fail deep inside a stage)."""
    if adapter is None:
        return
    for name in adapter.modules:
        m = adapter.module(name)
        for key in (m.key_a, m.key_b):
            dtype = adapter.raw_dtype(key)
            if dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{adapter.weights_file}: tensor {key!r} is {str(dtype).replace('torch.', '')}; LoRA "
                                 "factors must be float32, float16 or bfloat16")


def _open_dense(config: RealignConfig, base: Any, ft: Any, aligned: Any, reference: Any,
                paths: dict[str, Path | None], nonfinite: NonFinite, unaligned: Any = None) -> Inputs:
    from nlsr_fast.dense import DEFAULT_TARGETS, DenseInput, dense_targets
    from nlsr_fast.io import LoraAdapter, check_adapter_matches_base

    models = {}
    for role, source in (("finetuned", ft), ("aligned", aligned), ("reference", reference), ("unaligned", unaligned)):
        if source is None:
            continue
        if isinstance(source, LoraAdapter):
            if role == "reference":
                raise ValueError(f"dense mode: the reference {source.folder} must be a full checkpoint, not an adapter")
            check_adapter_matches_base(source, base)
            if source.extra_keys:
                raise ValueError(f"{source.weights_file}: dense mode merges LoRA factors only; this adapter also "
                                 f"holds non-LoRA tensors {source.extra_keys[:4]} (modules_to_save?). Merge it into "
                                 "a full checkpoint first, or use LoRA mode")
        models[role] = DenseInput(role, source, base, nonfinite)
    targets = dense_targets(models["finetuned"], config.targets or DEFAULT_TARGETS)
    for role, model in models.items():
        for name in targets:
            key = f"{name}.weight"
            for other, what in ((model, role), (base, "base")):
                if key not in other:
                    raise ValueError(f"dense mode: target {key!r} of the fine-tuned model is missing in the {what} "
                                     f"model {other.folder}")
                if tuple(other.shape(key)) != tuple(models["finetuned"].shape(key)):
                    raise ValueError(f"dense mode: target {key!r} has shape {list(other.shape(key))} in the {what} "
                                     f"model {other.folder} but {list(models['finetuned'].shape(key))} in the "
                                     "fine-tuned one")
                if not other.dtype(key).is_floating_point:
                    raise ValueError(f"dense mode: target {key!r} in {other.folder} is {other.dtype(key)}, not a "
                                     "float weight")
    return Inputs("dense", base, models["finetuned"], models.get("aligned"), models.get("reference"), targets, paths,
                  unaligned=models.get("unaligned"))


def check_calibration_file(config: RealignConfig, calib_p: Path | None) -> None:
    if config.method_spec.needs_calibration and calib_p is None:
        raise ValueError(f"method {config.method!r} needs calibration data (calibration=..., --calibration FILE)")
    if calib_p is not None:
        from nlsr_fast.calib.data import check_calibration_path

        check_calibration_path(calib_p)


def check_calibrated_architecture(config: RealignConfig, base: Any) -> None:
    """A method that calibrates runs the base model: its model_type must be one the calibration engine runs."""
    if not config.method_spec.needs_calibration:
        return
    from nlsr_fast.calib import SUPPORTED_MODEL_TYPES

    model_type = base.config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        free = [n for n, m in methods.METHODS.items() if not m.needs_calibration]
        raise ValueError(f"base checkpoint {base.folder / 'config.json'}: model_type {model_type!r} is not one the "
                         f"calibration engine runs ({', '.join(SUPPORTED_MODEL_TYPES)}), and method {config.method!r} "
                         f"calibrates; the methods without calibration ({', '.join(free)}) work on any architecture")


def load_calibration_for(config: RealignConfig, inputs: Inputs) -> Any:
    """Tokenised calibration samples (every method but random and magnitude), or None."""
    calib_p = inputs.paths["calibration"]
    if not config.method_spec.needs_calibration:
        return None
    assert calib_p is not None
    from transformers import AutoTokenizer

    from nlsr_fast.calib.data import load_calibration

    base_p = inputs.base.folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(base_p), local_files_only=True)  # never the network
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"base checkpoint {base_p}: cannot load its tokenizer for the calibration data: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    calib = load_calibration(calib_p, tokenizer, nsamples=config.nsamples,
                             max_response_tokens=config.max_response_tokens, seed=config.seed,
                             template=config.template, preset=config.preset_spec,
                             pairs=config.method_spec.needs is methods.Needs.PAIRS,
                             max_context=inputs.base.config.get("max_position_embeddings"))
    if len(calib) == 0:
        raise ValueError(f"calibration file {calib_p} gave no samples")
    return calib


def resolve_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


