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


def _sigint_default() -> None:
    """preexec_fn of the children that get SIGINT: Python makes Ctrl-C a KeyboardInterrupt only when SIGINT is not
    ignored at its start, and a test run started in the background by a shell without job control ignores it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
    printed = capsys.readouterr().out  # --quiet: the summary only, no per-module rows
    assert "restored 7 of 14 modules" in printed and "model.layers.1.mlp.down_proj" not in printed


def test_cli_realign_prints_the_module_table_unless_quiet(world: World, tmp_path: Path, capsys) -> None:
    argv = ["realign", str(world.base), str(world.aligned), str(world.finetuned), str(tmp_path / "out"),
            "--method", "random", "--selection", "fraction", "--fraction", "0.5"]
    assert cli.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 14 and sum(line.split()[5] == "yes" for line in rows) == 7


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


# -- issue 8: CLI hygiene --------------------------------------------------------------------------------------

def _one_line_error(capsys, fragment: str) -> str:
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_cli_yaml_accepts_run_options(world: World, tmp_path: Path, capsys) -> None:
    """issue 8: YAML refused overwrite, dry_run and quiet, though the README says every option works there."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: random\ndry_run: true\nquiet: true\noverwrite: false\nwait: false\nforce: false\n"
                   f"calibration: {world.calibration}\n")
    out = tmp_path / "out"
    base = ["realign", str(world.base), str(world.aligned), str(world.finetuned), str(out)]
    assert cli.main([*base, "--config", str(cfg)]) == 0
    assert "dry run" in capsys.readouterr().out and not out.exists()
    cfg.write_text("method: random\nquiet: true\n")
    assert cli.main([*base, "--config", str(cfg)]) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    cfg.write_text("method: random\nquiet: true\nseed: 7\n")
    assert cli.main([*base, "--config", str(cfg)]) == 2
    _one_line_error(capsys, "already exists")
    cfg.write_text("method: random\nquiet: true\nseed: 7\noverwrite: true\n")
    assert cli.main([*base, "--config", str(cfg)]) == 0
    assert Report.from_json(out / "report.json").config["seed"] == 7
    assert (out / "adapter_model.safetensors").read_bytes() != first


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("calibration: 5\n", "calibration must be a path string, got 5"),
        ("reference: [a, b]\n", "reference must be a path string, got ['a', 'b']"),
        ("overwrite: 3\n", "overwrite must be true or false, got 3"),
        ("quiet: 'no'\n", "quiet must be true or false, got 'no'"),
        ("sparsity: high\n", "sparsity must be a number, got 'high'"),
        ("sparsity: true\n", "sparsity must be a number, got True"),
        ("seed: 1.5\n", "seed must be an integer, got 1.5"),
        ("method: 3\n", "method must be a string, got 3"),
        ("tau: [0.5]\n", "tau must be a number or null, got [0.5]"),
        ("sequential: 1\n", "sequential must be true or false, got 1"),
        ("seed: -1\n", "seed must be an integer in [0, 18446744073709551615], got -1"),
        ("device: cuda:99\n", "device 'cuda:99'"),
    ],
)
def test_cli_yaml_wrong_types_name_file_and_key(world: World, tmp_path: Path, capsys, yaml_text, fragment) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: random\n" + yaml_text if not yaml_text.startswith("method") else yaml_text)
    out = tmp_path / "out"
    assert cli.main(_args(world, out, "--config", str(cfg))) == 2
    err = _one_line_error(capsys, fragment)
    assert f"--config {cfg}: {fragment}" in err
    assert not out.exists()


def test_cli_ctrl_c_is_one_line_and_130(world: World, tmp_path: Path, monkeypatch, capsys) -> None:
    """issue 8: Ctrl-C printed a 65-line traceback."""
    import nlsr_fast.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nlsr_fast.api, "realign_with_config", interrupted)
    assert cli.main(_args(world, tmp_path / "out", "--method", "random")) == 130
    captured = capsys.readouterr()
    assert captured.err == "nlsr-fast realign: interrupted\n" and captured.out == ""


def test_cli_ctrl_c_in_a_real_process(world: World, tmp_path: Path) -> None:
    """SIGINT to a running `python -m nlsr_fast realign`: exit 130, one line, no traceback, no output left."""
    import signal

    out = tmp_path / "out"
    code = ("import sys, nlsr_fast.api as api\n"
            "def slow(*a, **k):\n"
            "    print('started', flush=True)\n"
            "    import time\n"
            "    while True: time.sleep(0.05)\n"
            "api.realign_with_config = slow\n"
            "from nlsr_fast.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, *_args(world, out, "--method", "random")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "nlsr-fast realign: interrupted\n"


def test_cli_cuda_without_gpu_is_refused_up_front(world: World, tmp_path: Path, capsys) -> None:
    """issue 8: --device cuda without a GPU failed late with an AssertionError."""
    import torch

    from nlsr_fast.config import RealignConfig

    bad = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
    for device in bad:
        with pytest.raises(ValueError, match=r"device 'cuda.*'"):
            RealignConfig(device=device)
        out = tmp_path / "out"
        assert cli.main(_args(world, out, "--method", "random", "--device", device)) == 2
        err = _one_line_error(capsys, f"device {device!r}")
        assert "--device cpu" in err
        assert not out.exists() and not Path(f"{out}.lock").exists()
    RealignConfig(device="cpu")


def test_seed_out_of_range_is_refused_up_front(world: World, tmp_path: Path, capsys) -> None:
    """issue 8: --seed 2**64 was found only after calibration. torch.Generator.manual_seed takes
    [-2**63, 2**64 - 1]; seeds are documented as non-negative, so [0, 2**64 - 1]."""
    import torch

    from nlsr_fast.config import RealignConfig

    top = 2**64 - 1
    torch.Generator().manual_seed(RealignConfig(seed=top).seed)  # the largest accepted seed works in torch
    for seed in (2**64, 2**70, -1):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 18446744073709551615\]"):
            RealignConfig(seed=seed)
    out = tmp_path / "out"
    assert cli.main(_args(world, out, "--method", "random", "--seed", str(2**64))) == 2
    _one_line_error(capsys, "seed must be an integer in [0, 18446744073709551615], got 18446744073709551616")
    assert not out.exists()


def test_cli_passes_wait_and_force(world: World, tmp_path: Path, monkeypatch) -> None:
    import nlsr_fast.api

    seen: dict = {}

    def fake(config, base, aligned, finetuned, out, *, calibration=None, reference=None, unaligned=None,
             dry_run=False, quiet=False, overwrite=False, wait=False, force=False):
        seen.update(dry_run=dry_run, quiet=quiet, overwrite=overwrite, wait=wait, force=force)
        return Report(config=config.to_dict(), counts={"modules": 0, "restored": 0})

    monkeypatch.setattr(nlsr_fast.api, "realign_with_config", fake)
    assert cli.main(_args(world, tmp_path / "o", "--method", "random", "--wait", "--force", "--overwrite")) == 0
    assert seen == {"dry_run": False, "quiet": True, "overwrite": True, "wait": True, "force": True}
    cfg = tmp_path / "run.yaml"
    cfg.write_text("wait: true\nforce: true\nquiet: false\n")
    assert cli.main(["realign", str(world.base), str(world.aligned), str(world.finetuned), str(tmp_path / "o"),
                     "--method", "random", "--config", str(cfg)]) == 0
    assert seen == {"dry_run": False, "quiet": False, "overwrite": False, "wait": True, "force": True}


_HOLD = (
    "import sys\n"
    "from nlsr_fast.io.lock import OutputLock\n"
    "with OutputLock(sys.argv[1]):\n"
    "    print('ready', flush=True)\n"
    "    sys.stdin.readline()\n"
)


def test_cli_second_run_on_a_locked_out_exits_2_or_waits(world: World, tmp_path: Path, capsys) -> None:
    """issue 8: two runs with the same OUT mixed their outputs. A run holding OUT's lock makes a second one exit 2
    at once naming the holder; with --wait the second one waits and then writes its own complete output."""
    import threading

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    try:
        assert cli.main(_args(world, out, "--method", "random")) == 2
        _one_line_error(capsys, f"output {out} is locked by pid {holder.pid} on host ")
        assert not out.exists()
        rcs: list[int] = []
        t = threading.Thread(target=lambda: rcs.append(cli.main(_args(world, out, "--method", "random", "--wait"))))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not out.exists()  # waiting for the holder
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait()
    t.join()
    assert rcs == [0]
    from nlsr_fast.io import check_manifest

    assert check_manifest(out) == [] and not Path(f"{out}.lock").exists()


def test_cli_two_concurrent_runs_never_mix(world: World, tmp_path: Path) -> None:
    """issue 8 reproduction: two runs on one OUT at once (and again with --overwrite over the result). Each either
    fails with exit 2 (locked / exists) or publishes a complete output whose adapter, masks and report all come from
    itself (checked by verify against the inputs)."""
    from nlsr_fast.verify import verify

    out = tmp_path / "out"
    for extra, allowed in (((), ([0, 2],)), (("--overwrite",), ([0, 0], [0, 2]))):
        procs = [subprocess.Popen([sys.executable, "-m", "nlsr_fast",
                                   *_args(world, out, "--method", "random", "--seed", str(s), *extra)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (1, 2)]
        results = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in procs]
        assert sorted(rc for rc, _ in results) in allowed, results
        for rc, err in results:
            if rc == 2:
                assert "locked by pid" in err or "already exists" in err, err
        assert verify(out, finetuned=world.finetuned, aligned=world.aligned) == []
        assert (out / "adapter_model.safetensors").is_file()
        assert not Path(f"{out}.partial").exists() and not Path(f"{out}.lock").exists()
        assert not Path(f"{out}.replaced").exists()


def test_cli_overwrite_refuses_a_foreign_folder_unless_force(world: World, tmp_path: Path, capsys) -> None:
    """issue 8: --overwrite deleted whatever folder OUT named."""
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    assert cli.main(_args(world, out, "--method", "random", "--overwrite")) == 2
    _one_line_error(capsys, "not an nlsr_fast output")
    assert (out / "holiday.jpg").read_bytes() == b"precious"
    assert cli.main(_args(world, out, "--method", "random", "--overwrite", "--force")) == 0
    assert not (out / "holiday.jpg").exists() and (out / "manifest.json").is_file()


def test_cli_ctrl_c_during_a_real_run_leaves_nothing(world: World, tmp_path: Path) -> None:
    """SIGINT while a real realign runs (sent once it holds OUT's lock): exit 130, the last line says interrupted,
    no traceback and no error log, and no OUT, OUT.partial or OUT.lock is left."""
    import os
    import signal

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "nlsr_fast",
                             *_args(world, out, "--calibration", str(world.calibration), "--method", "snip",
                                    "--micro-batch", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    lock = Path(f"{out}.lock")
    while not lock.exists() and proc.poll() is None:
        os.sched_yield()
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "nlsr-fast realign: interrupted" and "Traceback" not in err
    assert not any(line.startswith(("ERROR", "WARNING nlsr_fast")) for line in lines), err
    assert not out.exists() and not Path(f"{out}.partial").exists() and not lock.exists()
