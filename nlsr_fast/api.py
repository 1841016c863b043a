"""`realign`: NLSR from folders on disk to a realigned adapter or checkpoint, through the streaming executor.

validate everything -> calibrate (methods that need data) -> executor (pass 1, select, pass 2) -> report, card,
plot, manifest -> rename. LoRA mode and dense mode differ only in their Space (lora.py, dense.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nlsr_fast import methods
from nlsr_fast.config import RealignConfig
from nlsr_fast.distributed import Dist
from nlsr_fast.io.finite import NonFinite
from nlsr_fast.report import ModuleRecord, Report, versions
from nlsr_fast.resume import Journal, fingerprint, resumable
from nlsr_fast.runs import Inputs

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
    dry_run: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
    force: bool = False,
    wait: bool = False,
    **options: Any,
) -> Report:
    """Realign a fine-tuned model with NLSR and write the result to `out`.

    Args:
        base: the base checkpoint folder F_s (sharded safetensors + config + tokenizer).
        aligned: the safety-aligned model: a PEFT LoRA adapter folder on `base`, or a full checkpoint (dense mode).
        finetuned: the fine-tuned model: an adapter that continued `aligned` (LoRA mode), any adapter on `base`,
            or a full checkpoint (dense mode).
        out: the output folder (must not exist unless `overwrite`; never inside or above an input).
        calibration: JSONL of {"prompt", "response"} (pairs {"prompt", "chosen", "rejected"} for pref_snip);
            required by low_rank, wanda, snip and pref_snip.
        reference: a ready reference (adapter in LoRA mode, checkpoint in dense mode); amplification is skipped.
        dry_run: validate every input as a real run would, log and return the plan; nothing is written.
        quiet: no progress bars.
        overwrite: replace an existing `out` (only a folder nlsr_fast wrote, unless `force`).
        force: with `overwrite`, replace `out` even if it is not an nlsr_fast output.
        wait: wait for another run holding `out`'s lock instead of failing.
        **options: any field of RealignConfig (preset, method, sparsity, alpha, mode, targets, ...), with its
            defaults (docs/algorithm.md §8).
    Returns:
        The Report (also written as out/report.json unless dry_run).
    """
    return realign_with_config(RealignConfig.from_dict(options), base, aligned, finetuned, out,
                               calibration=calibration, reference=reference, dry_run=dry_run, quiet=quiet,
                               overwrite=overwrite, force=force, wait=wait)


class _Progress:
    """Timings per stage and tqdm bars (only at this edge; off when quiet or not a TTY)."""

    def __init__(self, quiet: bool) -> None:
        self.timings: dict[str, float] = {}
        self.enabled = not quiet and sys.stderr.isatty()
        self._bars: dict[str, Any] = {}

    def stage(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 4)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        bar = self._bars.get(phase)
        if bar is None:
            bar = self._bars[phase] = tqdm(desc=f"realign: {phase}", total=total, leave=False)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def layers(self, desc: str) -> Callable[[int, int], None] | None:
        """A progress(done, total) callback for the calibration engine; None when bars are off."""
        return (lambda done, total: self(desc, done, total)) if self.enabled else None

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


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
    mode = config.mode if config.mode != "auto" else ("lora" if why_not is None else "dense")
    try:
        methods.get(config.method, mode)
    except ValueError as exc:
        detail = "" if config.mode != "auto" else f" (mode auto chose {mode}: {why_not or 'adapters match'})"
        raise ValueError(f"{exc}{detail}") from None
    log.info("mode %s%s", mode, "" if config.mode != "auto" else " (auto)")
    return mode


def _open_inputs(config: RealignConfig, base_p: Path, aligned_p: Path, ft_p: Path, ref_p: Path | None,
                 calib_p: Path | None, nonfinite: NonFinite) -> Inputs:
    """Open and check every input from headers alone, before any computation (a dry run stops after this)."""
    from nlsr_fast.io import CheckpointReader, check_adapter_matches_base, check_compatible

    if not base_p.is_dir():
        raise ValueError(f"base {base_p} does not exist or is not a folder")
    base = CheckpointReader(base_p, streamed=True)
    ft = _open_model("fine-tuned", ft_p, base, nonfinite)
    aligned = _open_model("aligned", aligned_p, base, nonfinite)
    reference = _open_model("reference", ref_p, base, nonfinite) if ref_p is not None else None
    mode = _resolve_mode(config, ft, aligned, reference)
    paths = {"base": base_p, "aligned": aligned_p, "finetuned": ft_p, "reference": ref_p, "calibration": calib_p}
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
        inputs = _open_dense(config, base, ft, aligned, reference, paths, nonfinite)
    _check_calibration_file(config, calib_p)
    return inputs


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
                paths: dict[str, Path | None], nonfinite: NonFinite) -> Inputs:
    from nlsr_fast.dense import DEFAULT_TARGETS, DenseInput, dense_targets
    from nlsr_fast.io import LoraAdapter, check_adapter_matches_base

    models = {}
    for role, source in (("finetuned", ft), ("aligned", aligned), ("reference", reference)):
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
    return Inputs("dense", base, models["finetuned"], models.get("aligned"), models.get("reference"), targets, paths)


def _check_calibration_file(config: RealignConfig, calib_p: Path | None) -> None:
    if config.method_spec.needs_calibration and calib_p is None:
        raise ValueError(f"method {config.method!r} needs calibration data (calibration=..., --calibration FILE)")
    if calib_p is not None:
        from nlsr_fast.calib.data import check_calibration_path

        check_calibration_path(calib_p)


def _load_calibration(config: RealignConfig, inputs: Inputs) -> Any:
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


def _resolve_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    force: bool = False,
    wait: bool = False,
) -> Report:
    """`realign` with a ready RealignConfig (what the CLI calls)."""
    from nlsr_fast.io import check_output
    from nlsr_fast.io.lock import OutputLock

    t_start = time.perf_counter()
    from nlsr_fast.io.hub import resolve

    specs = {"base": base, "aligned": aligned, "finetuned": finetuned, "reference": reference}
    found = {role: resolve(spec, role) for role, spec in specs.items() if spec is not None}  # local path, or Hub id
    hub = {role: r.record() for role, r in found.items() if r.repo_id is not None}
    base_p, aligned_p, ft_p = found["base"].path, found["aligned"].path, found["finetuned"].path
    out_p = Path(out)
    ref_p = found["reference"].path if "reference" in found else None
    calib_p = Path(calibration) if calibration is not None else None
    input_paths = [p for p in (base_p, aligned_p, ft_p, ref_p, calib_p) if p is not None]
    dist = Dist.from_env(_resolve_device(config.device)) if not dry_run else Dist()
    try:
        run_print = fingerprint(config.to_dict(), input_paths, dist.world)
        # Up front, before any work (rank 0 for the job: the others would see its lock).
        dist.on_root(lambda: check_output(out_p, inputs=input_paths, overwrite=overwrite, force=force, wait=wait,
                                          resumable=lambda partial: resumable(partial, run_print)))
        nonfinite = NonFinite(config.allow_nonfinite)
        if dry_run:
            inputs = _open_inputs(config, base_p, aligned_p, ft_p, ref_p, calib_p, nonfinite)
            inputs.hub = hub
            return _dry_run(config, inputs, out_p)
        with contextlib.ExitStack() as stack:
            # One lock per output, held by rank 0 for the whole job.
            dist.on_root(lambda: _hold_lock(stack, OutputLock(out_p, wait=wait, inputs=input_paths)))
            # Again under the lock: a run we waited for may have written OUT (or left OUT.partial) meanwhile.
            dist.on_root(lambda: check_output(out_p, inputs=input_paths, overwrite=overwrite, force=force,
                                              resumable=lambda partial: resumable(partial, run_print)))
            inputs = _open_inputs(config, base_p, aligned_p, ft_p, ref_p, calib_p, nonfinite)
            inputs.hub = hub
            calib = _load_calibration(config, inputs)
            progress = _Progress(quiet or not dist.root)
            try:
                report = _run(config, inputs, calib, out_p, overwrite=overwrite, force=force, nonfinite=nonfinite,
                              progress=progress, t_start=t_start, dist=dist, run_print=run_print)
            finally:
                progress.close()
        report = dist.broadcast(report)
        assert report is not None
        log.info("realign: restored %d of %d modules; wrote %s", report.counts["restored"], report.counts["modules"],
                 out_p)
        return report
    finally:
        dist.close(barrier=sys.exc_info()[0] is None)  # after a failure another rank may never reach a barrier


def _hold_lock(stack: contextlib.ExitStack, lock: Any) -> bool:
    """Take `lock` and register its release on `stack`, with Ctrl-C held back in between: an interrupt that lands
    after the lock file exists but before its release is registered would leave the file behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        stack.enter_context(lock)
        return True
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        stack.enter_context(lock)
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, None)  # the Ctrl-C that came meanwhile (KeyboardInterrupt): `stack` releases the lock
    return True


def _dry_run(config: RealignConfig, inputs: Inputs, out_p: Path) -> Report:
    from nlsr_fast.pipeline.plan import calibration_summary, format_plan, make_plan

    summary = None
    calib_p = inputs.paths["calibration"]
    if calib_p is not None and config.method_spec.needs_calibration:
        summary = calibration_summary(calib_p, nsamples=config.nsamples,
                                      max_response_tokens=config.max_response_tokens,
                                      pairs=config.method_spec.needs is methods.Needs.PAIRS)
        if summary["records"] == 0:
            raise ValueError(f"calibration file {calib_p} is empty (no valid samples)")
        _load_calibration(config, inputs)  # the tokenizer and every sample, as the real run will see them
    paths = {k: (str(v) if v is not None else None) for k, v in inputs.paths.items()} | {"out": str(out_p)}
    device = str(_resolve_device(config.device))
    plan = make_plan(config, base=inputs.base, finetuned=inputs.finetuned, reference_given=inputs.reference is not None,
                     calibration=summary, device=device, paths=paths, mode=inputs.mode, modules=inputs.modules)
    log.info("%s", format_plan(plan))
    return Report(inputs={k: inputs.record(k, path=v) for k, v in paths.items() if v and k != "out"}, output=None,
                  versions=versions(), config=config.to_dict(), preset=asdict(config.preset_spec),
                  method=config.method_spec.record(), counts={"modules": len(inputs.modules)}, dry_run=True,
                  plan=plan, mode=inputs.mode)


def _run(config: RealignConfig, inputs: Inputs, calib: Any, out_p: Path, *, overwrite: bool, force: bool,
         nonfinite: NonFinite, progress: _Progress, t_start: float, dist: Dist, run_print: str) -> Report | None:
    """Calibrate, execute and write the output folder through `<out>.partial` (rank 0 owns the folder; the other
    ranks write their modules into it and return None)."""
    from nlsr_fast.io import atomic_output
    from nlsr_fast.io.hashing import BackgroundHasher
    from nlsr_fast.io.hub import blob_digest
    from nlsr_fast.io.stream import buffer_pool

    roles = ["finetuned", "aligned", "reference"] + (["base"] if inputs.mode == "dense" or calib is not None else [])
    # Hashed from the run's own reads (the executor's, and calibration's of the base: the readers are streamed).
    hashed = [p for role in [*roles, "calibration"] for p in inputs.files(role)]
    in_cache = {p: d for p in hashed if (d := blob_digest(p)) is not None}  # a Hub cache's own sha256: no re-hash
    hasher = BackgroundHasher(hashed, known=in_cache) if dist.root else None
    input_paths = [p for p in inputs.paths.values() if p is not None]
    known_digests: dict[str, str] = {}  # output files hashed as they were written
    with contextlib.ExitStack() as stack:
        if hasher is not None:
            stack.callback(hasher.close)  # a failed run stops the hasher's workers at once
        tmp = Path(dist.on_root(lambda: str(stack.enter_context(atomic_output(
            out_p, inputs=input_paths, overwrite=overwrite, force=force,
            resumable=lambda partial: resumable(partial, run_print), known_digests=known_digests)))))
        journal = Journal(tmp, run_print, rank=dist.rank, create=dist.root) if dist.root else None
        dist.barrier()
        journal = journal or Journal(tmp, run_print, rank=dist.rank, create=False)
        run = _build(config, inputs, calib, tmp, nonfinite, progress, dist, journal)
        with buffer_pool():  # each module's big buffers reuse the last one's pages
            executed = run.execute()
        run.close()
        dist.barrier()  # every rank's modules are written and synced
        if not dist.root:
            journal.close()
            return None
        journal.remove()
        report = _report(config, inputs, calib, run, executed, hasher, out_p, nonfinite)
        report.counts.update({f"resumed_{kind}": n for kind, n in journal.resumed.items()})
        from nlsr_fast.pipeline.write import PLOT_FILE, REPORT_FILE, folder_bytes

        report.plot(Path(tmp) / PLOT_FILE)  # before the card, which names the plot only when it exists
        run.finish(report)
        known_digests.update(run.written_digests())
        report.bytes_written = folder_bytes(tmp)
        report.timings = {**progress.timings, "total": round(time.perf_counter() - t_start, 4)}
        report.to_json(Path(tmp) / REPORT_FILE)
    return report


def _build(config: RealignConfig, inputs: Inputs, calib: Any, tmp: Path, nonfinite: NonFinite,
           progress: _Progress, dist: Dist, journal: Journal) -> Any:
    """The mode's run; rank 0 plans (creates) the output files before the other ranks open them."""
    from nlsr_fast.runs import DenseRun, LoraRun, RunContext

    cls = LoraRun if inputs.mode == "lora" else DenseRun
    ctx = RunContext(config=config, inputs=inputs, calib=calib, tmp=tmp, nonfinite=nonfinite, progress=progress,
                     device=_resolve_device(config.device), dist=dist, journal=journal)
    run = cls(ctx) if dist.root else None
    dist.barrier()
    return run if run is not None else cls(ctx)


def _report(config: RealignConfig, inputs: Inputs, calib: Any, run: Any, executed: Any, hasher: Any, out_p: Path,
            nonfinite: NonFinite) -> Report:
    from nlsr_fast.io.adapter import layer_of

    records = []
    restored = set(executed.restored)
    chosen = executed.selection
    for i, name in enumerate(inputs.modules):
        key_a, key_b = run.record_keys(name)
        dens = executed.densities[name]
        changed = executed.changed.get(name, {})
        shapes = run.mask_shapes
        layer = layer_of(name)
        records.append(ModuleRecord(
            name=name, layer=-1 if layer is None else layer, similarity=float(executed.similarities[name]),
            probability=None if chosen.probabilities is None else chosen.probabilities[i],
            draw=None if chosen.draws is None else chosen.draws[i], restored=name in restored,
            density_a=dens[key_a], density_b=0.0 if key_b is None else dens[key_b],
            changed_a=changed.get(key_a, 0), changed_b=0 if key_b is None else changed.get(key_b, 0),
            shape_a=list(shapes[key_a]), shape_b=[] if key_b is None else list(shapes[key_b]),
        ))
    hashed = hasher.records()
    input_records: dict[str, Any] = {}
    for role in ("base", "aligned", "finetuned", "reference", "calibration"):
        path = inputs.paths[role]
        if path is None:
            continue
        files = [hashed.get(p, {"path": str(p), "size": p.stat().st_size, "sha256": None}) for p in inputs.files(role)]
        input_records[role] = inputs.record(role, path=str(path), files=files)
    meta = calib.meta if calib is not None else {}
    return Report(
        inputs=input_records, output=str(out_p), versions=versions(), config=config.to_dict(),
        preset=asdict(config.preset_spec), method=config.method_spec.record(), modules=records, mode=inputs.mode,
        counts={"modules": len(inputs.modules), "restored": len(restored),
                "calibration_samples": len(calib) if calib is not None else 0,
                "calibration_response_tokens": int(meta.get("response_tokens", 0)),
                "calibration_truncated": int(meta.get("n_truncated", 0)),
                "calibration_truncated_prompt": int(meta.get("n_truncated_prompt", 0)),
                "calibration_truncated_response": int(meta.get("n_truncated_response", 0))},
        # the files the run read (and hashed); LoRA mode without calibration never reads the base's shards
        bytes_read=int(sum(f["size"] for r in input_records.values() for f in r["files"] if f["sha256"])),
        nonfinite=list(nonfinite.found), extra_tensors=list(inputs.extra_records),
    )
