"""The record of a realign run (docs/algorithm.md §7): report.json, the human table and the similarity plot."""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModuleRecord", "Report", "versions"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class ModuleRecord:
    """One module of the run.

    similarity is None for a method that ranks no module (resta); probability and draw are None unless selection
    is adaptive; density_* is the share of true mask entries; changed_* counts the entries of the output factor
    whose bits differ from the fine-tuned one.
    """

    name: str
    layer: int
    similarity: float | None
    probability: float | None
    draw: int | None
    restored: bool
    density_a: float
    density_b: float
    changed_a: int
    changed_b: int
    shape_a: list[int] = field(default_factory=list)
    shape_b: list[int] = field(default_factory=list)


@dataclass
class Report:
    """Everything report.json holds.

    Attributes:
        inputs: {role: {"path": str, "files": [{"path", "sha256", "size"}]}} for base, aligned, finetuned,
            reference (when given) and calibration.
        output: the output folder (None for a dry run).
        versions: nlsr_fast, torch, transformers, python.
        config: every hyper-parameter of RealignConfig.
        preset: the preset's fields (docs/algorithm.md §8).
        method: the method's declaration (nlsr_fast.methods): name, title, reference, needs, mask group, repair.
        modules: per-module records in model order.
        timings: seconds per stage (amplify, score, similarity, select, restore, write, total, ...).
        bytes_read: bytes read from the inputs; bytes_written: bytes of the output folder.
        counts: {"modules": N, "restored": k, "calibration_samples": n, ...}.
        dry_run: True when this is a plan, not a run; plan holds the dry-run plan.
        mode: "lora" or "dense". In dense mode a module's `_a` fields describe its weight W and its mask; the
            `_b` fields are empty (density 0, no changes, shape []).
        nonfinite: the input tensors holding NaN/Inf (file, tensor, count, first index), when allowed.
        extra_tensors: the non-LoRA tensors of the fine-tuned adapter and what was done with each.
    """

    inputs: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    preset: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    modules: list[ModuleRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    plan: dict[str, Any] | None = None
    mode: str = "lora"
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    extra_tensors: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    # -- json ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write report.json (UTF-8, indented, keys in field order)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        data = dict(data)
        data["modules"] = [ModuleRecord(**m) for m in data.get("modules", [])]
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"report has unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Report:
        """Read a report.json written by `to_json`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read a report: {exc}") from None
        return cls.from_dict(data)

    # -- views ---------------------------------------------------------------------------------------------
    @property
    def restored(self) -> list[str]:
        return [m.name for m in self.modules if m.restored]

    def table(self) -> str:
        """A fixed-width table of the modules plus a summary, for stdout."""
        if self.dry_run and self.plan is not None:
            from nlsr_fast.pipeline.plan import format_plan

            return format_plan(self.plan)
        head = f"{'module':<44} {'layer':>5} {'S':>9} {'p':>6} {'z':>2} {'rest':>4} {'dens A':>6} {'dens B':>6} " \
               f"{'chg A':>7} {'chg B':>7}"
        lines = [head, "-" * len(head)]
        for m in self.modules:
            p = "-" if m.probability is None else f"{m.probability:.3f}"
            z = "-" if m.draw is None else str(m.draw)
            s = "-" if m.similarity is None else f"{m.similarity:.5f}"
            lines.append(
                f"{_short(m.name, 44):<44} {m.layer:>5} {s:>9} {p:>6} {z:>2} "
                f"{'yes' if m.restored else '':>4} {m.density_a:>6.3f} {m.density_b:>6.3f} "
                f"{m.changed_a:>7} {m.changed_b:>7}"
            )
        lines.append("-" * len(head))
        return "\n".join(lines + [self.summary()])

    def summary(self) -> str:
        """The lines under the table: what was restored, the timings, the bytes read and written."""
        lines = []
        cfg = self.config
        changed = sum(m.changed_a + m.changed_b for m in self.modules)
        # A module whose masks are all empty (sparsity 1) has nothing to restore: say so rather than let
        # "restored k" suggest that k modules changed.
        empty = sum(1 for m in self.modules if m.density_a == 0.0 and m.density_b == 0.0)
        lines.append(
            f"preset {cfg.get('preset')}, method {cfg.get('method')}, sparsity {cfg.get('sparsity')}, "
            f"selection {cfg.get('selection')}: restored {self.counts.get('restored', 0)} of "
            f"{self.counts.get('modules', len(self.modules))} modules, {changed} entries changed"
            + (f"; {empty} modules have all-empty masks (nothing to restore in them)" if empty else "")
        )
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        lines.append(f"read {_human(self.bytes_read)}, wrote {_human(self.bytes_written)}"
                     + (f" to {self.output}" if self.output else ""))
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> bool:
        """similarity.png: S per module along depth, restored modules marked. False (logged) without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib is not installed; %s not written (pip install 'nlsr-fast[plot]')", path)
            return False
        if any(m.similarity is None for m in self.modules):
            log.info("no similarity.png: method %s ranks no module", self.config.get("method"))
            return False
        xs = list(range(len(self.modules)))
        sims = [float(m.similarity) for m in self.modules if m.similarity is not None]
        fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.05 * len(xs) + 6.0)), 3.5), dpi=100)
        ax.plot(xs, sims, color="0.6", linewidth=0.8, zorder=1)
        kept = [(x, s) for x, s, m in zip(xs, sims, self.modules, strict=True) if not m.restored]
        rest = [(x, s) for x, s, m in zip(xs, sims, self.modules, strict=True) if m.restored]
        if kept:
            ax.scatter([x for x, _ in kept], [s for _, s in kept], s=14, color="tab:blue", label="kept (fine-tuned)",
                       zorder=2)
        if rest:
            ax.scatter([x for x, _ in rest], [s for _, s in rest], s=22, color="tab:red", marker="x", label="restored",
                       zorder=3)
        layers = [m.layer for m in self.modules]
        starts = [i for i in xs if i == 0 or layers[i] != layers[i - 1]]
        step = max(1, len(starts) // 16)
        ax.set_xticks([starts[i] for i in range(0, len(starts), step)])
        ax.set_xticklabels([str(layers[starts[i]]) for i in range(0, len(starts), step)])
        ax.set_xlabel("decoder layer (modules in model order)")
        ax.set_ylabel("masked cosine S")
        ax.set_title(f"similarity per module, {self.config.get('method')} ({self.counts.get('restored', len(rest))} "
                     "restored)")
        ax.grid(alpha=0.3)
        if xs:
            ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
        plt.close(fig)
        return True


def versions() -> dict[str, str]:
    """Versions of nlsr_fast, torch, transformers (when installed) and python."""
    import torch

    import nlsr_fast

    out = {"nlsr_fast": nlsr_fast.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        out["transformers"] = version("transformers")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        out["transformers"] = "not installed"
    return out


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
