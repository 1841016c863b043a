"""`torchrun --nproc_per_node 2` (gloo, CPU processes) gives the same output as one process.

Passes 1 and 2 are module-parallel (each rank writes its modules into the files rank 0 planned) and calibration
is data-parallel (statistics summed in fp64). The output tensors, the masks and the restored set are compared
bit for bit; similarities to 1e-9 (each module's similarity is computed by one rank from the same tensors, so
they come out equal here, but the summed statistics may differ in the last bits in general).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nlsr_fast
from nlsr_fast.io import CheckpointReader
from nlsr_fast.ops import load_masks

from .conftest import World
from .test_dense import DenseWorld, dw  # noqa: F401  (the dense fixture)


def _torchrun(args: list[str], tmp: Path,
              program: tuple[str, ...] = ("-m", "nlsr_fast")) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *program, "realign", *args, "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "adapter_model.safetensors"))
    r = CheckpointReader(folder)
    return {k: r.get(k).clone() for k in r.keys()}


def _same(one: Path, two: Path) -> None:
    ta, tb = _tensors(one), _tensors(two)
    assert list(ta) == list(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
    ma, mb = load_masks(one / "masks.safetensors"), load_masks(two / "masks.safetensors")
    assert sorted(ma) == sorted(mb) and all(ma[k].equal(mb[k]) for k in ma)
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (one, two))
    assert [m["name"] for m in ra["modules"]] == [m["name"] for m in rb["modules"]]
    assert [m["restored"] for m in ra["modules"]] == [m["restored"] for m in rb["modules"]]
    assert [m["changed_a"] for m in ra["modules"]] == [m["changed_a"] for m in rb["modules"]]
    for x, y in zip(ra["modules"], rb["modules"], strict=True):
        assert (x["similarity"] is None and y["similarity"] is None) or abs(x["similarity"] - y["similarity"]) <= 1e-9
    assert ra["counts"] == rb["counts"] and ra["inputs"] == rb["inputs"]
    assert not Path(f"{two}.partial").exists() and not Path(f"{two}.lock").exists()


@pytest.mark.parametrize("method, preset", [("random", "paper"), ("low_rank", "paper"), ("wanda", "official"),
                                            ("snip", "official"), ("safelora", "paper"), ("antidote", "paper")])
def test_torchrun_lora_equals_one_process(world: World, tmp_path: Path, method: str, preset: str) -> None:
    common = dict(method=method, preset=preset, calibration=world.calibration, nsamples=16)
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "one", quiet=True, **common)
    _torchrun([str(world.base), str(world.aligned), str(world.finetuned), str(tmp_path / "two"), "--method", method,
               "--preset", preset, "--calibration", str(world.calibration), "--nsamples", "16"], tmp_path)
    _same(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "snip", "safelora", "antidote"])
def test_torchrun_dense_equals_one_process(dw: DenseWorld, tmp_path: Path, method: str) -> None:  # noqa: F811
    nlsr_fast.realign(dw.base, dw.aligned, dw.finetuned, tmp_path / "one", method=method, calibration=dw.calibration,
                      nsamples=8, quiet=True, max_shard_bytes=20_000)
    _torchrun([str(dw.base), str(dw.aligned), str(dw.finetuned), str(tmp_path / "two"), "--method", method,
               "--calibration", str(dw.calibration), "--nsamples", "8", "--max-shard-bytes", "20000"], tmp_path)
    _same(tmp_path / "one", tmp_path / "two")
    assert len(list((tmp_path / "two").glob("model-*.safetensors"))) > 2


def test_torchrun_dense_safelora_on_an_aligned_adapter_equals_one_process(dw: DenseWorld,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    # each process stashes the Q of its own modules in pass 1 and writes them in pass 2
    nlsr_fast.realign(dw.base, dw.adapter, dw.finetuned, tmp_path / "one", method="safelora", count=8, quiet=True,
                      max_shard_bytes=20_000)
    _torchrun([str(dw.base), str(dw.adapter), str(dw.finetuned), str(tmp_path / "two"), "--method", "safelora",
               "--count", "8", "--max-shard-bytes", "20000"], tmp_path)
    _same(tmp_path / "one", tmp_path / "two")


def test_torchrun_resta_with_dare_equals_one_process(dw: DenseWorld, tmp_path: Path) -> None:  # noqa: F811
    # each process draws DARE for its own modules: the draw depends on (seed, module) only
    nlsr_fast.realign(dw.base, dw.aligned, dw.finetuned, tmp_path / "one", method="resta", dare_rate=0.3, seed=3,
                      unaligned=dw.adapter, quiet=True, max_shard_bytes=20_000)
    _torchrun([str(dw.base), str(dw.aligned), str(dw.finetuned), str(tmp_path / "two"), "--method", "resta",
               "--dare-rate", "0.3", "--seed", "3", "--unaligned", str(dw.adapter), "--max-shard-bytes", "20000"],
              tmp_path)
    _same(tmp_path / "one", tmp_path / "two")


# The CLI in-process, then the names of the threads still running: a process group's gloo threads left alive here
# finish their last collective during interpreter exit and can abort the process there, after a successful run.
_CLI_THEN_THREADS = """
import json, os, sys
from nlsr_fast.cli import main
rc = main(sys.argv[2:])
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(f"{sys.argv[1]}.{os.environ['RANK']}", "w") as f:  # a file per rank: the ranks share stdout
    json.dump(sorted(n for n in names if "gloo" in n), f)
sys.exit(rc)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")
@pytest.mark.parametrize("method", ["wanda", "snip"])
def test_torchrun_leaves_no_process_group_thread_behind(dw: DenseWorld, tmp_path: Path, method: str) -> None:  # noqa: F811
    # Calibration imports transformers.modeling_utils, which imports torch.distributed.fsdp: imported after the group
    # was made, that kept the group (and its threads) alive past destroy_process_group (see Dist.from_env).
    script = tmp_path / "cli_then_threads.py"
    script.write_text(_CLI_THEN_THREADS, encoding="utf-8")
    threads = tmp_path / "gloo_threads"
    _torchrun([str(dw.base), str(dw.aligned), str(dw.finetuned), str(tmp_path / "out"), "--method", method,
               "--calibration", str(dw.calibration), "--nsamples", "8"], tmp_path, program=(str(script), str(threads)))
    left = {rank: json.loads(Path(f"{threads}.{rank}").read_text()) for rank in (0, 1)}
    assert left == {0: [], 1: []}
