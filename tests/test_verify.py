"""`nlsr-fast verify` (issue 8 item 7): the manifest, report/masks agreement, and the weights against the inputs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nlsr_fast
from nlsr_fast import cli, testing
from nlsr_fast.io import LoraAdapter, write_manifest, write_safetensors
from nlsr_fast.verify import verify, verify_summary


class _World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = testing.make_tiny_llama(root / "base", layers=2, hidden=32, max_shard_size="20KB")
        self.aligned = testing.make_lora_adapter(root / "aligned", self.base, r=4, alpha=8.0, seed=1)
        self.finetuned = testing.continue_lora_adapter(root / "finetuned", self.aligned, seed=2, std=0.05,
                                                       drift_modules=["layers.1.mlp", "q_proj"])
        self.other_ref = testing.make_lora_adapter(root / "other_ref", self.base, r=4, alpha=8.0, seed=5)

    def realign(self, out: Path, **kwargs: object) -> Path:
        args: dict = {"method": "random", "selection": "fraction", "fraction": 0.5, "quiet": True, "seed": 1}
        args.update(kwargs)
        nlsr_fast.realign(self.base, self.aligned, self.finetuned, out, **args)
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> _World:
    return _World(tmp_path_factory.mktemp("verify_world"))


@pytest.fixture(scope="module")
def good(world: _World) -> Path:
    return world.realign(world.root / "good")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _inputs(world: _World) -> dict[str, Path]:
    return {"finetuned": world.finetuned, "aligned": world.aligned}


def _rewrite_adapter(out: Path, change) -> None:
    """Rewrite out's adapter tensors through `change(tensors)` and re-seal the manifest (a forged output whose
    manifest is consistent: only the deeper checks can catch it)."""
    ad = LoraAdapter.load(out)
    tensors = {k: ad.raw(k).clone() for k in ad.raw_keys}
    ad.close()
    change(tensors)
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    write_manifest(out)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _set_report(out: Path, data: dict) -> None:
    (out / "report.json").write_text(json.dumps(data, indent=2))
    write_manifest(out)


def test_fresh_output_verifies(world: _World, good: Path) -> None:
    rep = _report(good)
    assert 0 < rep["counts"]["restored"] < rep["counts"]["modules"]
    assert verify(good) == []
    problems, checked = verify_summary(good, **_inputs(world))
    assert problems == []
    assert any(c.startswith("manifest (") for c in checked)
    assert "unrestored weights equal the fine-tuned input bit for bit" in checked
    assert "restored entries equal the reference recomputed from the aligned adapter" in checked


def test_manifest_tampering_is_found(good: Path, tmp_path: Path) -> None:
    out = _copy(good, tmp_path / "o")
    path = out / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    (out / "notes.txt").write_text("added")
    problems = verify(out)
    assert any("adapter_model.safetensors: sha256" in p for p in problems)
    assert any("notes.txt: not listed in the manifest" in p for p in problems)
    (out / "manifest.json").unlink()
    assert any("no manifest" in p for p in verify(out))


def test_unrestored_module_changed_is_found(world: _World, good: Path, tmp_path: Path) -> None:
    out = _copy(good, tmp_path / "o")
    rep = _report(out)
    name = next(m["name"] for m in rep["modules"] if not m["restored"])
    ad = LoraAdapter.load(out)
    key = ad.key_b(name)
    ad.close()

    def change(t: dict) -> None:
        t[key].view(-1)[3] += 1.0

    _rewrite_adapter(out, change)
    assert verify(out) == []  # the manifest alone cannot tell
    problems = verify(out, finetuned=world.finetuned)
    assert problems == [f"module {name}: lora_B: 1 entries differ from the fine-tuned input though the module was "
                        "not restored"]


def test_restored_entries_are_checked_against_the_reference(world: _World, good: Path, tmp_path: Path) -> None:
    from nlsr_fast.ops import load_masks

    out = _copy(good, tmp_path / "o")
    rep = _report(out)
    name = next(m["name"] for m in rep["modules"] if m["restored"])
    mask = load_masks(out / "masks.safetensors")[f"{name}.lora_A"].to_bool()
    ad = LoraAdapter.load(out)
    key, transposed = ad.key_a(name), ad.module(name).transposed
    ad.close()
    assert not transposed
    i, j = (int(x) for x in mask.nonzero()[0])
    k, m = (int(x) for x in (~mask).nonzero()[0])

    def change_inside(t: dict) -> None:
        t[key][i, j] *= 2.0

    _rewrite_adapter(out, change_inside)
    problems = verify(out, finetuned=world.finetuned)  # inside the mask: only the reference can tell
    assert problems == [f"module {name}: lora_A: 2 entries differ from the fine-tuned input, report.json says "
                        f"{next(r['changed_a'] for r in rep['modules'] if r['name'] == name)}"] or problems == []
    problems = verify(out, aligned=world.aligned)
    assert problems == [f"module {name}: lora_A: 1 masked entries differ from the reference"]

    out2 = _copy(good, tmp_path / "o2")

    def change_outside(t: dict) -> None:
        t[key][k, m] += 1.0

    _rewrite_adapter(out2, change_outside)
    assert any(f"module {name}: lora_A: 1 entries outside the mask differ" in p
               for p in verify(out2, finetuned=world.finetuned))


def test_output_mixed_from_two_runs_is_found(world: _World, good: Path, tmp_path: Path) -> None:
    """issue 8's failure: an OUT whose adapter came from the other run while its report describes itself."""
    other = world.realign(tmp_path / "other", seed=2)
    out = _copy(good, tmp_path / "mixed")
    shutil.copyfile(other / "adapter_model.safetensors", out / "adapter_model.safetensors")
    write_manifest(out)
    assert verify(out, **_inputs(world)) != []
    # masks from the other run: the masks no longer match the report's densities or the weights.
    out2 = _copy(good, tmp_path / "mixed2")
    shutil.copyfile(other / "masks.safetensors", out2 / "masks.safetensors")
    write_manifest(out2)
    assert verify(out2, **_inputs(world)) != []


def test_report_and_masks_must_agree(good: Path, tmp_path: Path) -> None:
    out = _copy(good, tmp_path / "o")
    rep = _report(out)
    rec = next(m for m in rep["modules"] if not m["restored"])
    rec["restored"] = True
    _set_report(out, rep)
    problems = verify(out)
    assert any("counts.restored" in p for p in problems)
    rep = _report(good)
    rep["modules"].pop(0)
    rep["counts"]["modules"] -= 1
    out2 = _copy(good, tmp_path / "o2")
    _set_report(out2, rep)
    assert any("masks of no module in report.json" in p for p in verify(out2))
    assert any("is not in report.json" in p for p in verify(out2))
    rep = _report(good)
    rep["modules"][0]["density_a"] = 0.123
    out3 = _copy(good, tmp_path / "o3")
    _set_report(out3, rep)
    assert any("density" in p and rep["modules"][0]["name"] in p for p in verify(out3))
    rep = _report(good)
    rec = next(m for m in rep["modules"] if not m["restored"])
    rec["changed_b"] = 5
    out4 = _copy(good, tmp_path / "o4")
    _set_report(out4, rep)
    assert any("not restored but report.json counts 5 changed entries" in p for p in verify(out4))


def test_adaptive_draws_agree_with_restored_flags(world: _World, tmp_path: Path) -> None:
    out = world.realign(tmp_path / "adaptive", selection="adaptive", fraction=None)
    assert verify(out, **_inputs(world)) == []
    rep = _report(out)
    rec = rep["modules"][0]
    rec["draw"] = 1 - int(rec["draw"])
    _set_report(out, rep)
    assert any(f"module {rec['name']}: adaptive draw" in p for p in verify(out))


def test_ready_reference(world: _World, tmp_path: Path) -> None:
    out = world.realign(tmp_path / "ref", reference=world.other_ref)
    problems, checked = verify_summary(out, **_inputs(world))
    assert problems == [] and any("NOT checked" in c and "--reference" in c for c in checked)
    problems, checked = verify_summary(out, finetuned=world.finetuned, reference=world.other_ref)
    assert problems == [] and "restored entries equal the given reference" in checked
    # The wrong reference is caught.
    assert verify(out, finetuned=world.finetuned, reference=world.aligned) != []


def test_bad_input_raises(good: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        verify(tmp_path / "nope")
    with pytest.raises(ValueError, match="--finetuned .* does not exist"):
        verify(good, finetuned=tmp_path / "nope")


def test_cli_verify_exit_codes(world: _World, good: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["verify", str(good), "--finetuned", str(world.finetuned), "--aligned", str(world.aligned)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"OK: {good}: manifest (") and "bit for bit" in printed
    out = _copy(good, tmp_path / "o")
    (out / "report.json").write_text("{}")
    assert cli.main(["verify", str(out)]) == 1
    captured = capsys.readouterr()
    assert "FAIL: " in captured.out and "report.json: size 2 bytes" in captured.out
    assert "problem(s)" in captured.err
    assert cli.main(["verify", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlsr-fast verify: error: output") and "Traceback" not in err


def test_cli_verify_subprocess(good: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nlsr_fast", "verify", str(good)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("OK: "), proc.stderr


def _full_checkpoint(adapter: Path, base: Path, dst: Path) -> Path:
    """The adapter merged into the base, saved as a full checkpoint (PEFT merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(dst, max_shard_size="20KB")
    AutoTokenizer.from_pretrained(base).save_pretrained(dst)
    return dst


def test_dense_output_verifies(world: _World, tmp_path: Path) -> None:
    aligned = _full_checkpoint(world.aligned, world.base, tmp_path / "aligned_full")
    finetuned = _full_checkpoint(world.finetuned, world.base, tmp_path / "finetuned_full")
    out = tmp_path / "dense"
    nlsr_fast.realign(world.base, aligned, finetuned, out, mode="dense", method="magnitude",
                      selection="fraction", fraction=0.5, quiet=True)
    rep = _report(out)
    assert rep["mode"] == "dense" and 0 < rep["counts"]["restored"]
    problems, checked = verify_summary(out, base=world.base, aligned=aligned, finetuned=finetuned)
    assert problems == [], problems
    assert "restored entries equal the reference" in checked
    assert "unrestored weights equal the fine-tuned input bit for bit" in checked
    # A forged non-target tensor is found.
    from safetensors.torch import load_file, save_file

    shard = sorted(out.glob("*.safetensors"))
    shard = [p for p in shard if p.name != "masks.safetensors"][0]
    tensors = load_file(shard)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    save_file(tensors, shard, metadata={"format": "pt"})
    write_manifest(out)
    assert any(key.removesuffix(".weight") in p or key in p for p in verify(out, finetuned=finetuned))


def test_two_identical_runs_give_identical_weights_and_masks(world: _World, good: Path, tmp_path: Path) -> None:
    """issue 8: masks.safetensors bytes changed from run to run, and it was written 0600 while the rest is 0644."""
    again = world.realign(tmp_path / "again")
    for name in ("adapter_model.safetensors", "masks.safetensors", "adapter_config.json"):
        assert (again / name).read_bytes() == (good / name).read_bytes(), name
    plain = tmp_path / "plain"
    plain.write_text("x")
    modes = {p.name: p.stat().st_mode & 0o777 for p in again.iterdir()}
    assert set(modes.values()) == {plain.stat().st_mode & 0o777}, modes


def test_dense_output_from_adapters_verifies(world: _World, tmp_path: Path) -> None:
    """Dense mode with adapters as inputs (merged on the base on the fly): verify merges them the same way."""
    out = tmp_path / "dense_ad"
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, mode="dense", method="magnitude",
                      selection="fraction", fraction=0.5, quiet=True)
    assert _report(out)["mode"] == "dense"
    problems, checked = verify_summary(out, base=world.base, aligned=world.aligned, finetuned=world.finetuned)
    assert problems == [], problems
    assert "restored entries equal the reference" in checked
    assert "unrestored weights equal the fine-tuned input bit for bit" in checked
    problems, checked = verify_summary(out, finetuned=world.finetuned)
    assert problems == [] and any("pass --base too" in c for c in checked)
    # Another fine-tuned model is caught.
    assert verify(out, base=world.base, finetuned=world.aligned) != []


NORM = "base_model.model.model.norm.weight"  # a non-LoRA tensor in an adapter (like a modules_to_save head)


@pytest.fixture(scope="module")
def ft_extra(world: _World) -> Path:
    """The fine-tuned adapter plus a trained non-LoRA tensor."""
    from safetensors.torch import load_file, save_file

    from nlsr_fast.io import CheckpointReader

    dst = world.root / "finetuned_extra"
    shutil.copytree(world.finetuned, dst)
    sd = load_file(str(dst / "adapter_model.safetensors"))
    sd[NORM] = CheckpointReader(world.base).get("model.norm.weight").clone() + 0.5
    save_file(sd, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("policy", ["keep", "restore"])
def test_non_lora_tensors_are_checked(world: _World, ft_extra: Path, tmp_path: Path, policy: str) -> None:
    """issue 8 item 3: a non-LoRA tensor must never pass silently; verify checks it against what report.json says
    was done with it."""
    out = tmp_path / policy
    nlsr_fast.realign(world.base, world.aligned, ft_extra, out, method="random", quiet=True, extra_tensors=policy)
    problems, checked = verify_summary(out, base=world.base, aligned=world.aligned, finetuned=ft_extra)
    assert problems == [], problems
    assert "1 non-LoRA tensor(s) equal what report.json says was done with them" in checked
    # Forged: the tensor changed after the run.
    forged = _copy(out, tmp_path / f"{policy}_forged")

    def change(t: dict) -> None:
        t[NORM] = t[NORM] + 1.0

    _rewrite_adapter(forged, change)
    assert any(f"tensor {NORM}: differs from" in p
               for p in verify(forged, base=world.base, aligned=world.aligned, finetuned=ft_extra))
    # Forged: report.json does not list it (a silent copy).
    silent = _copy(out, tmp_path / f"{policy}_silent")
    rep = _report(silent)
    rep["extra_tensors"] = []
    _set_report(silent, rep)
    assert verify(silent) == [f"tensor {NORM}: a non-LoRA tensor in the output that report.json does not list "
                              "(copied silently)"]


def test_non_finite_output_is_found(good: Path, tmp_path: Path) -> None:
    """issue 8 item 2: NaN in the weights passed straight through; an output of a run that did not allow
    non-finite inputs must hold none."""
    out = _copy(good, tmp_path / "nan")
    ad = LoraAdapter.load(out)
    key = ad.raw_keys[1]
    ad.close()

    def change(t: dict) -> None:
        t[key].view(-1)[5] = float("nan")

    _rewrite_adapter(out, change)
    assert verify(out) == [f"tensor {key}: 1 non-finite value(s), the first at flat index 5 (nan); the run did not "
                           "allow non-finite inputs"]


def _forge_masks(out: Path, key: str, change) -> tuple[float, float]:
    """Rewrite one mask of out's masks.safetensors through `change(bool tensor)` and re-seal the manifest; the mask's
    density before and after."""
    from nlsr_fast.ops import PackedMask, load_masks, save_masks

    # copies: the loaded bits may be mapped from the file that save_masks truncates
    masks = {k: PackedMask(m.bits.clone(), m.shape) for k, m in load_masks(out / "masks.safetensors").items()}
    before = masks[key].density()
    dense = masks[key].to_bool().clone()
    change(dense)
    masks[key] = PackedMask.from_bool(dense)
    save_masks(out / "masks.safetensors", masks)
    write_manifest(out)
    return before, masks[key].density()


def test_mask_counts_follow_the_methods_rule_per_row(good: Path, tmp_path: Path) -> None:
    """A random mask whose total is right but one entry moved to another row: the density agrees with the report,
    the per-row count of the method does not (docs/algorithm.md §9.1)."""
    out = _copy(good, tmp_path / "o")
    name = _report(out)["modules"][0]["name"]

    def move(m: torch.Tensor) -> None:
        m[0, int(m[0].nonzero()[0])] = False
        m[1, int((~m[1]).nonzero()[0])] = True

    before, after = _forge_masks(out, f"{name}.lora_A", move)
    assert before == after
    problems = verify(out)
    want = 32 - math.floor(0.8 * 32)  # d_in = 32 at the default sparsity
    assert f"module {name}: mask {name}.lora_A: row 0 keeps {want - 1} entries; random at sparsity 0.8 keeps {want} " \
           "per row (2 rows differ)" in problems
    assert all("density" not in p for p in problems)


def test_mask_counts_follow_the_methods_rule_per_factor(world: _World, tmp_path: Path) -> None:
    """low_rank keeps n - floor(s n) of each whole factor (one fewer in the official preset): one more entry, with
    the report's density forged to match, is found."""
    calib = testing.write_calibration_jsonl(tmp_path / "c.jsonl", 8)
    for preset, fewer in (("paper", 0), ("official", 1)):
        out = world.realign(tmp_path / preset, method="low_rank", preset=preset, calibration=calib, nsamples=8)
        assert verify(out) == []
        rep = _report(out)
        rec = rep["modules"][0]
        key = f"{rec['name']}.lora_B"
        d_out, r = rec["shape_b"]
        _, after = _forge_masks(out, key, lambda m: m.view(-1).__setitem__(int((~m.view(-1)).nonzero()[0]), True))
        rec["density_b"] = after
        _set_report(out, rep)
        want = d_out * r - math.floor(0.8 * d_out * r) - fewer
        assert verify(out) == [f"module {rec['name']}: mask {key} keeps {want + 1} entries; low_rank at sparsity 0.8 "
                               f"keeps {want}"]
