"""The experiment script's plan filters (--seeds, --tiers) and the merge of work folders (no model is loaded)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from ._helpers import bench_script


def test_readme_arms_are_tiers_1_to_3() -> None:
    e = bench_script("e2e_smollm2")
    cfg = {**e.FULL, "extra_seeds": [0, 1, 2], "mask_seeds_s05": 3, "attack_steps": 16, "attack_lr": 3e-4}
    items = e.plan(cfg)
    args = argparse.Namespace(seeds=None, tiers=["1", "2", "3"])
    picked = [it for it in items if e.wanted(it, args)]
    # per seed: aligned, fine-tuned, reference, NLSR 0.8, 3 controls, fraction=1, oracle; NLSR 0.5 + 3 controls;
    # official / wanda / snip / random at 0.8
    assert len(picked) == 3 * (9 + 4 + 4)
    assert {it["tier"] for it in picked} == {"1 core", "2 sparsity 0.5", "3 methods 0.8"}
    one_seed = [it for it in items if e.wanted(it, argparse.Namespace(seeds=[2], tiers=["1", "2", "3"]))]
    assert len(one_seed) == 17 and {it["seed"] for it in one_seed} == {2}
    assert [it for it in items if e.wanted(it, argparse.Namespace(seeds=None, tiers=None))] == items
    assert e.FULL["harmful_new_tokens"] == 96


def _folder(path: Path, arms: dict[str, Any], train: dict[str, Any]) -> Path:
    path.mkdir()
    state = {"arms": arms, "train": train, "cut": [], "invocations": [{"command": "c", "start": "t", "s": 1.0}],
             "settings": {"seeds": [0, 1, 2]}, "harmless": {"n": 100}}
    (path / "state.json").write_text(json.dumps(state))
    return path


def test_merge_states(tmp_path: Path) -> None:
    e = bench_script("e2e_smollm2")
    a = _folder(tmp_path / "full-seeds0_1", {"0|aligned": {"x": 1}, "1|aligned": {"x": 2}}, {"seed0/aligned": {}})
    b = _folder(tmp_path / "full-seeds2", {"2|aligned": {"x": 3}}, {"seed2/aligned": {}})
    state: dict[str, Any] = {"arms": {}, "train": {}, "cut": [], "invocations": []}
    dirs = e.merge_states(state, [a, b])
    assert dirs == {"0|aligned": a / "gens", "1|aligned": a / "gens", "2|aligned": b / "gens"}
    assert [state["arms"][k]["x"] for k in ("0|aligned", "1|aligned", "2|aligned")] == [1, 2, 3]
    assert set(state["train"]) == {"seed0/aligned", "seed2/aligned"}
    assert [inv["work"] for inv in state["invocations"]] == ["full-seeds0_1", "full-seeds2"]
    assert state["settings"] == {"seeds": [0, 1, 2]} and state["harmless"] == {"n": 100}
    with pytest.raises(SystemExit, match=r"arm 2\|aligned of .*full-seeds2 is already in"):
        e.merge_states(state, [b])
