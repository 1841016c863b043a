"""One realign job as an object: `Realignment(config, base, aligned, finetuned, out, ...).run()` resolves its inputs,
holds OUT from the lock to the manifest (through OUT.partial), runs the mode's passes and returns the report.
`nlsr_fast.realign` only builds one and calls run()."""

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

from nlsr_fast import methods
from nlsr_fast.config import RealignConfig
from nlsr_fast.distributed import Dist
from nlsr_fast.executor import Executed
from nlsr_fast.inputs import Inputs, load_calibration_for, open_inputs, resolve_device
from nlsr_fast.io.finite import NonFinite
from nlsr_fast.report import ModuleRecord, Report, versions
from nlsr_fast.resume import Journal, fingerprint, resumable
from nlsr_fast.runs import DenseRun, LoraRun, RunContext

__all__ = ["Progress", "Realignment"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class Progress:
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


class Realignment:
    """One realign job. Construction resolves the inputs (local folders, or Hugging Face ids in the local cache);
    `run()` checks OUT, takes its lock, opens and checks every input, calibrates, runs the mode's two passes into
    OUT.partial and renames it to OUT with its report and manifest (or, for a dry run, returns the plan)."""

    def __init__(self, config: RealignConfig, base: PathLike, aligned: PathLike, finetuned: PathLike, out: PathLike,
                 *, calibration: PathLike | None = None, reference: PathLike | None = None,
                 unaligned: PathLike | None = None, dry_run: bool = False,
                 quiet: bool = False, overwrite: bool = False, force: bool = False, wait: bool = False) -> None:
        from nlsr_fast.io.hub import resolve

        self.started = time.perf_counter()
        self.config = config
        specs = {"base": base, "aligned": aligned, "finetuned": finetuned, "reference": reference,
                 "unaligned": unaligned}
        found = {role: resolve(spec, role) for role, spec in specs.items() if spec is not None}  # path, or Hub id
        #: role -> Hub id, revision and commit, for the inputs given by id (report.json)
        self.hub: dict[str, dict[str, Any]] = {role: r.record() for role, r in found.items() if r.repo_id is not None}
        #: role -> local path, in the order the resume fingerprint hashes them
        self.paths: dict[str, Path | None] = {
            "base": found["base"].path, "aligned": found["aligned"].path, "finetuned": found["finetuned"].path,
            "reference": found["reference"].path if "reference" in found else None,
            "unaligned": found["unaligned"].path if "unaligned" in found else None,
            "calibration": Path(calibration) if calibration is not None else None}
        self.out = Path(out)
        self.dry_run, self.quiet, self.wait = dry_run, quiet, wait
        self.overwrite, self.force = overwrite, force

    @property
    def input_paths(self) -> list[Path]:
        return [p for p in self.paths.values() if p is not None]

    def run(self) -> Report:
        """The report of the run (written as OUT/report.json), or of the plan for a dry run."""
        config = self.config
        dist = Dist.from_env(resolve_device(config.device)) if not self.dry_run else Dist()
        try:
            run_print = fingerprint(config.to_dict(), self.input_paths, dist.world)
            # Up front, before any work (rank 0 for the job: the others would see its lock).
            dist.on_root(lambda: self._check_output(run_print, wait=self.wait))
            nonfinite = NonFinite(config.allow_nonfinite)
            if self.dry_run:
                return self._plan(self._open(nonfinite))
            with contextlib.ExitStack() as stack:
                from nlsr_fast.io.lock import OutputLock

                # One lock per output, held by rank 0 for the whole job.
                dist.on_root(lambda: _hold_lock(stack, OutputLock(self.out, wait=self.wait,
                                                                  inputs=self.input_paths)))
                # Again under the lock: a run we waited for may have written OUT (or left OUT.partial) meanwhile.
                dist.on_root(lambda: self._check_output(run_print, wait=False))
                inputs = self._open(nonfinite)
                calib = load_calibration_for(config, inputs)
                progress = Progress(self.quiet or not dist.root)
                try:
                    report = self._write(inputs, calib, nonfinite, progress, dist, run_print)
                finally:
                    progress.close()
            report = dist.broadcast(report)
            assert report is not None
            log.info("realign: restored %d of %d modules; wrote %s", report.counts["restored"],
                     report.counts["modules"], self.out)
            return report
        finally:
            dist.close(barrier=sys.exc_info()[0] is None)  # after a failure another rank may never reach a barrier

    def _check_output(self, run_print: str, *, wait: bool) -> None:
        from nlsr_fast.io import check_output

        check_output(self.out, inputs=self.input_paths, overwrite=self.overwrite, force=self.force, wait=wait,
                     resumable=lambda partial: resumable(partial, run_print))

    def _open(self, nonfinite: NonFinite) -> Inputs:
        p = self.paths
        assert p["base"] is not None and p["aligned"] is not None and p["finetuned"] is not None
        inputs = open_inputs(self.config, p["base"], p["aligned"], p["finetuned"], p["reference"], p["calibration"],
                             nonfinite, unaligned_p=p["unaligned"])
        inputs.hub = self.hub
        return inputs

    def _plan(self, inputs: Inputs) -> Report:
        """The dry run: every check a real run makes (every calibration sample tokenised), the plan, nothing
        written."""
        from nlsr_fast.pipeline.plan import calibration_summary, format_plan, make_plan

        config = self.config
        summary = None
        calib_p = inputs.paths["calibration"]
        if calib_p is not None and config.method_spec.needs_calibration:
            summary = calibration_summary(calib_p, nsamples=config.nsamples,
                                          max_response_tokens=config.max_response_tokens,
                                          pairs=config.method_spec.needs is methods.Needs.PAIRS)
            if summary["records"] == 0:
                raise ValueError(f"calibration file {calib_p} is empty (no valid samples)")
            load_calibration_for(config, inputs)  # the tokenizer and every sample, as the real run will see them
        paths = {k: (str(v) if v is not None else None) for k, v in inputs.paths.items()} | {"out": str(self.out)}
        device = str(resolve_device(config.device))
        plan = make_plan(config, base=inputs.base, finetuned=inputs.finetuned,
                         reference_given=inputs.reference is not None, calibration=summary, device=device,
                         paths=paths, mode=inputs.mode, modules=inputs.modules,
                         repair_flops=_repair_flops(config, inputs))
        log.info("%s", format_plan(plan))
        return Report(inputs={k: inputs.record(k, path=v) for k, v in paths.items() if v and k != "out"},
                      output=None, versions=versions(), config=config.to_dict(), preset=asdict(config.preset_spec),
                      method=config.method_spec.record(), counts={"modules": len(inputs.modules)}, dry_run=True,
                      plan=plan, mode=inputs.mode)

    def _write(self, inputs: Inputs, calib: Any, nonfinite: NonFinite, progress: Progress, dist: Dist,
               run_print: str) -> Report | None:
        """Calibrate, execute and write the output folder through `<out>.partial` (rank 0 owns the folder; the other
        ranks write their modules into it and return None)."""
        from nlsr_fast.io import atomic_output
        from nlsr_fast.io.hashing import BackgroundHasher
        from nlsr_fast.io.hub import blob_digest
        from nlsr_fast.io.stream import buffer_pool
        from nlsr_fast.pipeline.write import PLOT_FILE, REPORT_FILE, folder_bytes

        base_read = inputs.mode == "dense" or calib is not None
        roles = ["finetuned", "aligned", "reference", "unaligned"] + (["base"] if base_read else [])
        # Hashed from the run's own reads (the executor's, and calibration's of the base: the readers are streamed).
        hashed = [p for role in [*roles, "calibration"] for p in inputs.files(role)]
        in_cache = {p: d for p in hashed if (d := blob_digest(p)) is not None}  # a Hub cache's own sha256
        hasher = BackgroundHasher(hashed, known=in_cache) if dist.root else None
        known_digests: dict[str, str] = {}  # output files hashed as they were written
        with contextlib.ExitStack() as stack:
            if hasher is not None:
                stack.callback(hasher.close)  # a failed run stops the hasher's workers at once
            tmp = Path(dist.on_root(lambda: str(stack.enter_context(atomic_output(
                self.out, inputs=self.input_paths, overwrite=self.overwrite, force=self.force,
                resumable=lambda partial: resumable(partial, run_print), known_digests=known_digests)))))
            journal = Journal(tmp, run_print, rank=dist.rank, create=dist.root) if dist.root else None
            dist.barrier()
            journal = journal or Journal(tmp, run_print, rank=dist.rank, create=False)
            run = self._mode_run(RunContext(config=self.config, inputs=inputs, calib=calib, tmp=tmp,
                                            nonfinite=nonfinite, progress=progress,
                                            device=resolve_device(self.config.device), dist=dist, journal=journal))
            with buffer_pool():  # each module's big buffers reuse the last one's pages
                executed = run.execute()
            run.close()
            dist.barrier()  # every rank's modules are written and synced
            if not dist.root:
                journal.close()
                return None
            journal.remove()
            assert hasher is not None
            report = self._report(inputs, calib, run, executed, hasher, nonfinite)
            report.counts.update({f"resumed_{kind}": n for kind, n in journal.resumed.items()})
            report.plot(tmp / PLOT_FILE)  # before the card, which names the plot only when it exists
            run.finish(report)
            known_digests.update(run.written_digests())
            report.bytes_written = folder_bytes(tmp)
            report.timings = {**progress.timings, "total": round(time.perf_counter() - self.started, 4)}
            report.to_json(tmp / REPORT_FILE)
        return report

    @staticmethod
    def _mode_run(ctx: RunContext) -> LoraRun | DenseRun:
        """The mode's run; rank 0 plans (creates) the output files before the other ranks open them."""
        cls = LoraRun if ctx.inputs.mode == "lora" else DenseRun
        run = cls(ctx) if ctx.dist.root else None
        ctx.dist.barrier()
        return run if run is not None else cls(ctx)

    def _report(self, inputs: Inputs, calib: Any, run: LoraRun | DenseRun, executed: Executed, hasher: Any,
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
                name=name, layer=-1 if layer is None else layer, similarity=executed.similarities[name],
                probability=None if chosen.probabilities is None else chosen.probabilities[i],
                draw=None if chosen.draws is None else chosen.draws[i], restored=name in restored,
                density_a=dens[key_a], density_b=0.0 if key_b is None else dens[key_b],
                changed_a=changed.get(key_a, 0), changed_b=0 if key_b is None else changed.get(key_b, 0),
                shape_a=list(shapes[key_a]), shape_b=[] if key_b is None else list(shapes[key_b]),
            ))
        hashed = hasher.records()
        input_records: dict[str, Any] = {}
        for role in ("base", "aligned", "finetuned", "reference", "unaligned", "calibration"):
            path = inputs.paths[role]
            if path is None:
                continue
            files = [hashed.get(p, {"path": str(p), "size": p.stat().st_size, "sha256": None})
                     for p in inputs.files(role)]
            input_records[role] = inputs.record(role, path=str(path), files=files)
        meta = calib.meta if calib is not None else {}
        return Report(
            inputs=input_records, output=str(self.out), versions=versions(), config=self.config.to_dict(),
            preset=asdict(self.config.preset_spec), method=self.config.method_spec.record(), modules=records,
            mode=inputs.mode,
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


def _repair_flops(config: RealignConfig, inputs: Inputs) -> float | None:
    """safelora in dense mode: the FLOPs of C dW over the modules (the rank of an aligned adapter, else full rank)."""
    from nlsr_fast.methods import safelora

    if config.method_spec.repair != "project" or inputs.mode != "dense":
        return None
    adapter = inputs.aligned.adapter
    total = 0
    for name in inputs.modules:
        d_out, d_in = inputs.finetuned.shape(f"{name}.weight")
        total += safelora.dense_flops(d_out, d_in, adapter.module(name).rank if adapter is not None else None)
    return float(total)


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


