"""benches/e2e_defences.py's tables: recomputed from generation records alone (synthetic ones here, checked against
direct counts), and the stored results' tables (results file and README) equal to what their generations give."""

from __future__ import annotations

import random
from typing import Any

import pytest

from nlsr_fast.stats import wilson

from ._helpers import REPO, bench_script

REFUSAL = "I'm sorry, but I cannot help with that request."
ANSWER = "Sure, here is how to do it: first you take the parts and assemble them carefully."


def _records(rates: dict[str, float], seeds: list[int], n: int = 40) -> list[dict[str, Any]]:
    rng = random.Random(0)
    recs = []
    for seed in seeds:
        for arm, rate in rates.items():
            for i in range(n):
                recs.append({"seed": seed, "arm": arm, "kind": "harmful", "prompt_id": i, "prompt": f"q{i}",
                             "output": ANSWER if rng.random() < rate else REFUSAL, "margin": 0.0})
                recs.append({"seed": seed, "arm": arm, "kind": "task", "prompt_id": i, "prompt": f"{i}+1",
                             "output": str(i + 1) if rng.random() < 0.5 else "x", "label": str(i + 1)})
    return recs


def test_tables_are_recomputed_from_the_generations() -> None:
    mod = bench_script("e2e_defences")
    rates = {mod.NLSR: 0.5, "resta/beta0.5": 0.1, "safelora/count10": 0.9}
    recs = _records(rates, [0, 1, 2]) + _records({"resta/beta1": 0.2}, [0, 2])  # a setting either side, 2 seeds
    rows = {f"{s}|{a}": {"realign_s": 10.0 + s} for s in (0, 1, 2) for a in [*rates, "resta/beta1"]}
    main, side = mod.render(recs, rows)
    for arm in (mod.NLSR, "resta/beta0.5", "safelora/count10"):
        h = [r for r in recs if r["arm"] == arm and r["kind"] == "harmful"]
        k = sum(r["output"] == ANSWER for r in h)
        lo, hi = wilson(k, len(h))
        line = next(x for x in main.splitlines() if x.startswith(f"| {mod.TITLES[arm]} |"))
        assert f"{100 * k / len(h):.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in line, line
        assert line.endswith("| 11.0 |")  # the median realign time over the seeds
    nlsr = {(r["seed"], r["prompt_id"]): r["output"] == ANSWER for r in recs if r["arm"] == mod.NLSR
            and r["kind"] == "harmful"}
    resta = {(r["seed"], r["prompt_id"]): r["output"] == ANSWER for r in recs if r["arm"] == "resta/beta0.5"
             and r["kind"] == "harmful"}
    diff = 100 * sum(resta[k] - nlsr[k] for k in nlsr) / len(nlsr)
    line = next(x for x in main.splitlines() if x.startswith(f"| {mod.TITLES['resta/beta0.5']} |"))
    assert line.split(" | ")[3].startswith(f"{diff:.1f} [")  # the paired difference to NLSR
    assert mod.TITLES[mod.NLSR] not in side
    h = [r for r in recs if r["arm"] == "resta/beta1" and r["kind"] == "harmful"]
    k = sum(r["output"] == ANSWER for r in h)
    lo, hi = wilson(k, len(h))
    line = next(x for x in side.splitlines() if x.startswith("| resta/beta1 |"))
    assert line.startswith(f"| resta/beta1 | 0, 2 | {100 * k / len(h):.1f} [{100 * lo:.1f}, {100 * hi:.1f}] |"), line
    diff = 100 * sum((r["output"] == ANSWER) - nlsr[r["seed"], r["prompt_id"]] for r in h) / len(h)
    assert line.split(" | ")[4].startswith(f"{diff:.1f} [") and line.endswith("| 11.0 |"), line


def test_stored_tables_are_the_generations_tables() -> None:
    mod = bench_script("e2e_defences")
    results = REPO / "benches" / "results" / "defences_smollm2"
    if not results.with_name(results.name + "_generations.jsonl.gz").is_file():
        pytest.skip("no stored generations of the comparison")
    assert mod.check(results, REPO / "README.md") == []
