"""Input policies of issue 8: non-finite weights (item 3), non-LoRA tensors of the fine-tuned adapter (item 4), and a
quiet CLI when masks are empty or the fine-tuned adapter is all zeros ("Noisy")."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nlsr_fast
from nlsr_fast import cli, testing
from nlsr_fast.io import CheckpointReader, LoraAdapter
from nlsr_fast.ops import load_masks
from nlsr_fast.report import Report

from .conftest import World

ADAPTER = "adapter_model.safetensors"
RANDOM = {"method": "random", "quiet": True}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _copy_with(src: Path, dst: Path, edit) -> Path:
    """A copy of the adapter folder `src` whose weights went through `edit(state_dict)`."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / ADAPTER))
    edit(sd)
    save_file(sd, str(dst / ADAPTER), metadata={"format": "pt"})
    return dst


def _nothing_left(out: Path) -> None:
    assert not out.exists() and not Path(f"{out}.partial").exists()


def _cli(*argv: object) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (its own logging configuration and Python warnings, not pytest's)."""
    return subprocess.run([sys.executable, "-m", "nlsr_fast", "realign", *map(str, argv)], capture_output=True,
                          text=True)


# -- non-finite weights -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A clean random run: a restored module and an entry of its lora_B that no mask covers."""
    out = tmp_path_factory.mktemp("clean") / "out"
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, **RANDOM)
    name = next(m.name for m in rep.modules if m.restored)
    mask_b = load_masks(out / "masks.safetensors")[f"{name}.lora_B"].to_bool()
    i, j = (int(v) for v in (~mask_b).nonzero()[-1])
    key = LoraAdapter.load(world.finetuned).key_b(name)
    return {"out": out, "report": rep, "name": name, "key": key, "index": [i, j]}


@pytest.fixture(scope="module")
def poisoned(world: World, clean: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("poisoned")
    key, (i, j) = clean["key"], clean["index"]

    def put(value: float):
        def edit(sd: dict) -> None:
            sd[key][i, j] = value
        return edit

    return {"finetuned": _copy_with(world.finetuned, root / "finetuned", put(float("nan"))),
            "aligned": _copy_with(world.aligned, root / "aligned", put(float("inf")))}


def _args(world: World, poisoned: dict, role: str) -> tuple[Path, Path, Path]:
    return (world.base, poisoned["aligned"] if role == "aligned" else world.aligned,
            poisoned["finetuned"] if role == "finetuned" else world.finetuned)


@pytest.mark.parametrize("role, value", [("finetuned", "nan"), ("aligned", "inf")])
def test_nonfinite_adapter_refused_naming_file_tensor_index(world: World, clean: dict, poisoned: dict,
                                                             tmp_path: Path, role: str, value: str) -> None:
    i, j = clean["index"]
    weights = poisoned[role] / ADAPTER
    want = rf"{re.escape(str(weights))}: tensor '{re.escape(clean['key'])}' .*{value} at index \[{i}, {j}\]"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=want):
        nlsr_fast.realign(*_args(world, poisoned, role), out, **RANDOM)
    _nothing_left(out)
    # a calibration method refuses it too (the aligned adapter's factors are read before calibration runs)
    with pytest.raises(ValueError, match=want):
        nlsr_fast.realign(*_args(world, poisoned, role), out, method="wanda", calibration=world.calibration,
                          nsamples=4, quiet=True)
    _nothing_left(out)


def test_nonfinite_refused_by_the_cli_with_exit_2(world: World, clean: dict, poisoned: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _cli(*_args(world, poisoned, "finetuned"), out, "--method", "random")
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("nlsr-fast realign: error:")]
    assert len(errors) == 1, run.stderr
    i, j = clean["index"]
    assert str(poisoned["finetuned"] / ADAPTER) in errors[0] and repr(clean["key"]) in errors[0]
    assert f"nan at index [{i}, {j}]" in errors[0] and "--allow-nonfinite" in errors[0]
    assert "Traceback" not in run.stderr
    _nothing_left(out)


def test_nonfinite_refusal_is_one_line_on_the_cli(world: World, poisoned: dict, tmp_path: Path) -> None:
    run = _cli(*_args(world, poisoned, "finetuned"), tmp_path / "out", "--method", "random")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("role, value", [("finetuned", "nan"), ("aligned", "inf")])
def test_nonfinite_adapter_allowed_is_reported(world: World, clean: dict, poisoned: dict, tmp_path: Path,
                                               role: str, value: str) -> None:
    out = tmp_path / "out"
    rep = nlsr_fast.realign(*_args(world, poisoned, role), out, allow_nonfinite=True, **RANDOM)
    on_disk = Report.from_json(out / "report.json")
    assert on_disk.nonfinite == rep.nonfinite
    found = {(f["file"], f["tensor"], f["count"], tuple(f["first_index"]), f["first_value"]) for f in rep.nonfinite}
    assert found == {(str(poisoned[role] / ADAPTER), clean["key"], 1, tuple(clean["index"]), value)}
    # the entry lies outside every mask: the run is the clean run's, except that entry in a poisoned fine-tuned
    # adapter, which passes through (allowed), and nothing at all for a poisoned aligned adapter
    assert [(m.similarity, m.restored) for m in rep.modules] == \
           [(m.similarity, m.restored) for m in clean["report"].modules]
    got, want = load_file(str(out / ADAPTER)), load_file(str(clean["out"] / ADAPTER))
    i, j = clean["index"]
    if role == "finetuned":
        assert torch.isnan(got[clean["key"]][i, j])
        got[clean["key"]][i, j] = want[clean["key"]][i, j]
    assert all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want)


def test_nonfinite_tensor_of_a_restored_module_is_reported_once(world: World, clean: dict, poisoned: dict,
                                                                tmp_path: Path) -> None:
    rep = nlsr_fast.realign(*_args(world, poisoned, "finetuned"), tmp_path / "out", allow_nonfinite=True, **RANDOM)
    assert any(m.name == clean["name"] and m.restored for m in rep.modules)
    assert len(rep.nonfinite) == 1, rep.nonfinite


def test_nonfinite_allowed_through_the_cli(world: World, clean: dict, poisoned: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["realign", *map(str, _args(world, poisoned, "aligned")), str(out), "--method", "random",
            "--allow-nonfinite"]
    assert cli.main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["allow_nonfinite"] is True
    assert {(f["file"], f["tensor"], f["count"], tuple(f["first_index"])) for f in rep["nonfinite"]} == {
        (str(poisoned["aligned"] / ADAPTER), clean["key"], 1, tuple(clean["index"]))}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Full bf16 checkpoints, and the base with a NaN in a target weight where the random mask does not look."""
    root = tmp_path_factory.mktemp("dense")
    base = testing.make_tiny_llama(root / "base", layers=2, hidden=32, dtype=torch.bfloat16)
    aligned = testing.derive_checkpoint(root / "aligned", base, seed=1)
    ft = testing.derive_checkpoint(root / "finetuned", aligned, seed=2, move=r"(_proj|norm|embed)")
    out = root / "clean"
    rep = nlsr_fast.realign(base, aligned, ft, out, **RANDOM)
    assert rep.mode == "dense"
    name = "model.layers.1.mlp.up_proj"
    i, j = (int(v) for v in (~load_masks(out / "masks.safetensors")[name].to_bool()).nonzero()[7])
    bad = root / "bad_base"
    shutil.copytree(base, bad)
    key = f"{name}.weight"
    shard = bad / CheckpointReader(bad).file_of(key).name
    sd = load_file(str(shard))
    sd[key][i, j] = float("nan")
    save_file(sd, str(shard), metadata={"format": "pt"})
    return {"base": base, "aligned": aligned, "finetuned": ft, "clean": out, "report": rep, "bad": bad,
            "shard": shard, "key": key, "index": [i, j]}


def test_nonfinite_base_in_dense_mode(dense: dict, tmp_path: Path) -> None:
    i, j = dense["index"]
    out = tmp_path / "out"
    args = (dense["bad"], dense["aligned"], dense["finetuned"])
    want = rf"{re.escape(str(dense['shard']))}: tensor '{re.escape(dense['key'])}' .*nan at index \[{i}, {j}\]"
    with pytest.raises(ValueError, match=want):
        nlsr_fast.realign(*args, out, **RANDOM)
    _nothing_left(out)
    run = _cli(*args, out, "--method", "random")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert str(dense["shard"]) in run.stderr and f"nan at index [{i}, {j}]" in run.stderr
    _nothing_left(out)
    assert cli.main(["realign", *map(str, args), str(out), "--method", "random", "--allow-nonfinite"]) == 0
    rep = Report.from_json(out / "report.json")
    found = {(f["file"], f["tensor"], f["count"], tuple(f["first_index"])) for f in rep.nonfinite}
    assert found == {(str(dense["shard"]), dense["key"], 1, (i, j))}
    # W_0 enters only through the reference and the deltas; outside the mask it changes nothing
    assert [(m.similarity, m.restored) for m in rep.modules] == \
           [(m.similarity, m.restored) for m in dense["report"].modules]
    got, want_t = CheckpointReader(out), CheckpointReader(dense["clean"])
    assert all(torch.equal(_bits(got.get(k)), _bits(want_t.get(k))) for k in want_t.keys())


def test_nonfinite_inside_a_mask_allowed_completes_or_names_the_module(dense: dict, tmp_path: Path) -> None:
    """A NaN that a mask selects (magnitude ranks |NaN| first) makes the module's similarity NaN: allowed, the run
    either completes or stops naming the module (not "module indices [12]")."""
    try:
        rep = nlsr_fast.realign(dense["bad"], dense["aligned"], dense["finetuned"], tmp_path / "out",
                                method="magnitude", quiet=True, allow_nonfinite=True)
    except ValueError as exc:
        assert dense["key"][: -len(".weight")] in str(exc)
        assert not (tmp_path / "out").exists()
    else:
        assert len(rep.nonfinite) >= 1


# -- non-LoRA tensors of the fine-tuned adapter (modules_to_save) -----------------------------------------------

HEAD = "base_model.model.lm_head.weight"  # what PEFT saves for modules_to_save=["lm_head"] (checked below)
NORM = "base_model.model.model.norm.weight"  # any other non-LoRA key


@pytest.fixture(scope="module")
def heads(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fine-tuned adapter saved by PEFT with modules_to_save=["lm_head"] (a trained head) plus a stray norm, and
    an aligned adapter that carries its own head."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("heads")
    cfg = json.loads((world.finetuned / "adapter_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(world.base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                                  target_modules=cfg["target_modules"], modules_to_save=["lm_head"]))
    state = load_file(str(world.finetuned / ADAPTER))
    state[HEAD] = model.lm_head.weight.detach().clone()  # PEFT expects the head among the adapter's weights
    result = set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys
    head = peft_model.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(7)))
    peft_model.save_pretrained(str(root / "peft"))
    saved = load_file(str(root / "peft" / ADAPTER))
    extra = [k for k in saved if ".lora_" not in k]
    assert extra == [HEAD], extra  # the real key layout of a modules_to_save head
    assert json.loads((root / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    base = CheckpointReader(world.base)

    def add_norm(sd: dict) -> None:
        sd[NORM] = base.get("model.norm.weight").clone() + 0.5

    ft = _copy_with(root / "peft", root / "finetuned", add_norm)
    assert set(LoraAdapter.load(ft).extra_keys) == {HEAD, NORM}

    def add_head(sd: dict) -> None:
        sd[HEAD] = base.get("lm_head.weight").clone() * 0.5

    aligned = _copy_with(world.aligned, root / "aligned_head", add_head)
    return {"finetuned": ft, "aligned_head": aligned, "ft_sd": load_file(str(ft / ADAPTER)),
            "base_head": base.get("lm_head.weight").clone(), "base_norm": base.get("model.norm.weight").clone(),
            "aligned_head_t": load_file(str(aligned / ADAPTER))[HEAD]}


def test_extra_tensors_refused_by_default(world: World, heads: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"non-LoRA tensor") as info:
        nlsr_fast.realign(world.base, world.aligned, heads["finetuned"], out, **RANDOM)
    assert HEAD in str(info.value) and NORM in str(info.value) and str(heads["finetuned"] / ADAPTER) in str(info.value)
    _nothing_left(out)
    run = _cli(world.base, world.aligned, heads["finetuned"], out, "--method", "random")
    assert run.returncode == 2 and HEAD in run.stderr and "--extra-tensors" in run.stderr
    _nothing_left(out)


@pytest.mark.parametrize("aligned_has_head", [False, True])
def test_extra_tensors_restore(world: World, heads: dict, tmp_path: Path, aligned_has_head: bool) -> None:
    aligned = heads["aligned_head"] if aligned_has_head else world.aligned
    out = tmp_path / "out"
    rep = nlsr_fast.realign(world.base, aligned, heads["finetuned"], out, extra_tensors="restore", **RANDOM)
    got = load_file(str(out / ADAPTER))
    want_head = heads["aligned_head_t"] if aligned_has_head else heads["base_head"]
    assert not torch.equal(heads["ft_sd"][HEAD], want_head)
    assert got[HEAD].dtype == heads["ft_sd"][HEAD].dtype
    assert torch.equal(_bits(got[HEAD]), _bits(want_head))
    assert torch.equal(_bits(got[NORM]), _bits(heads["base_norm"]))
    records = {r["tensor"]: r for r in Report.from_json(out / "report.json").extra_tensors}
    assert records == {r["tensor"]: r for r in rep.extra_tensors} and set(records) == {HEAD, NORM}
    assert all("replaced" in r["action"] for r in records.values())
    assert records[HEAD]["source"] == (str(aligned) if aligned_has_head else f"{world.base}:lm_head.weight")
    assert records[NORM]["source"] == f"{world.base}:model.norm.weight"
    # the LoRA factors are realigned as without the extra tensors
    plain = load_file(str(world.finetuned / ADAPTER))
    clean = nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "clean", **RANDOM)
    assert [m.restored for m in rep.modules] == [m.restored for m in clean.modules]
    clean_sd = load_file(str(tmp_path / "clean" / ADAPTER))
    assert set(got) == set(plain) | {HEAD, NORM}
    assert all(torch.equal(_bits(got[k]), _bits(clean_sd[k])) for k in plain)


def test_extra_tensors_keep_and_cli(world: World, heads: dict, tmp_path: Path) -> None:
    out = tmp_path / "keep"
    rep = nlsr_fast.realign(world.base, world.aligned, heads["finetuned"], out, extra_tensors="keep", **RANDOM)
    got = load_file(str(out / ADAPTER))
    for key in (HEAD, NORM):
        assert torch.equal(_bits(got[key]), _bits(heads["ft_sd"][key])), key
    assert {r["tensor"]: r["action"] for r in rep.extra_tensors} == {
        HEAD: "kept from the fine-tuned adapter", NORM: "kept from the fine-tuned adapter"}
    out = tmp_path / "cli"
    assert cli.main(["realign", str(world.base), str(world.aligned), str(heads["finetuned"]), str(out), "--method",
                     "random", "--extra-tensors", "restore"]) == 0
    assert torch.equal(_bits(load_file(str(out / ADAPTER))[HEAD]), _bits(heads["base_head"]))
    assert {r["tensor"] for r in json.loads((out / "report.json").read_text())["extra_tensors"]} == {HEAD, NORM}


def test_restored_head_loads_with_peft(world: World, heads: dict, tmp_path: Path) -> None:
    """The realigned adapter with its head restored loads with PEFT, and the head is the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = _copy_with(heads["finetuned"], tmp_path / "ft_head_only", lambda sd: sd.pop(NORM))
    out = tmp_path / "out"
    nlsr_fast.realign(world.base, world.aligned, src, out, extra_tensors="restore", **RANDOM)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(world.base), dtype=torch.float32),
                                      str(out))
    assert torch.equal(model.base_model.model.lm_head.modules_to_save["default"].weight, heads["base_head"])


# -- quiet output ---------------------------------------------------------------------------------------------


def _module_lines(stderr: str, modules: list[str]) -> dict[str, int]:
    return {name: sum(1 for line in stderr.splitlines() if f"{name}:" in line) for name in modules}


def test_sparsity_one_is_one_line_per_module_and_says_nothing_changed(world: World, tmp_path: Path) -> None:
    modules = LoraAdapter.load(world.finetuned).modules
    run = _cli(world.base, world.aligned, world.finetuned, tmp_path / "out", "--method", "random", "--sparsity", "1")
    assert run.returncode == 0, run.stderr
    assert _module_lines(run.stderr, modules) == dict.fromkeys(modules, 1), run.stderr
    assert "RuntimeWarning" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == len(modules), run.stderr
    rep = Report.from_json(tmp_path / "out" / "report.json")
    assert rep.counts["restored"] > 0 and all(m.changed_a == m.changed_b == 0 for m in rep.modules)
    summary = next(line for line in run.stdout.splitlines() if "restored" in line and "of 14 modules" in line)
    assert f"restored {rep.counts['restored']} of 14 modules, 0 entries changed" in summary
    assert "14 modules have all-empty masks" in summary


def test_all_zero_finetuned_warns_once_per_module(world: World, tmp_path: Path) -> None:
    def zero(sd: dict) -> None:
        for t in sd.values():
            t.zero_()

    ft = _copy_with(world.finetuned, tmp_path / "zero", zero)
    modules = LoraAdapter.load(ft).modules
    run = _cli(world.base, world.aligned, ft, tmp_path / "out", "--method", "random")
    assert run.returncode == 0, run.stderr
    assert _module_lines(run.stderr, modules) == dict.fromkeys(modules, 1), run.stderr
    assert "RuntimeWarning" not in run.stderr and "zero norm" in run.stderr
    summary = next(line for line in run.stdout.splitlines() if "of 14 modules" in line)
    assert "all-empty masks" not in summary


def test_summary_counts_changed_entries(world: World, tmp_path: Path) -> None:
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "out", **RANDOM)
    changed = sum(m.changed_a + m.changed_b for m in rep.modules)
    assert changed > 0
    assert f"restored {rep.counts['restored']} of 14 modules, {changed} entries changed" in rep.table()
    assert "all-empty" not in rep.table()


def test_dense_sparsity_one_is_one_line_per_module(dense: dict, tmp_path: Path) -> None:
    run = _cli(dense["base"], dense["aligned"], dense["finetuned"], tmp_path / "out", "--method", "random",
               "--sparsity", "1")
    assert run.returncode == 0, run.stderr
    modules = [m.name for m in dense["report"].modules]
    assert _module_lines(run.stderr, modules) == dict.fromkeys(modules, 1), run.stderr
    assert "RuntimeWarning" not in run.stderr
