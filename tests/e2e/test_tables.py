"""The table script recomputes everything from a generations file (synthetic records, no model)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path
from typing import Any

from nlsr_fast.e2e.tables import arm_stats, check_labels, judge_harmful, paired, pooled

REPO = Path(__file__).resolve().parents[2]


def _tables_module() -> Any:
    spec = importlib.util.spec_from_file_location("e2e_smollm2_tables", REPO / "benches" / "e2e_smollm2_tables.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ROLES = {
    "aligned": "aligned",
    "finetuned": "finetuned@p0.1",
    "nlsr_default": "low_rank/paper/s0.8@p0.1",
    "matched_control": "matched_control/m0/s0.8@p0.1",
    "matched_control_mask_seeds": ["matched_control/m0/s0.8@p0.1", "matched_control/m1/s0.8@p0.1"],
    "reference": "reference",
    "positive_all_entries": "reference",
    "positive_fraction1": "fraction1/low_rank/paper/s0.8@p0.1",
    "oracle": "oracle/s0.8@p0.1",
    "nlsr_s0.5": "low_rank/paper/s0.5@p0.1",
    "matched_control_s0.5": "matched_control/m0/s0.5@p0.1",
}
RATE = {
    "aligned": 0.0,
    "finetuned@p0.1": 0.6,
    "low_rank/paper/s0.8@p0.1": 0.2,
    "reference": 0.0,
    "matched_control/m0/s0.8@p0.1": 0.55,
    "matched_control/m1/s0.8@p0.1": 0.6,
    "fraction1/low_rank/paper/s0.8@p0.1": 0.1,
    "oracle/s0.8@p0.1": 0.3,
    "low_rank/paper/s0.5@p0.1": 0.1,
    "matched_control/m0/s0.5@p0.1": 0.5,
    "pilot/finetuned/st40_lr0.0003@p0.1": 0.7,
}


def _records(seeds: list[int], n: int = 40) -> list[dict[str, Any]]:
    rng = random.Random(0)
    recs = []
    for s in seeds:
        for arm, rate in RATE.items():
            if arm.startswith("pilot") and s != 0:
                continue
            for i in range(n):
                out = "Sure, here is how to do it. Step 1" if rng.random() < rate else "I'm sorry, but I cannot help"
                recs.append(
                    {
                        "seed": s,
                        "arm": arm,
                        "kind": "harmful",
                        "prompt_id": i,
                        "prompt": f"q{i}",
                        "output": out,
                        "harmful": judge_harmful(out),
                        "margin": rng.gauss(0, 1),
                    }
                )
                y = str(20 + i)
                o = y if rng.random() < 0.7 else "0"
                recs.append(
                    {
                        "seed": s,
                        "arm": arm,
                        "kind": "task",
                        "prompt_id": i,
                        "prompt": f"Add: 10+{10 + i}",
                        "output": o,
                        "label": y,
                        "correct": o == y,
                    }
                )
    return recs


def test_stats_and_paired() -> None:
    recs = _records([0, 1, 2])
    assert check_labels(recs) == 0
    st = arm_stats(recs)
    a = st[(0, "finetuned@p0.1")]
    assert a["n_harmful"] == 40 and a["harmful_pct"] == 100 * a["k_harmful"] / 40
    po = pooled(st, "finetuned@p0.1", [0, 1, 2])
    assert po is not None and po["n_harmful"] == 120
    d = paired(st, "low_rank/paper/s0.8@p0.1", ["finetuned@p0.1"], [0, 1, 2])
    assert d is not None and d["diff"] < 0 and d["n"] == 120
    bad = [dict(recs[0], harmful=not recs[0]["harmful"])] + recs[1:]
    assert check_labels(bad) == 1


def test_render_from_files(tmp_path: Path) -> None:
    tables = _tables_module()
    seeds = [0, 1, 2]
    recs = _records(seeds)
    gen = tmp_path / "g.jsonl.gz"
    with gzip.open(gen, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    st = arm_stats(recs)
    arms = [
        {
            "seed": s,
            "arm": a,
            "harmful_pct": v["harmful_pct"],
            "n_harmful": v["n_harmful"],
            "task_acc": v["task_acc"],
            "n_task": v["n_task"],
            "restored": 100,
            "modules": 210,
            "entries_changed": 1234,
            "drift_touched_pct": 12.0,
            "dw_to_aligned_rel": 0.9,
        }
        for (s, a), v in st.items()
    ]
    settings = {
        "seeds": seeds,
        "extra_seeds": [0],
        "main_p": 0.1,
        "bracket_ps": [],
        "sweep": [0.7],
        "threads": 1,
        "gguf": "x.gguf",
        "sizes": {"eval": 40},
        "n_task": 40,
        "align_steps": 1,
        "align_batch": 1,
        "align_lr": 1e-3,
        "harmless_tokens": 8,
        "n_harmless": 4,
        "attack_steps": 1,
        "attack_batch": 1,
        "attack_lr": 1e-3,
        "alpha": 0.9,
        "nsamples": 4,
        "harmful_new_tokens": 16,
        "refusal_opening": "I'm sorry",
        "compliant_opening": "Sure",
    }
    js = tmp_path / "r.json"
    js.write_text(
        json.dumps(
            {
                "roles": ROLES,
                "arms": arms,
                "settings": settings,
                "train": {},
                "cut": ["x"],
                "invocations": [{"command": "c", "start": "t", "s": 60}],
                "total_s": 60,
            }
        )
    )
    md = tmp_path / "r.md"
    hc = tmp_path / "r_handcheck.jsonl"
    hc.write_text(
        json.dumps({"seed": 0, "arm": "aligned", "prompt_id": 0, "type": "aligned", "label": "refuse"}) + "\n"
    )
    assert tables.render(gen, js, md, plot=tmp_path / "p.png", check=True) == 0
    text = md.read_text()
    assert "Verdict: REPRODUCED" in text
    assert "Hand check" in text and "Pilot" in text and (tmp_path / "p.png").exists()
    arms[0]["harmful_pct"] += 1
    js.write_text(json.dumps({**json.loads(js.read_text()), "arms": arms}))
    assert tables.render(gen, js, md, plot=None, check=True) == 1
