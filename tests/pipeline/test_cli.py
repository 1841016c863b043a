"""The `nlsr-fast` CLI through `main(argv)`, and once through `python -m nlsr_fast` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from nlsr_fast import cli
from nlsr_fast.report import Report

from .conftest import World


def _args(world: World, out: Path, *extra: str) -> list[str]:
    return ["realign", str(world.base), str(world.aligned), str(world.finetuned), str(out), "--quiet", *extra]


def test_cli_realign_with_yaml_and_flag_override(world: World, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: random\nselection: fraction\nfraction: 0.5\nseed: 1\nprune-rate: 0.4\n")
    out = tmp_path / "out"
    assert cli.main(_args(world, out, "--config", str(cfg), "--seed", "3")) == 0
    rep = Report.from_json(out / "report.json")
    assert rep.config["method"] == "random" and rep.config["selection"] == "fraction"
    assert rep.config["seed"] == 3  # the flag wins over the YAML value
    assert rep.config["prune_rate"] == 0.4  # dashes in YAML keys are accepted
    assert rep.counts["restored"] == 7
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "restored 7 of 14 modules" in printed


def test_cli_realign_with_calibration_flags(world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = _args(world, out, "--calibration", str(world.calibration), "--method", "wanda", "--nsamples", "8",
                 "--no-sequential", "--preset", "official", "--alpha", "0.5", "--sparsity", "0.5",
                 "--selection", "threshold", "--tau", "0.99", "--backend", "reference", "--device", "cpu")
    assert cli.main(argv) == 0
    rep = Report.from_json(out / "report.json")
    assert rep.config["sequential"] is False and rep.config["preset"] == "official"
    assert rep.config["nsamples"] == 8 and rep.counts["calibration_samples"] == 8
    assert rep.config["tau"] == 0.99 and rep.config["backend"] == "reference"


def test_cli_unknown_yaml_key_is_named(world: World, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: random\nsparsty: 0.5\n")
    out = tmp_path / "out"
    assert cli.main(_args(world, out, "--config", str(cfg))) == 2
    err = capsys.readouterr().err
    assert "sparsty" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (("--method", "random", "--sparsity", "2"), "sparsity"),
        (("--method", "random", "--selection", "threshold"), "tau"),
        ((), "calibration"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(world: World, tmp_path: Path, capsys, extra, fragment) -> None:
    out = tmp_path / "out"
    assert cli.main(_args(world, out, *extra)) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_missing_base_and_verbose_traceback(world: World, tmp_path: Path, capsys) -> None:
    argv = ["realign", str(tmp_path / "nobase"), str(world.aligned), str(world.finetuned), str(tmp_path / "o"),
            "--method", "random", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "nobase" in err and "Traceback" not in err
    assert cli.main([*argv, "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cli_usage_errors(capsys) -> None:
    assert cli.main(["realign", "only-one"]) == 2
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "realign" in capsys.readouterr().out


def test_cli_dry_run_prints_plan(world: World, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(_args(world, out, "--calibration", str(world.calibration), "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "14 modules" in printed and "24 of 24 samples" in printed
    assert not out.exists()


def test_cli_demo_missing_and_present(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "nlsr_fast.demo", None)  # import raises ImportError
    assert cli.main(["demo"]) == 2
    assert "not available" in capsys.readouterr().err
    seen = {}
    fake = types.ModuleType("nlsr_fast.demo")
    fake.add_arguments = lambda p: p.add_argument("--steps", type=int, default=1)  # type: ignore[attr-defined]

    def main(args) -> int:
        seen["steps"] = args.steps
        return 0

    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nlsr_fast.demo", fake)
    assert cli.main(["demo", "--steps", "5"]) == 0
    assert seen == {"steps": 5}


def test_cli_bench_forwards(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert cli.main(["bench", "--quick", "x"]) == 0
    assert calls == [[sys.executable, "-m", "nlsr_fast.bench", "--quick", "x"]]


def test_python_m_nlsr_fast_subprocess(world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "nlsr_fast", *_args(world, out, "--method", "random")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "restored" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "report.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "nlsr_fast", *_args(world, tmp_path / "o2")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "calibration" in bad.stderr and "Traceback" not in bad.stderr


def test_import_is_light() -> None:
    probe = "import sys, nlsr_fast; nlsr_fast.RealignConfig(); print(sorted(m for m in ('transformers', 'peft', " \
            "'matplotlib', 'nlsr_fast.api', 'nlsr_fast.io') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
