"""benches/bench_calib_released.py, run as a script (tests never import from benches/): the export of the released
code with only its device lines changed, and the entry-for-entry mask comparison. The timed runs themselves need the
released code's environment and minutes; they are not tested here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlsr_fast.ops.packed_mask import PackedMask, save_masks

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "bench_calib_released.py"
SNAPSHOT = Path("/work/.mirror/xinykou+NLSR/repo")
FILES = ("identify_neurons_or_ranks.py", "model_wrapper_low.py", "model_wrapper.py", "prune.py", "data.py",
         "layerwrapper.py", "modeling_llama.py", "sparsity_ratio_low.py")
#: lines of the released files that carry the device edits (as in the upstream files)
FAKE = {
    "identify_neurons_or_ranks.py": (
        "import torch\n"
        "model = load(device_map=\"cuda:0\")\n"
        "other = load(device_map=\"auto\")\n"
        "device_nums = torch.cuda.device_count()\n"
        "if device_nums > 1:\n"
        "    device = torch.device(\"cuda:1\")\n"
    ),
    "model_wrapper_low.py": (
        "from data import get_align\n"
        "inp, tar = batch[0].to(\"cuda:0\"), batch[1].to(\"cuda:0\")\n"
        "U, S, V = torch.svd_lowrank(score, q=q)\n"
        "U, S, V = torch.svd_lowrank(score, q=r)\n"
    ),
}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout


def _fake_snapshot(root: Path, texts: dict[str, str]) -> Path:
    repo = root / "snap"
    src = repo / "src" / "prune_regions"
    src.mkdir(parents=True)
    for f in FILES:
        (src / f).write_text(texts.get(f, f"# {f}\nx = 'cuda'  # not a line the bench edits\n"))
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "snapshot")
    return repo


def _changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    """(old line, new line) pairs of a line-for-line edit; fails if lines were added or removed."""
    a, b = before.splitlines(), after.splitlines()
    assert len(a) == len(b), f"line count changed: {len(a)} -> {len(b)}"
    return [(x, y) for x, y in zip(a, b, strict=True) if x != y]


def test_export_changes_only_the_device_lines(tmp_path: Path) -> None:
    repo = _fake_snapshot(tmp_path, FAKE)
    out = tmp_path / "out"
    res = _run("--export-only", str(out), "--snapshot", str(repo))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    # the printed list: one line per edit, 4 edits
    assert sum(1 for line in res.stdout.splitlines() if " -> " in line) == 4
    changes = {f: _changed_lines(FAKE.get(f, (repo / "src/prune_regions" / f).read_text()), (out / f).read_text())
               for f in FILES}
    assert changes["identify_neurons_or_ranks.py"] == [
        ('model = load(device_map="cuda:0")', 'model = load(device_map="cpu")'),
        ("device_nums = torch.cuda.device_count()", "device_nums = 2"),
        ('    device = torch.device("cuda:1")', '    device = torch.device("cpu")'),
    ]
    assert changes["model_wrapper_low.py"] == [
        ('inp, tar = batch[0].to("cuda:0"), batch[1].to("cuda:0")',
         'inp, tar = batch[0].to("cpu"), batch[1].to("cpu")'),
    ]
    # everything else byte for byte, the randomised SVD included
    assert all(not changes[f] for f in FILES if f not in FAKE)
    assert (out / "model_wrapper_low.py").read_text().count("torch.svd_lowrank(") == 2


def test_export_refuses_a_file_that_changed_upstream(tmp_path: Path) -> None:
    texts = dict(FAKE, **{"model_wrapper_low.py": "inp = batch[0].to('cuda')\n"})
    res = _run("--export-only", str(tmp_path / "out"), "--snapshot", str(_fake_snapshot(tmp_path, texts)))
    assert res.returncode != 0
    assert "released code changed: model_wrapper_low.py" in res.stderr
    assert "expected 1" in res.stderr


def test_export_without_a_snapshot_says_how_to_get_it(tmp_path: Path) -> None:
    res = _run("--export-only", str(tmp_path / "out"), "--snapshot", str(tmp_path / "missing"))
    assert res.returncode != 0
    assert "git clone --bare https://github.com/xinykou/NLSR" in res.stderr


@pytest.mark.skipif(not (SNAPSHOT / "HEAD").exists(), reason=f"no snapshot of the released code at {SNAPSHOT}")
def test_export_of_the_released_snapshot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run("--export-only", str(out), "--snapshot", str(SNAPSHOT))
    assert res.returncode == 0, res.stderr
    n_changed = 0
    for f in FILES:
        before = _git(SNAPSHOT, "show", f"HEAD:src/prune_regions/{f}")
        n_changed += len(_changed_lines(before, (out / f).read_text()))
    assert n_changed == 4
    ident = (out / "identify_neurons_or_ranks.py").read_text()
    low = (out / "model_wrapper_low.py").read_text()
    assert 'device_map="cuda:0"' not in ident and 'torch.device("cuda:1")' not in ident
    assert '.to("cuda:0")' not in low
    assert low.count("torch.svd_lowrank(") == 2  # the randomised SVD is the released code's own


def test_compare_counts_differing_entries(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(16, 57, generator=g) < 0.2  # [r, d_in]
    b = torch.rand(37, 16, generator=g) < 0.2  # [d_out, r]
    save_masks(tmp_path / "masks.safetensors", {"model.layers.0.self_attn.q_proj.lora_A": PackedMask.from_bool(a),
                                                "model.layers.0.self_attn.q_proj.lora_B": PackedMask.from_bool(b)})
    a2 = a.clone()
    a2[0, :3] = ~a2[0, :3]  # three entries flipped
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.save({f"{prefix}.lora_A.default": a2, f"{prefix}.lora_B.default": b.clone()}, tmp_path / "released.pt")
    res = _run("--compare", str(tmp_path / "masks.safetensors"), str(tmp_path / "released.pt"))
    assert res.returncode == 0, res.stderr
    c = json.loads(res.stdout)
    assert (c["masks"], c["entries"], c["differing_entries"], c["masks_differing"]) == (2, 16 * 57 + 37 * 16, 3, 1)
    pa = c["per_mask"]["model.layers.0.self_attn.q_proj.lora_A"]
    assert (pa["differ"], pa["kept_ours"], pa["kept_released"]) == (3, int(a.sum()), int(a2.sum()))
    assert c["per_mask"]["model.layers.0.self_attn.q_proj.lora_B"]["differ"] == 0


def test_compare_refuses_different_mask_names(tmp_path: Path) -> None:
    save_masks(tmp_path / "masks.safetensors", {"model.layers.0.mlp.up_proj.lora_A": PackedMask.ones((2, 3))})
    torch.save({"base_model.model.model.layers.0.mlp.down_proj.lora_A.default": torch.ones(2, 3, dtype=torch.bool)},
               tmp_path / "released.pt")
    res = _run("--compare", str(tmp_path / "masks.safetensors"), str(tmp_path / "released.pt"))
    assert res.returncode != 0
    assert "mask names differ" in res.stderr
