"""One realign run per mode: the output files planned up front, calibration, the executor, the metadata files.

`LoraRun` writes a PEFT adapter folder, `DenseRun` a Hugging Face checkpoint folder; both write masks.safetensors,
the model card (README.md), and leave report.json, similarity.png and the manifest to the caller.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from nlsr_fast.config import RealignConfig
from nlsr_fast.distributed import Dist
from nlsr_fast.executor import Executed, FileStash, execute
from nlsr_fast.io.finite import NonFinite
from nlsr_fast.ops import row_topk_mask
from nlsr_fast.pipeline.write import CARD_FILE, MASKS_FILE, MasksFile, write_card

if TYPE_CHECKING:
    from nlsr_fast.calib.data import CalibrationSet
    from nlsr_fast.inputs import Inputs
    from nlsr_fast.resume import Journal

__all__ = ["CALIBRATION_CHECKPOINT_SECONDS", "DenseRun", "LoraRun", "Progress", "RunContext"]

#: Minimum seconds between two saves of the calibration state (each save writes every sample's hidden state).
CALIBRATION_CHECKPOINT_SECONDS = 600.0

log = logging.getLogger(__name__)


class Progress(Protocol):
    """Where a run reports its stages' seconds and its calibration's layers (the API's timings and bars)."""

    def stage(self, name: str, seconds: float) -> None: ...

    def __call__(self, phase: str, done: int, total: int) -> None: ...

    def layers(self, desc: str) -> Callable[[int, int], None] | None: ...


@dataclass(frozen=True)
class RunContext:
    """Everything a mode's run works with, opened and checked by the API."""

    config: RealignConfig
    inputs: Inputs
    calib: CalibrationSet | None  # tokenised samples; None for a method that needs no data
    tmp: Path  # OUT.partial
    nonfinite: NonFinite
    progress: Progress
    device: torch.device
    dist: Dist
    journal: Journal


def _version() -> str:
    import nlsr_fast

    return nlsr_fast.__version__


def _select_kwargs(config: RealignConfig) -> dict[str, Any]:
    return {"selection": config.selection, "prune_rate": config.prune_rate, "epsilon": config.epsilon,
            "seed": config.seed, "preset": config.preset_spec, "tau": config.tau, "fraction": config.fraction,
            "count": config.count}


def _engine_kwargs(config: RealignConfig, device: torch.device) -> dict[str, Any]:
    return {"micro_batch": config.micro_batch, "device": device,
            "dtype": getattr(torch, config.calib_dtype) if config.calib_dtype else None}


class _Run:
    """What both modes share: the masks file, the executor call, timings."""

    space: Any
    out: Any  # the planned output: io.stream.PlannedSafetensors (LoRA) or io.writer.PlannedShards (dense)
    mask_shapes: dict[str, tuple[int, ...]]

    def __init__(self, ctx: RunContext) -> None:
        self.config, self.inputs, self.tmp, self.journal = ctx.config, ctx.inputs, ctx.tmp, ctx.journal
        self.nonfinite, self.progress, self.device, self.dist = ctx.nonfinite, ctx.progress, ctx.device, ctx.dist
        config, dist, calib = ctx.config, ctx.dist, ctx.calib
        self.metadata = {"format": "pt", "nlsr_fast": _version()}
        # Data-parallel calibration: each process takes every world-th sample and the forward statistics (Grams,
        # squared inputs: fp64 sums) are summed over processes. Gradient scores are not split: the engine sums
        # |dL/dW| in fp32 per micro-batch (a 70B layer of scores is 3.4 GB), so partial sums from several processes
        # would round differently from one process and could flip near-ties (and the official running sum depends
        # on the sample order); every process computes them on every sample, so the output stays bit-identical.
        self.split = dist.active and config.method_spec.splits_samples
        self.calib = dist.shard_samples(calib) if self.split else calib
        self.reduce = dist.sum_stats if self.split else None

    def create(self, path: Path) -> bool:
        """Whether this process plans the file `path`: rank 0, unless a run being resumed already did."""
        return self.dist.root and not path.exists()

    def open_masks(self) -> None:
        path = self.tmp / MASKS_FILE
        self.masks_file = MasksFile(path, self.mask_shapes, create=self.create(path))

    def layer_checkpoint(self) -> Any:
        """Where the statistics pass saves its layer-boundary state (see resume.LayerCheckpoint)."""
        from nlsr_fast.resume import LayerCheckpoint

        return LayerCheckpoint(self.journal.dir, self.dist.rank, every=CALIBRATION_CHECKPOINT_SECONDS)

    def calibrated(self) -> Any:
        """Masks of an earlier, resumed run's finished calibration (read back), or None."""
        if not self.journal.done("calibration", ""):
            return None
        return lambda name: self.masks_file.read(list(self.space.mask_keys(name)))

    @functools.cached_property
    def owner(self) -> dict[str, int]:
        """{module: rank that computes it}: contiguous runs of modules of about equal size."""
        sizes = [sum(math.prod(self.mask_shapes[k]) for k in self.space.mask_keys(n)) for n in self.space.modules]
        return dict(zip(self.space.modules, self.dist.owners(sizes), strict=True))

    def owns(self, name: str) -> bool:
        """Whether this process computes module `name`."""
        return self.owner[name] == self.dist.rank

    def calibrate(self) -> Any:
        """Masks made from calibration data before pass 1 (a callable name -> masks), or None."""
        return None

    def output_files(self) -> list[Any]:
        """The PlannedSafetensors files of the output tensors."""
        raise NotImplementedError

    def record_keys(self, name: str) -> tuple[str, str | None]:
        """The mask keys report.json's `_a` and `_b` fields of module `name` describe (None: no `_b`)."""
        raise NotImplementedError

    def written_digests(self) -> dict[str, str]:
        """{file name: sha256} of the output files hashed as they were written front to back (after close)."""
        files = [self.masks_file.planned, *self.output_files()]
        return {f.path.name: f.digest for f in files if f.digest is not None}

    def execute(self) -> Executed:
        start = time.perf_counter()
        resumed = self.journal.done("calibration", "")
        precomputed = self.calibrate()
        if self.journal.done("calibration", "") and not resumed:
            self.progress.stage("calibrate", time.perf_counter() - start)
        names = self.space.modules
        executed = execute(self.space, masks_file=self.masks_file, select_kwargs=_select_kwargs(self.config),
                           progress=self.progress, precomputed_masks=precomputed, journal=self.journal,
                           owned=lambda i: self.owns(names[i]), root=self.dist.root, gather=self.dist.gather,
                           stash=FileStash(self.journal.dir / f"restore-values-{self.dist.rank}.bin"))
        for name, seconds in executed.timings.items():
            self.progress.stage(name, seconds)
        return executed


class LoraRun(_Run):
    """PEFT adapter in, PEFT adapter out (docs/algorithm.md §1, LoRA mode)."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
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
        path = self.tmp / ADAPTER_SAFETENSORS
        self.out = PlannedSafetensors(path, plan, self.metadata, create=self.create(path))
        # A ready reference is used as it is; safelora's reference is the aligned adapter itself (not amplified).
        given = self.inputs.reference is not None
        as_is = given or cfg.method_spec.repair == "project"
        self.space = LoraSpace(ft, self.inputs.reference if given else self.inputs.aligned, preset=cfg.preset_spec,
                               amplify_alpha=None if as_is else cfg.alpha, method=cfg.method,
                               sparsity=cfg.mask_sparsity,
                               seed=cfg.seed, backend=cfg.backend, device=self.device, nonfinite=self.nonfinite,
                               out=self.out, extras=self.inputs.extras)

    def calibrate(self) -> Any:
        if not self.config.method_spec.needs_calibration:
            return None
        if self.calibrated() is not None:
            return self.calibrated()
        from nlsr_fast.lora import read_raw
        from nlsr_fast.pipeline.score import score

        cfg, space = self.config, self.space
        in_file_order = space.file_order(space.modules)  # sequential reads (and the input hashes ride on them)
        for name in in_file_order:  # non-finite fine-tuned factors are refused before the long calibration
            read_raw(space.ft, space.ft.module(name).key_a, self.nonfinite)
            read_raw(space.ft, space.ft.module(name).key_b, self.nonfinite)
        # The engine applies every module's reference adapter (or, for a method that scores the fine-tuned model,
        # its adapter) while it streams the base, so those factors are held for calibration (fp32: 2x the adapter's
        # bf16 size).
        spec = cfg.method_spec
        if spec.calibrate_on == "finetuned":
            loaded = {name: tuple(t.float() for t in space.load_finetuned(name)) for name in in_file_order}
            scales = {name: space.ft.scale(name) for name in space.modules}
        else:
            loaded = {name: space.load_reference(name) for name in in_file_order}
            scales = {name: space.source.scale(name) for name in space.modules}
        ref = {name: loaded[name] for name in space.modules}  # model order, as the in-memory stages take it
        masks = score(cfg.method, ref, sparsity=cfg.mask_sparsity, preset=cfg.preset_spec, seed=cfg.seed,
                      base=self.inputs.base, calib=self.calib, scales=scales,
                      sequential=cfg.sequential and spec.sequential,
                      backend=cfg.backend, progress=self.progress.layers(f"calibration ({cfg.method})"),
                      reduce=self.reduce, checkpoint=self.layer_checkpoint(), **_engine_kwargs(cfg, self.device))
        del ref
        for name in space.modules:  # kept in the output, so a resumed run skips calibration
            if self.owns(name):
                for key, mask in zip(space.mask_keys(name), masks[name], strict=True):
                    self.masks_file.write(key, mask)
        self.journal.record("calibration", "")
        return lambda name: dict(zip(space.mask_keys(name), masks[name], strict=True))

    def output_files(self) -> list[Any]:
        return [self.out]

    def record_keys(self, name: str) -> tuple[str, str | None]:
        from nlsr_fast.lora import lora_mask_keys

        return lora_mask_keys(name)  # the A factor's mask, then the B factor's

    def close(self) -> None:
        """fsync and close this process's output files."""
        self.out.close()
        self.masks_file.close()

    def finish(self, report: Any) -> None:
        from nlsr_fast.io.adapter import ADAPTER_CONFIG

        self.close()
        ft = self.inputs.finetuned
        text = json.dumps(dict(ft.config), sort_keys=True, indent=2) + "\n"
        (self.tmp / ADAPTER_CONFIG).write_text(text, encoding="utf-8")
        write_card(self.tmp / CARD_FILE, base_model=ft.config.get("base_model_name_or_path"), report=report)


class DenseRun(_Run):
    """Full checkpoints (or adapters merged on the fly) in, a Hugging Face checkpoint out (docs/algorithm.md §1,
    dense mode)."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        from nlsr_fast.dense import DenseSpace
        from nlsr_fast.io.writer import PlannedShards

        ft, cfg = self.inputs.finetuned, self.config
        self.mask_shapes = {name: tuple(ft.shape(f"{name}.weight")) for name in self.inputs.modules}
        self.open_masks()
        plan = [(k, ft.dtype(k), tuple(ft.shape(k))) for k in ft.keys()]
        self.out = PlannedShards(self.tmp, plan, max_shard_bytes=cfg.max_shard_bytes, metadata=self.metadata,
                               create=self.dist.root)
        # safelora's reference is the aligned model itself (W_e = W_a, read as a ready reference).
        reference = self.inputs.aligned if cfg.method_spec.repair == "project" else self.inputs.reference
        self.space = DenseSpace(self.inputs.base, self.inputs.aligned, ft, reference,
                                targets=self.inputs.modules, method=cfg.method, score_on=cfg.score_on,
                                sparsity=cfg.mask_sparsity, unaligned=self.inputs.unaligned, beta=cfg.beta,
                                dare_rate=cfg.dare_rate, alpha=cfg.alpha, seed=cfg.seed, backend=cfg.backend,
                                device=self.device, nonfinite=self.nonfinite, out=self.out)

    def calibrate(self) -> Any:
        cfg, space = self.config, self.space
        if not cfg.method_spec.needs_calibration:
            return None
        statistics = not cfg.method_spec.gradients  # statistics give a column scale; gradients give the masks
        calib = self.calib
        assert calib is not None, "a method that needs calibration runs with its samples"
        from nlsr_fast.calib import engine
        from nlsr_fast.dense import ReferenceReader
        from nlsr_fast.resume import JOURNAL_DIR

        scales = self.tmp / JOURNAL_DIR / "col_scale.safetensors"
        if self.journal.done("calibration", ""):
            if statistics:
                from safetensors.torch import load_file

                space.col_scale = load_file(str(scales))
                return None
            return self.calibrated()
        reader = ReferenceReader(space, finetuned=cfg.method_spec.calibrate_on == "finetuned")
        layers = self.progress.layers(f"calibration ({cfg.method})")
        if statistics:
            stats = engine.collect_dense_statistics(reader, space.modules, calib, progress=layers,
                                                    checkpoint=self.layer_checkpoint(),
                                                    **_engine_kwargs(cfg, self.device))
            if self.reduce is not None:
                self.reduce(stats)
            col_scale = cfg.method_spec.col_scale
            assert col_scale is not None, f"method {cfg.method!r} gives no column scale"
            space.col_scale = {n: col_scale(st.x_sq, int(st.n_samples)) for n, st in stats.items()}
            if self.dist.root:
                from safetensors.torch import save_file

                save_file(space.col_scale, str(scales))
            self.journal.record("calibration", "")
            return None
        keep = 1.0 - cfg.mask_sparsity

        def on_layer(layer: int, grads: dict[str, torch.Tensor]) -> None:
            # One layer of summed |dL/dW| at a time: each becomes its mask at once (written to masks.safetensors by
            # the process that owns the module).
            if self.reduce is not None:
                self.reduce(grads)
            for name, grad in grads.items():
                if not self.owns(name):
                    continue
                scores = space.score_tensor(space.load(name))
                self.masks_file.write(name, row_topk_mask(scores, keep, grad=grad.to(scores.device).float(),
                                                          backend=cfg.backend))

        engine.dense_gradient_scores(reader, space.modules, calib, on_layer=on_layer, loss=str(cfg.method_spec.loss),
                                     accumulate=cfg.preset_spec.snip_accumulate, progress=layers,
                                     **_engine_kwargs(cfg, self.device))
        self.journal.record("calibration", "")
        return self.calibrated()

    def output_files(self) -> list[Any]:
        return list(self.out.files)

    def record_keys(self, name: str) -> tuple[str, str | None]:
        return name, None  # one mask per weight

    def close(self) -> None:
        """fsync and close this process's output files."""
        self.out.close()
        self.masks_file.close()

    def finish(self, report: Any) -> None:
        from nlsr_fast.dense import copy_model_files

        self.close()
        self.out.finish()
        ft = self.inputs.finetuned
        src = ft.folder if ft.adapter is None else self.inputs.base.folder
        copy_model_files(src, self.tmp)
        write_card(self.tmp / CARD_FILE, base_model=None, report=report)

