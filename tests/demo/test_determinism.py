"""The demo's numbers do not depend on the caller's thread settings or on the CPU's instruction set.

Each run happens in its own process (the pins are read when torch, MKL and the extension start). A machine without
AVX-512 is simulated for MKL with MKL_ENABLE_INSTRUCTIONS=AVX2: without the pins that alone changes the trained
weights on an AVX-512 machine (test_unpinned_isa_changes_weights shows the check can see such a difference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nlsr_fast.demo as demo
from nlsr_fast.demo import determinism

# A world trained for a few steps only: its table means nothing, but every stage runs (training, the attack's probe,
# the three realign runs, greedy generation), so any number that moved would show in the files.
_TINY = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from nlsr_fast.demo import run_demo
from nlsr_fast.demo.train import Schedule
run_demo(sys.argv[1], schedule=Schedule(pretrain_steps=30, aligned_steps=10, finetune_steps=10), progress=False)
"""

_TRAIN = """
import sys
from pathlib import Path
import torch
from nlsr_fast.demo.train import Schedule, build_world
from nlsr_fast.demo.world import make_splits
torch.set_num_threads(1)
build_world(Path(sys.argv[1]), make_splits(0), harmful_share=0.2, seed=0,
            schedule=Schedule(pretrain_steps=20, aligned_steps=1, finetune_steps=1))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in determinism.PINNED_ENV and k != "MKL_ENABLE_INSTRUCTIONS"}
    env.update(extra)
    return env


def _intel_cpu() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "GenuineIntel" in cpuinfo.read_text()


def _run(*runs: tuple[list[str], dict[str, str]]) -> None:
    """`python ARGS` with ENV for each (args, env), all at once (each runs on one thread)."""
    procs = [subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for args, env in runs]
    outs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-5000:]


def _tensors(folder: Path) -> dict[str, bytes]:
    """Every tensor of every safetensors file under `folder`, as raw bytes (file metadata order does not matter)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        if ".partial" in str(path):
            continue
        with safe_open(path, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).contiguous()
                out[f"{path.relative_to(folder)}:{key}"] = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return out


def _same_world(a: Path, b: Path) -> None:
    ra, rb = (json.loads((w / "results.json").read_text()) for w in (a, b))
    assert ra["rows"] and [{**r, "adapter": None, "generations": None} for r in ra["rows"]] == \
        [{**r, "adapter": None, "generations": None} for r in rb["rows"]]
    assert ra["train"].keys() == rb["train"].keys()
    for stage in ra["train"]:
        assert ra["train"][stage]["final_loss"] == rb["train"][stage]["final_loss"], stage
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) > 50 and ta.keys() == tb.keys()
    assert [k for k in ta if ta[k] != tb[k]] == []
    for gen in sorted((a / "generations").glob("*.jsonl")):
        assert gen.read_text() == (b / "generations" / gen.name).read_text(), gen.name
    for r in (ra, rb):
        assert r["numerics"]["pinned_env"] and r["numerics"]["torch_threads"] == 1
        assert r["numerics"]["deterministic_algorithms"]


def test_pinned_environ_and_is_pinned():
    env = determinism.pinned_environ({"OMP_NUM_THREADS": "16", "HOME": "/h"})
    assert env["OMP_NUM_THREADS"] == "1" and env["HOME"] == "/h" and determinism.is_pinned(env)
    assert not determinism.is_pinned({**env, "MKL_CBWR": "AUTO"})
    assert not determinism.is_pinned({})


def test_deterministic_restores_threads_and_flags():
    threads = torch.get_num_threads()
    before = torch.are_deterministic_algorithms_enabled()
    with determinism.deterministic(3):
        assert torch.get_num_threads() == determinism.TORCH_THREADS
        assert torch.are_deterministic_algorithms_enabled()
        a = torch.rand(3)
    with determinism.deterministic(3):
        assert torch.equal(a, torch.rand(3))
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == before


def test_main_reexecs_pinned_with_the_same_arguments(monkeypatch, tmp_path):
    for k in determinism.PINNED_ENV:
        monkeypatch.delenv(k, raising=False)
    calls = []
    monkeypatch.setattr(demo, "run_pinned", lambda argv: calls.append(list(argv)) or 7)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--workdir", str(tmp_path), "--quick", "--seed", "5", "--harmful-share", "0.3",
                              "--keep"])
    assert demo.main(args) == 7
    assert parser.parse_args(calls[0]) == args


def test_numerics_reports_the_paths():
    num = determinism.numerics()
    assert set(num["env"]) == set(determinism.PINNED_ENV)
    assert num["versions"]["torch"] and num["aten_cpu_capability"]


def test_tiny_world_same_under_other_threads_and_isa(tmp_path):
    """Two pinned processes: the caller asks torch for 2 threads in one; MKL is limited to AVX2 in the other."""
    a, b = tmp_path / "a", tmp_path / "b"
    _run((["-c", _TINY, str(a), "2"], determinism.pinned_environ(_env())),
         (["-c", _TINY, str(b), "1"], determinism.pinned_environ(_env(MKL_ENABLE_INSTRUCTIONS="AVX2"))))
    _same_world(a, b)


def test_unpinned_isa_changes_weights(tmp_path):
    """The control: without the pins, MKL's AVX2 path alone changes the base's weights on an AVX-512 CPU."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not _intel_cpu():
        pytest.skip("needs an Intel AVX-512 CPU to see two MKL paths (MKL takes no AVX-512 path on AMD)")
    a, b = tmp_path / "a", tmp_path / "b"
    _run((["-c", _TRAIN, str(a)], _env(OMP_NUM_THREADS="1")),
         (["-c", _TRAIN, str(b)], _env(OMP_NUM_THREADS="1", MKL_ENABLE_INSTRUCTIONS="AVX2")))
    ta, tb = _tensors(a / "base"), _tensors(b / "base")
    assert ta.keys() == tb.keys() and any(ta[k] != tb[k] for k in ta)


@pytest.mark.slow
def test_quick_demo_same_under_other_threads_and_isa(tmp_path):
    """The real entry point (`python -m nlsr_fast.demo --quick`, which re-executes itself pinned) with
    OMP_NUM_THREADS=1, then with OMP_NUM_THREADS=2 and MKL limited to AVX2: the same table, weights and generations."""
    a, b = tmp_path / "a", tmp_path / "b"
    _run((["-m", "nlsr_fast.demo", "--quick", "--workdir", str(a)], _env(OMP_NUM_THREADS="1")),
         (["-m", "nlsr_fast.demo", "--quick", "--workdir", str(b)],
          _env(OMP_NUM_THREADS="2", MKL_ENABLE_INSTRUCTIONS="AVX2")))
    _same_world(a, b)
