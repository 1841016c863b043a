"""Resume (issue 8 item 6): a run SIGKILLed mid-way and started again with the same arguments skips its journaled
work and produces the same output, byte for byte, as a run never interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import nlsr_fast
from nlsr_fast.resume import JOURNAL_DIR

from .conftest import World
from .test_dense import DenseWorld, dw  # noqa: F401  (the dense fixture)

# Runs realign in a child that kills itself (SIGKILL: no cleanup runs) at the N-th call of a stage function.
_KILLER = """
import os, signal, sys, json
import nlsr_fast, nlsr_fast.lora, nlsr_fast.dense, nlsr_fast.runs, nlsr_fast.calib.runtime as rt
nlsr_fast.runs.CALIBRATION_CHECKPOINT_SECONDS = 0.0  # save after every layer (600 s by default)
target, n = sys.argv[1], int(sys.argv[2])
owner, attr = {"pass1": (nlsr_fast.lora.LoraSpace, "restore_values"),  # once per module in pass 1
               "pass2": (nlsr_fast.lora.LoraSpace, "write_output"),  # once per output item in pass 2
               "dense_pass1": (nlsr_fast.dense.DenseSpace, "restore_values"),
               "dense_pass2": (nlsr_fast.dense.DenseSpace, "write_output"),
               "calibration_layer": (rt._Model, "layer")}[target]
original, calls = getattr(owner, attr), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] > n:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, attr, dying)
nlsr_fast.realign(*sys.argv[3:7], quiet=True, **json.loads(sys.argv[7]))
"""


def _killed_run(target: str, n: int, paths: list[Path], options: dict) -> None:
    run = subprocess.run([sys.executable, "-c", _KILLER, target, str(n), *map(str, paths), json.dumps(options)],
                         capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]


def _files(out: Path) -> dict[str, bytes]:
    # report.json holds timings (and the resume counts); everything else must be identical
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("report.json", "manifest.json")}


def _same_results(a: Path, b: Path) -> None:
    assert _files(a) == _files(b)
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert ra["modules"] == rb["modules"] and ra["inputs"] == rb["inputs"]
    ma, mb = (json.loads((p / "manifest.json").read_text())["files"] for p in (a, b))
    assert [f for f in ma if f["path"] != "report.json"] == [f for f in mb if f["path"] != "report.json"]


@pytest.mark.parametrize("target, n, kind", [("pass1", 9, "pass1"), ("pass2", 3, "pass2")])
def test_lora_run_killed_while_writing_resumes(world: World, tmp_path: Path, target: str, n: int, kind: str) -> None:
    options = {"method": "low_rank", "calibration": str(world.calibration), "nsamples": 16}
    paths = [world.base, world.aligned, world.finetuned]
    whole = nlsr_fast.realign(*paths, tmp_path / "whole", quiet=True, **options)
    out = tmp_path / "out"
    _killed_run(target, n, [*paths, out], options)
    assert not out.exists() and (tmp_path / "out.partial" / JOURNAL_DIR).is_dir()
    resumed = nlsr_fast.realign(*paths, out, quiet=True, **options)
    assert resumed.counts[f"resumed_{kind}"] == n
    assert resumed.counts["resumed_calibration"] == 1  # calibration finished before the kill: not redone
    assert "calibrate" not in resumed.timings and "calibrate" in whole.timings
    _same_results(tmp_path / "whole", out)
    assert not (out / JOURNAL_DIR).exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("method", ["low_rank", "wanda"])
def test_lora_run_killed_during_calibration_resumes_after_its_last_layer(world: World, tmp_path: Path, method: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import nlsr_fast.calib.runtime as rt

    options = {"method": method, "calibration": str(world.calibration), "nsamples": 16}
    paths = [world.base, world.aligned, world.finetuned]
    nlsr_fast.realign(*paths, tmp_path / "whole", quiet=True, **options)
    out = tmp_path / "out"
    _killed_run("calibration_layer", 1, [*paths, out], options)  # killed as it loads layer 1: layer 0 was saved
    loaded: list[int] = []
    original = rt._Model.layer
    monkeypatch.setattr(rt._Model, "layer", lambda self, idx: loaded.append(idx) or original(self, idx))
    resumed = nlsr_fast.realign(*paths, out, quiet=True, **options)
    assert loaded == [1]  # the resumed calibration ran layer 1 only (the world has 2 layers)
    assert "resumed_calibration" not in resumed.counts
    _same_results(tmp_path / "whole", out)


def test_dense_run_killed_in_pass2_resumes(dw: DenseWorld, tmp_path: Path) -> None:  # noqa: F811
    options = {"method": "magnitude", "max_shard_bytes": 20_000, "prune_rate": 0.7}
    paths = [dw.base, dw.aligned, dw.finetuned]
    nlsr_fast.realign(*paths, tmp_path / "whole", quiet=True, **options)
    out = tmp_path / "out"
    _killed_run("dense_pass2", 4, [*paths, out], options)
    resumed = nlsr_fast.realign(*paths, out, quiet=True, **options)
    assert resumed.counts["resumed_pass1"] == 14 and resumed.counts["resumed_pass2"] == 4
    _same_results(tmp_path / "whole", out)


@pytest.mark.parametrize("target, n", [("dense_pass1", 5), ("dense_pass2", 0), ("dense_pass2", 4)])
def test_safelora_dense_on_an_aligned_adapter_killed_resumes(dw: DenseWorld, tmp_path: Path,  # noqa: F811
                                                             target: str, n: int) -> None:
    # pass 1 stashes each module's Q (r x d_in) for pass 2's W_0 + left @ Q: killed in pass 1, between the passes
    # (at pass 2's first write) or in pass 2, the resumed run reads back the Q of the journaled modules
    options = {"method": "safelora", "count": 8, "max_shard_bytes": 20_000}
    paths = [dw.base, dw.adapter, dw.finetuned]
    nlsr_fast.realign(*paths, tmp_path / "whole", quiet=True, **options)
    out = tmp_path / "out"
    _killed_run(target, n, [*paths, out], options)
    resumed = nlsr_fast.realign(*paths, out, quiet=True, **options)
    assert resumed.counts["resumed_pass1"] == (n if target == "dense_pass1" else 14)
    assert resumed.counts.get("resumed_pass2", 0) == (n if target == "dense_pass2" else 0)
    _same_results(tmp_path / "whole", out)


@pytest.mark.parametrize("method", ["safelora", "antidote", "resta"])
def test_other_defences_killed_in_pass2_resume(world: World, dw: DenseWorld, tmp_path: Path,  # noqa: F811
                                               method: str) -> None:
    # safelora recomputes its chosen dense modules in pass 2 (a full aligned checkpoint: nothing stashed), antidote
    # writes zeros there, resta reads its three models there (adapter inputs run in dense mode)
    options = {"safelora": {"method": method, "count": 8}, "resta": {"method": method, "dare_rate": 0.2},
               "antidote": {"method": method, "calibration": str(dw.calibration), "nsamples": 8}}[method]
    for mode, paths, target in (("dense", [dw.base, dw.aligned, dw.finetuned], "dense_pass2"),
                                ("lora", [world.base, world.aligned, world.finetuned],
                                 "dense_pass2" if method == "resta" else "pass2")):
        if method == "antidote" and mode == "lora":
            options["calibration"] = str(world.calibration)
        whole, out = tmp_path / f"{mode}_whole", tmp_path / f"{mode}_out"
        nlsr_fast.realign(*paths, whole, quiet=True, **options)
        _killed_run(target, 4, [*paths, out], options)
        resumed = nlsr_fast.realign(*paths, out, quiet=True, **options)
        assert resumed.counts["resumed_pass2"] == 4, mode
        _same_results(whole, out)


def test_partial_of_another_run_is_refused_not_resumed(world: World, tmp_path: Path) -> None:
    paths = [world.base, world.aligned, world.finetuned]
    out = tmp_path / "out"
    _killed_run("pass1", 3, [*paths, out], {"method": "random"})
    with pytest.raises(ValueError, match="out.partial exists, left by a run that did not finish with other inputs"):
        nlsr_fast.realign(*paths, out, quiet=True, method="random", seed=7)
    rep = nlsr_fast.realign(*paths, out, quiet=True, method="random", seed=7, overwrite=True)
    assert "resumed_pass1" not in rep.counts and out.is_dir()
