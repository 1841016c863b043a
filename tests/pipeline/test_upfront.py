"""Bad inputs found up front, by a dry run as by a real run, naming the file and the tensor (issue 8)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nlsr_fast

from .conftest import World


@pytest.mark.parametrize("dry_run", [True, False])
def test_integer_typed_lora_factor_refused_up_front(world: World, tmp_path: Path, dry_run: bool) -> None:
    bad = tmp_path / "ft"
    shutil.copytree(world.finetuned, bad)
    sd = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(sd)[3]
    sd[key] = sd[key].to(torch.int32)
    save_file(sd, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: tensor '{key}' is int32; LoRA factors must"):
        nlsr_fast.realign(world.base, world.aligned, bad, tmp_path / "o", method="random", quiet=True,
                          dry_run=dry_run)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_dry_run_finds_a_base_without_tokenizer(world: World, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(world.base, base)
    for f in base.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ValueError, match=f"base checkpoint {base}: cannot load its tokenizer"):
        nlsr_fast.realign(base, world.aligned, world.finetuned, tmp_path / "o", calibration=world.calibration,
                          nsamples=8, quiet=True, dry_run=True)


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_architecture_the_engine_cannot_run_is_refused_up_front(world: World, tmp_path: Path, capsys,
                                                                     dry_run: bool) -> None:
    """A model_type the calibration engine does not run: exit 2 naming config.json and the type, before anything
    is computed, for the methods that calibrate; the others run on it."""
    import json

    from nlsr_fast import cli

    base = tmp_path / "base"
    shutil.copytree(world.base, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "model_type": "phi3"}))
    argv = ["realign", str(base), str(world.aligned), str(world.finetuned), str(tmp_path / "o"), "--quiet",
            "--calibration", str(world.calibration), "--nsamples", "8", "--method", "wanda"]
    assert cli.main(argv + (["--dry-run"] if dry_run else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{base / 'config.json'}: model_type 'phi3'" in err[0] and "'wanda'" in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    rep = nlsr_fast.realign(base, world.aligned, world.finetuned, tmp_path / "r", method="random", quiet=True)
    assert rep.counts["modules"] > 0
