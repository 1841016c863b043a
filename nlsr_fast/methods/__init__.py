"""The realignment methods: one `Method` per file, and METHODS, the one list every other part reads.

Adding a method: a file here that defines METHOD, its entry below, its tests (CONTRIBUTING.md, "Adding a method").
"""

from __future__ import annotations

from nlsr_fast.methods import antidote, low_rank, magnitude, pref_snip, random, resta, safelora, snip, wanda
from nlsr_fast.methods.base import MODES, Method, Needs

__all__ = ["DEFAULT", "METHODS", "MODES", "Method", "Needs", "get", "methods_table", "names"]

#: Every method, by name, in the order of the docs' Methods table.
METHODS: dict[str, Method] = {m.name: m for m in (low_rank.METHOD, wanda.METHOD, snip.METHOD, pref_snip.METHOD,
                                                   random.METHOD, magnitude.METHOD, safelora.METHOD,
                                                   antidote.METHOD, resta.METHOD)}
#: The method of a run that names none (the paper's).
DEFAULT = "low_rank"


def names(mode: str | None = None) -> tuple[str, ...]:
    """The method names, or those that run in `mode`."""
    return tuple(n for n, m in METHODS.items() if mode is None or mode in m.modes)


def get(name: str, mode: str | None = None) -> Method:
    """The method `name`; ValueError naming the choices (and, with `mode`, why it does not run there)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {name!r}")
    method = METHODS[name]
    if mode is not None and mode not in method.modes:
        raise ValueError(f"method {name!r} is not available in {mode} mode: {method.refused[mode]}; choose one of "
                         f"{list(names(mode))}")
    return method


def methods_table() -> str:
    """The Markdown table of the methods (the README's Methods section shows this table; a test compares them)."""
    mode_names = {"lora": "LoRA", "dense": "dense"}
    lines = ["| method | modes | needs | score | repair |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        share = "1−s" if m.draw is not None else "top 1−s"
        keeps = f"restores the {share} of each {'factor' if m.group == 'matrix' else 'row'}"
        if m.repair == "prune":
            keeps = "zeroes the top prune_ratio of each row, in every module"
        elif m.repair == "add":
            keeps = f"adds β (default {m.defaults['beta']}) × the safety vector to every module"
        elif m.repair == "project":
            keeps = f"W_a + C ΔW in the chosen modules (default: the {m.defaults['count']} least similar)"
        name = f"`{m.name}`" + (" (default)" if m.name == DEFAULT else "")
        lines.append(f"| {name} | {', '.join(mode_names[x] for x in m.modes)} | {m.needs.value} | "
                     f"{m.summary.replace('|', chr(92) + '|')} | {keeps} |")
    return "\n".join(lines)
