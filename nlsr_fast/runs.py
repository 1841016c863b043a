"""One realign run per mode: the output files planned up front, calibration, the executor, the metadata files.

`LoraRun` writes a PEFT adapter folder, `DenseRun` a Hugging Face checkpoint folder; both write masks.safetensors,
the model card (README.md), and leave report.json, similarity.png and the manifest to the caller.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from nlsr_fast.config import RealignConfig
from nlsr_fast.executor import Executed, execute
from nlsr_fast.io.finite import NonFinite
from nlsr_fast.ops import row_topk_mask
from nlsr_fast.pipeline.write import CARD_FILE, MASKS_FILE, MasksFile, write_card

__all__ = ["DenseRun", "LoraRun"]

log = logging.getLogger(__name__)


def _version() -> str:
    import nlsr_fast

    return nlsr_fast.__version__


def _select_kwargs(config: RealignConfig) -> dict[str, Any]:
    return {"selection": config.selection, "prune_rate": config.prune_rate, "epsilon": config.epsilon,
            "seed": config.seed, "preset": config.preset_spec, "tau": config.tau, "fraction": config.fraction}


def _engine_kwargs(config: RealignConfig, device: torch.device) -> dict[str, Any]:
    return {"micro_batch": config.micro_batch, "device": device,
            "dtype": getattr(torch, config.calib_dtype) if config.calib_dtype else None}


class _Run:
    """What both modes share: the masks file, the executor call, timings."""

    space: Any
    mask_shapes: dict[str, tuple[int, ...]]

    def __init__(self, config: RealignConfig, inputs: Any, calib: Any, tmp: Path, nonfinite: NonFinite,
                 progress: Any, device: torch.device) -> None:
        self.config, self.inputs, self.calib, self.tmp = config, inputs, calib, tmp
        self.nonfinite, self.progress, self.device = nonfinite, progress, device
        self.metadata = {"format": "pt", "nlsr_fast": _version()}

    def open_masks(self) -> None:
        self.masks_file = MasksFile(self.tmp / MASKS_FILE, self.mask_shapes)

    def calibrate(self) -> Any:
        """Masks made from calibration data before pass 1 (a callable name -> masks), or None."""
        return None

    def execute(self) -> Executed:
        start = time.perf_counter()
        precomputed = self.calibrate()
        if precomputed is not None:
            self.progress.stage("calibrate", time.perf_counter() - start)
        executed = execute(self.space, masks_file=self.masks_file, select_kwargs=_select_kwargs(self.config),
                           progress=self.progress, precomputed_masks=precomputed)
        for name, seconds in executed.timings.items():
            self.progress.stage(name, seconds)
        return executed


class LoraRun(_Run):
    """PEFT adapter in, PEFT adapter out (SPEC LoRA mode)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from nlsr_fast.io.adapter import ADAPTER_SAFETENSORS
        from nlsr_fast.io.stream import PlannedSafetensors
        from nlsr_fast.lora import LoraSpace, lora_mask_keys

        ft, cfg = self.inputs.finetuned, self.config
        self.mask_shapes = {}
        for name in ft.modules:
            m = ft.module(name)
            key_a, key_b = lora_mask_keys(name)
            self.mask_shapes[key_a], self.mask_shapes[key_b] = (m.rank, m.d_in), (m.d_out, m.rank)
        self.open_masks()
        plan = [(k, ft.raw_dtype(k), ft.raw_shape(k)) for k in ft.raw_keys]
        self.out = PlannedSafetensors(self.tmp / ADAPTER_SAFETENSORS, plan, self.metadata)
        given = self.inputs.reference is not None
        self.space = LoraSpace(ft, self.inputs.reference if given else self.inputs.aligned, preset=cfg.preset_spec,
                               amplify_alpha=None if given else cfg.alpha, method=cfg.method, sparsity=cfg.sparsity,
                               seed=cfg.seed, backend=cfg.backend, device=self.device, nonfinite=self.nonfinite,
                               out=self.out, extras=self.inputs.extras)

    def calibrate(self) -> Any:
        if self.config.method == "random":
            return None
        from nlsr_fast.pipeline.score import score

        cfg, space = self.config, self.space
        # The engine applies every module's reference adapter while it streams the base, so the reference factors
        # are held for calibration (fp32: 2x the adapter's bf16 size).
        ref = {name: space.load_reference(name) for name in space.modules}
        scales = {name: space.source.scale(name) for name in space.modules}
        masks = score(cfg.method, ref, sparsity=cfg.sparsity, preset=cfg.preset_spec, seed=cfg.seed,
                      base=self.inputs.base, calib=self.calib, scales=scales, sequential=cfg.sequential,
                      backend=cfg.backend, progress=self.progress.layers(f"calibration ({cfg.method})"),
                      **_engine_kwargs(cfg, self.device))
        del ref
        return lambda name: dict(zip(space.mask_keys(name), masks[name], strict=True))

    def finish(self, report: Any) -> None:
        from nlsr_fast.io.adapter import ADAPTER_CONFIG

        self.out.close()
        self.masks_file.close()
        ft = self.inputs.finetuned
        text = json.dumps(dict(ft.config), sort_keys=True, indent=2) + "\n"
        (self.tmp / ADAPTER_CONFIG).write_text(text, encoding="utf-8")
        write_card(self.tmp / CARD_FILE, base_model=ft.config.get("base_model_name_or_path"), report=report)


class DenseRun(_Run):
    """Full checkpoints (or adapters merged on the fly) in, a Hugging Face checkpoint out (SPEC dense mode)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from nlsr_fast.dense import DenseOutput, DenseSpace

        ft, cfg = self.inputs.finetuned, self.config
        self.mask_shapes = {name: tuple(ft.shape(f"{name}.weight")) for name in self.inputs.modules}
        self.open_masks()
        plan = [(k, ft.dtype(k), tuple(ft.shape(k))) for k in ft.keys()]
        self.out = DenseOutput(self.tmp, plan, max_shard_bytes=cfg.max_shard_bytes, metadata=self.metadata)
        self.space = DenseSpace(self.inputs.base, self.inputs.aligned, ft, self.inputs.reference,
                                targets=self.inputs.modules, method=cfg.method, score_on=cfg.score_on,
                                sparsity=cfg.sparsity, alpha=cfg.alpha, seed=cfg.seed, backend=cfg.backend,
                                device=self.device, nonfinite=self.nonfinite, out=self.out)

    def calibrate(self) -> Any:
        cfg, space = self.config, self.space
        if cfg.method not in ("wanda", "snip"):
            return None
        from nlsr_fast.calib import engine
        from nlsr_fast.dense import ReferenceReader

        reader = ReferenceReader(space)
        layers = self.progress.layers(f"calibration ({cfg.method})")
        if cfg.method == "wanda":
            stats = engine.collect_dense_statistics(reader, space.modules, self.calib, progress=layers,
                                                    **_engine_kwargs(cfg, self.device))
            space.wanda_scale = {n: (st.x_sq.double() / max(int(st.n_samples), 1)).sqrt().float()
                                 for n, st in stats.items()}
            return None
        keep = 1.0 - cfg.sparsity

        def on_layer(layer: int, grads: dict[str, torch.Tensor]) -> None:
            # One layer of summed |dL/dW| at a time: each becomes its mask at once (written to masks.safetensors).
            for name, grad in grads.items():
                scores = space.score_tensor(space.load(name))
                self.masks_file.write(name, row_topk_mask(scores, keep, grad=grad.to(scores.device).float(),
                                                          backend=cfg.backend))

        engine.dense_gradient_scores(reader, space.modules, self.calib, on_layer=on_layer, loss="nll",
                                     accumulate=cfg.preset_spec.snip_accumulate, progress=layers,
                                     **_engine_kwargs(cfg, self.device))
        return lambda name: self.masks_file.read([name])

    def finish(self, report: Any) -> None:
        from nlsr_fast.dense import copy_model_files

        self.out.finish()
        self.masks_file.close()
        ft = self.inputs.finetuned
        src = ft.folder if ft.adapter is None else self.inputs.base.folder
        copy_model_files(src, self.tmp)
        write_card(self.tmp / CARD_FILE, base_model=None, report=report)

