"""`realign`: the whole NLSR pipeline on PEFT LoRA adapters, from folders on disk to a realigned adapter folder.

amplify -> score (calibration on the reference) -> similarity -> select -> restore -> write (SPEC §2-§7).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nlsr_fast.config import RealignConfig
from nlsr_fast.pipeline._types import Factors
from nlsr_fast.pipeline.amplify import amplify
from nlsr_fast.pipeline.plan import calibration_summary, format_plan, make_plan
from nlsr_fast.pipeline.restore import changed_entries, restore
from nlsr_fast.pipeline.score import score
from nlsr_fast.pipeline.select import select
from nlsr_fast.pipeline.similarity import similarity
from nlsr_fast.pipeline.write import (
    CARD_FILE,
    MASKS_FILE,
    PLOT_FILE,
    REPORT_FILE,
    folder_bytes,
    output_tensors,
    write_card,
    write_masks,
)
from nlsr_fast.report import ModuleRecord, Report, versions

__all__ = ["realign", "realign_with_config"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def realign(
    base: PathLike,
    aligned: PathLike,
    finetuned: PathLike,
    out: PathLike,
    *,
    calibration: PathLike | None = None,
    reference: PathLike | None = None,
    preset: str = "paper",
    method: str = "low_rank",
    sparsity: float = 0.8,
    alpha: float = 0.9,
    selection: str = "adaptive",
    prune_rate: float = 0.5,
    epsilon: float = 0.2,
    tau: float | None = None,
    fraction: float | None = None,
    seed: int = 42,
    nsamples: int = 2000,
    max_response_tokens: int = 256,
    template: str = "alpaca",
    sequential: bool = True,
    micro_batch: int | None = None,
    calib_dtype: str | None = None,
    device: str | None = None,
    backend: str | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
) -> Report:
    """Realign a fine-tuned LoRA adapter with NLSR and write the result to `out`.

    Args:
        base: the base checkpoint folder F_s (sharded safetensors + config + tokenizer).
        aligned: the safety-aligned PEFT LoRA adapter folder on `base`.
        finetuned: the fine-tuned PEFT adapter folder (continued training of `aligned`: same keys and ranks).
        out: the output folder (must not exist unless `overwrite`; never inside or above an input).
        calibration: JSONL of {"prompt", "response"} (pairs {"prompt", "chosen", "rejected"} for pref_snip);
            required by every method but `random`.
        reference: a ready reference adapter folder; amplification is skipped when given.
        preset ... backend: the hyper-parameters of RealignConfig (SPEC §8 defaults).
        dry_run: read headers only, log and return the plan; nothing is written.
        quiet: no progress bars.
        overwrite: replace an existing `out`.
    Returns:
        The Report (also written as out/report.json unless dry_run).
    """
    config = RealignConfig(
        preset=preset,
        method=method,
        sparsity=sparsity,
        alpha=alpha,
        selection=selection,
        prune_rate=prune_rate,
        epsilon=epsilon,
        tau=tau,
        fraction=fraction,
        seed=seed,
        nsamples=nsamples,
        max_response_tokens=max_response_tokens,
        template=template,
        sequential=sequential,
        micro_batch=micro_batch,
        calib_dtype=calib_dtype,
        device=device,
        backend=backend,
    )
    return realign_with_config(
        config,
        base,
        aligned,
        finetuned,
        out,
        calibration=calibration,
        reference=reference,
        dry_run=dry_run,
        quiet=quiet,
        overwrite=overwrite,
    )


class _Stages:
    """Timings per stage plus one tqdm bar over the stages (only at this edge, off when quiet or not a TTY)."""

    def __init__(self, names: list[str], quiet: bool) -> None:
        self.timings: dict[str, float] = {}
        self._bar: Any = None
        if not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(names), desc="realign", unit="stage", leave=False)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._bar is not None:
            self._bar.set_description(f"realign: {name}")
        log.info("stage %s", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 4)
            if self._bar is not None:
                self._bar.update(1)

    def layers(self, desc: str) -> Callable[[int, int], None] | None:
        """A progress(done, total) callback for the calibration engine, with its own bar; None when bars are off."""
        if self._bar is None:
            return None
        from tqdm.auto import tqdm

        bar = tqdm(desc=desc, unit="layer", leave=False)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
            if done >= total:
                bar.close()

        return progress

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _resolve_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_factors(adapter: Any, names: list[str], device: torch.device,
                  dtype: torch.dtype | None = None) -> Factors:
    out: Factors = {}
    for name in names:
        a, b = adapter.factors(name)
        out[name] = (a.to(device=device, dtype=dtype or a.dtype), b.to(device=device, dtype=dtype or b.dtype))
    return out


def _file_records(paths: list[Path], *, hash_files: bool) -> list[dict[str, Any]]:
    from nlsr_fast.io import file_record

    if hash_files:
        return [file_record(p) for p in paths]
    return [{"path": str(p), "size": p.stat().st_size, "sha256": None} for p in paths]


def realign_with_config(
    config: RealignConfig,
    base: PathLike,
    aligned: PathLike,
    finetuned: PathLike,
    out: PathLike,
    *,
    calibration: PathLike | None = None,
    reference: PathLike | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
) -> Report:
    """`realign` with a ready RealignConfig (what the CLI calls)."""
    from nlsr_fast.io import (
        CheckpointReader,
        LoraAdapter,
        atomic_output,
        check_adapter_matches_base,
        check_compatible,
        check_output,
    )
    from nlsr_fast.io import write_adapter as write_adapter_files

    t_start = time.perf_counter()
    base_p, aligned_p, ft_p, out_p = Path(base), Path(aligned), Path(finetuned), Path(out)
    ref_p = Path(reference) if reference is not None else None
    calib_p = Path(calibration) if calibration is not None else None
    preset = config.preset_spec
    device = _resolve_device(config.device)
    backend = config.backend

    # -- validate everything before anything is computed or written ---------------------------------------------
    base_reader = CheckpointReader(base_p)
    ft = LoraAdapter.load(ft_p)
    al = LoraAdapter.load(aligned_p)
    check_compatible(ft, al)
    ref_adapter = LoraAdapter.load(ref_p) if ref_p is not None else None
    if ref_adapter is not None:
        check_compatible(ft, ref_adapter)
    check_adapter_matches_base(ft, base_reader)
    if len(ft.modules) == 0:
        raise ValueError(f"fine-tuned adapter {ft_p} has no LoRA modules")
    needs_calib = config.method != "random"
    pairs = config.method == "pref_snip"
    if needs_calib and calib_p is None:
        raise ValueError(f"method {config.method!r} needs calibration data (calibration=..., --calibration FILE)")
    if calib_p is not None and not calib_p.is_file():
        raise ValueError(f"calibration file {calib_p} does not exist")
    inputs = [p for p in (base_p, aligned_p, ft_p, ref_p, calib_p) if p is not None]
    check_output(out_p, inputs=inputs, overwrite=overwrite)  # atomic_output repeats it; this one fails before any work
    paths = {"base": str(base_p), "aligned": str(aligned_p), "finetuned": str(ft_p),
             "reference": str(ref_p) if ref_p else None, "calibration": str(calib_p) if calib_p else None,
             "out": str(out_p)}

    if dry_run:
        summary = None
        if needs_calib and calib_p is not None:
            summary = calibration_summary(calib_p, nsamples=config.nsamples,
                                          max_response_tokens=config.max_response_tokens, pairs=pairs)
            if summary["records"] == 0:
                raise ValueError(f"calibration file {calib_p} is empty (no valid samples)")
        plan = make_plan(config, base=base_reader, finetuned=ft, reference_given=ref_p is not None,
                         calibration=summary, device=str(device), paths=paths)
        log.info("%s", format_plan(plan))
        return Report(inputs={k: {"path": v} for k, v in paths.items() if v and k != "out"}, output=None,
                      versions=versions(), config=config.to_dict(), preset=_preset_dict(preset),
                      counts={"modules": len(ft.modules)}, dry_run=True, plan=plan)

    calib_set = None
    if needs_calib:
        assert calib_p is not None
        from transformers import AutoTokenizer

        from nlsr_fast.calib.data import load_calibration

        try:
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(base_p))
        except (OSError, ValueError) as exc:
            raise ValueError(f"base checkpoint {base_p}: cannot load its tokenizer for the calibration data: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        calib_set = load_calibration(calib_p, tokenizer, nsamples=config.nsamples,
                                     max_response_tokens=config.max_response_tokens, seed=config.seed,
                                     template=config.template, preset=config.preset, pairs=pairs)
        if len(calib_set) == 0:
            raise ValueError(f"calibration file {calib_p} gave no samples")

    stages = _Stages(["amplify", "score", "similarity", "select", "restore", "write"], quiet)
    try:
        with stages.stage("amplify"):
            ft_factors = _load_factors(ft, ft.modules, device)
            if ref_adapter is not None:
                ref_factors = _load_factors(ref_adapter, ft.modules, device, torch.float32)
                ref_scales = {name: ref_adapter.scale(name) for name in ft.modules}
            else:
                ref_factors = amplify(_load_factors(al, ft.modules, device), config.alpha, preset)
                ref_scales = {name: al.scale(name) for name in ft.modules}
        with stages.stage("score"):
            calib_dtype = getattr(torch, config.calib_dtype) if config.calib_dtype else None
            masks = score(config.method, ref_factors, sparsity=config.sparsity, preset=preset, seed=config.seed,
                          base=base_reader, calib=calib_set, scales=ref_scales, sequential=config.sequential,
                          micro_batch=config.micro_batch, dtype=calib_dtype, device=device, backend=backend,
                          progress=stages.layers(f"calibration ({config.method})"))
        with stages.stage("similarity"):
            sims = similarity(ft_factors, ref_factors, masks, backend=backend)
        with stages.stage("select"):
            names = list(ft.modules)
            chosen = select([sims[n] for n in names], selection=config.selection, prune_rate=config.prune_rate,
                            epsilon=config.epsilon, seed=config.seed, preset=preset, tau=config.tau,
                            fraction=config.fraction)
            restored = {n for n, flag in zip(names, chosen.restored, strict=True) if flag}
        with stages.stage("restore"):
            new_factors = restore(ft_factors, ref_factors, masks, restored, backend=backend)

        records = []
        for i, name in enumerate(names):
            a_t, b_t = ft_factors[name]
            a_n, b_n = new_factors[name]
            mask_a, mask_b = masks[name]
            layer = ft.layer_of(name)
            records.append(ModuleRecord(
                name=name,
                layer=-1 if layer is None else int(layer),
                similarity=float(sims[name]),
                probability=None if chosen.probabilities is None else chosen.probabilities[i],
                draw=None if chosen.draws is None else chosen.draws[i],
                restored=name in restored,
                density_a=mask_a.density(),
                density_b=mask_b.density(),
                changed_a=changed_entries(a_t, a_n) if name in restored else 0,
                changed_b=changed_entries(b_t, b_n) if name in restored else 0,
                shape_a=list(a_t.shape),
                shape_b=list(b_t.shape),
            ))
        base_files = [p for p in (base_p / "config.json", base_reader.index_file) if p is not None and p.is_file()]
        input_records = {
            # The base shards are hashed only when calibration read them (every method but random).
            "base": {"path": str(base_p), "files": _file_records([*base_files, *base_reader.files],
                                                                 hash_files=needs_calib)},
            "aligned": {"path": str(aligned_p), "files": _file_records(al.files, hash_files=True)},
            "finetuned": {"path": str(ft_p), "files": _file_records(ft.files, hash_files=True)},
        }
        if ref_adapter is not None and ref_p is not None:
            input_records["reference"] = {"path": str(ref_p),
                                          "files": _file_records(ref_adapter.files, hash_files=True)}
        if calib_p is not None:
            input_records["calibration"] = {"path": str(calib_p), "files": _file_records([calib_p], hash_files=True)}
        report = Report(
            inputs=input_records,
            output=str(out_p),
            versions=versions(),
            config=config.to_dict(),
            preset=_preset_dict(preset),
            modules=records,
            counts={"modules": len(names), "restored": len(restored),
                    "calibration_samples": len(calib_set) if calib_set is not None else 0,
                    "calibration_response_tokens": int(calib_set.meta.get("response_tokens", 0)) if calib_set else 0,
                    "calibration_truncated": int(calib_set.meta.get("n_truncated", 0)) if calib_set else 0},
        )

        with stages.stage("write"), atomic_output(out_p, inputs=inputs, overwrite=overwrite) as tmp:
            t_write = time.perf_counter()
            tmp = Path(tmp)
            write_adapter_files(tmp, ft.config, output_tensors(ft, new_factors, restored),
                                metadata={"format": "pt", "nlsr_fast": report.versions["nlsr_fast"]})
            write_masks(tmp / MASKS_FILE, masks)
            if not report.plot(tmp / PLOT_FILE):
                log.warning("similarity plot skipped (matplotlib missing)")
            write_card(tmp / CARD_FILE, base_model=ft.config.get("base_model_name_or_path"), report=report)
            report.bytes_read = int(base_reader.bytes_read + al.nbytes + ft.nbytes
                                    + (ref_adapter.nbytes if ref_adapter is not None else 0)
                                    + (calib_p.stat().st_size if calib_p is not None else 0))
            # report.json records everything but its own size and the time to write it.
            report.bytes_written = folder_bytes(tmp)
            now = time.perf_counter()
            report.timings = {**stages.timings, "write": round(now - t_write, 4), "total": round(now - t_start, 4)}
            report.to_json(tmp / REPORT_FILE)
    finally:
        stages.close()
    log.info("realign: restored %d of %d modules; wrote %s", len(restored), len(names), out_p)
    return report


def _preset_dict(preset: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(preset)
