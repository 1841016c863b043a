"""Resume: a run killed mid-way and started again with the same arguments carries on from its finished work.

The work folder `<out>.partial/` keeps a journal in `.nlsr_resume/`: `state.json` (the run's fingerprint: every
option, the nlsr_fast version, the number of processes, and each input file's path, size and modification time)
and one `journal-<rank>.jsonl` per process, a line per finished piece of work written after that work's bytes are
in the output files (calibration, each module of pass 1 with its similarity and mask densities, the tensors that
belong to no module, each restored module of pass 2). A new run whose fingerprint matches skips every journaled
piece; one whose fingerprint differs is refused (the folder is another run's) unless `overwrite` starts afresh.
The journal is removed before the manifest is written and the folder renamed, so an output never carries it.

Process death (SIGKILL, out of memory) leaves the written bytes in the files; a power loss can lose pages the
kernel had not yet written, which the journal cannot see: after a crash of the machine, start afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["JOURNAL_DIR", "Journal", "LayerCheckpoint", "fingerprint", "resumable"]

log = logging.getLogger(__name__)

JOURNAL_DIR = ".nlsr_resume"
_STATE = "state.json"


def fingerprint(config: dict[str, Any], inputs: list[Path], world: int = 1) -> str:
    """sha256 of everything that decides the output: options, version, number of processes and the identity
    (path, size, modification time) of every file under the inputs."""
    import nlsr_fast

    ids = []
    for root in inputs:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                st = p.stat()
                ids.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"config": config, "version": nlsr_fast.__version__, "world": world, "files": ids},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def resumable(partial: Path, print_: str) -> bool:
    """Whether `partial` holds the journal of a run with fingerprint `print_`."""
    try:
        state = json.loads((partial / JOURNAL_DIR / _STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("fingerprint") == print_


class Journal:
    """The finished work of a run in `folder/.nlsr_resume/` (see the module docstring).

    Args:
        folder: the work folder (`<out>.partial`).
        print_: the run's fingerprint.
        rank: this process's rank (each process appends to its own file, all processes read every file).
        create: write state.json (rank 0 of a fresh run).
    """

    def __init__(self, folder: Path, print_: str, *, rank: int = 0, create: bool = True) -> None:
        self.dir = Path(folder) / JOURNAL_DIR
        if create:
            self.dir.mkdir(exist_ok=True)
            (self.dir / _STATE).write_text(json.dumps({"fingerprint": print_}) + "\n", encoding="utf-8")
        self.entries: dict[tuple[str, str], Any] = {}
        for path in sorted(self.dir.glob("journal-*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    break  # a line cut by the kill: everything before it is whole
                self.entries[(rec["kind"], rec["name"])] = rec.get("value")
        self.resumed = {kind: 0 for kind, _ in self.entries}
        for kind, _ in self.entries:
            self.resumed[kind] += 1
        if self.entries:
            log.warning("resuming from %s: %s already done", self.dir.parent,
                        ", ".join(f"{n} {k}" for k, n in sorted(self.resumed.items())))
        self._file = (self.dir / f"journal-{rank}.jsonl").open("a", encoding="utf-8")

    def get(self, kind: str, name: str) -> Any:
        """The value journaled for (kind, name), or None."""
        return self.entries.get((kind, name))

    def done(self, kind: str, name: str) -> bool:
        return (kind, name) in self.entries

    def record(self, kind: str, name: str, value: Any = None) -> None:
        """Journal a finished piece of work (its bytes must already be written)."""
        self._file.write(json.dumps({"kind": kind, "name": name, "value": value}) + "\n")
        self._file.flush()
        self.entries[(kind, name)] = value

    def close(self) -> None:
        self._file.close()

    def remove(self) -> None:
        """Delete the journal (before the manifest and the rename)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)



class LayerCheckpoint:
    """The layer-boundary state of a statistics calibration pass, saved in the journal folder so a killed run
    resumes after the last saved layer: the hidden states of every micro-batch at the next layer's input and the
    statistics of the layers done (fp64 tensors, exact).

    Saving writes every sample's hidden state (at 70B, 2000 samples of 256 tokens: ~8 GB per save), so a save
    happens at most every `every` seconds (and never after the last layer); a run killed between saves redoes
    the layers since the last one. Files are replaced atomically (written aside, then renamed).

    Args:
        folder: the journal folder (`<out>.partial/.nlsr_resume`).
        rank: this process's rank (each saves its own share of the samples).
        every: minimum seconds between saves.
    """

    def __init__(self, folder: Path, rank: int = 0, every: float = 600.0) -> None:
        self.path = Path(folder) / f"calibration-{rank}.safetensors"
        self.every = every
        self._last = time.monotonic()

    def save(self, next_layer: int, n_layers: int, hs: list[Any], result: dict[str, Any]) -> None:
        if next_layer >= n_layers or time.monotonic() - self._last < self.every:
            return
        from dataclasses import fields

        from safetensors.torch import save_file

        tensors = {f"h.{i}": h.contiguous() for i, h in enumerate(hs)}
        counts: dict[str, dict[str, int]] = {}
        for name, st in result.items():
            for f in fields(st):
                value = getattr(st, f.name)
                if hasattr(value, "contiguous"):
                    tensors[f"s.{name}.{f.name}"] = value.contiguous()
                else:
                    counts.setdefault(name, {})[f.name] = int(value)
        meta = {"next_layer": str(next_layer), "batches": str(len(hs)), "counts": json.dumps(counts, sort_keys=True)}
        aside = self.path.with_suffix(".tmp")
        save_file(tensors, str(aside), metadata=meta)
        os.replace(aside, self.path)
        self._last = time.monotonic()
        log.info("calibration checkpoint after layer %d", next_layer - 1)

    def load(self, stats_cls: type) -> tuple[int, list[Any], dict[str, Any]] | None:
        """(next layer, hidden states, statistics) of the last save, or None."""
        if not self.path.is_file():
            return None
        from dataclasses import fields

        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata()
            hs = [f.get_tensor(f"h.{i}") for i in range(int(meta["batches"]))]
            counts = json.loads(meta["counts"])
            result = {}
            for name, ints in counts.items():
                values = {fl.name: (ints[fl.name] if fl.name in ints else f.get_tensor(f"s.{name}.{fl.name}"))
                          for fl in fields(stats_cls)}
                result[name] = stats_cls(**values)
        return int(meta["next_layer"]), hs, result
