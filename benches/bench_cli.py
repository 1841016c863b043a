"""`python -m nlsr_fast.bench`: argument handling, suite dispatch, the table and the JSON file (quick, tiny)."""

from __future__ import annotations

import argparse
import json

import pytest

import nlsr_fast.bench as bench


def test_parse_shape():
    assert bench.parse_shape("8192x8192") == (8192, 8192)
    assert bench.parse_shape("128X8192x28672") == (128, 8192, 28672)
    for bad in ("8192", "axb", "0x5", "1x2x3x4"):
        with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(")):
            bench.parse_shape(bad)


def test_ops_suite_quick_table_and_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    rc = bench.main(
        [
            "--quick",
            "--ops",
            "extrapolate",
            "lora_masked_cosine",
            "--shapes",
            "17x33",
            "4x9x31",
            "--device",
            "cpu",
            "--json",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "copy bandwidth" in out and "copy_" in out
    for column in ("op", "shape", "dtype", "backend", "median ms", "GB/s", "speed-up", "% copy"):
        assert column in out
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"extrapolate", "lora_masked_cosine"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows)
    assert [r["backend"] for r in rows if r["op"] == "lora_masked_cosine"][0] == "torch dense"
    assert next(r for r in rows if r["backend"] == "torch dense")["speedup"] == pytest.approx(1.0)
    assert next(r for r in rows if r["op"] == "extrapolate" and r["backend"] == "reference")["pct_copy"] > 0
    assert data["copy"]["gbps"] > 0


def test_ops_suite_arguments_default_to_all_ops():
    parser = argparse.ArgumentParser()
    bench.SUITES["ops"].add_arguments(parser)
    args = parser.parse_args(["--quick"])
    assert args.quick and args.ops == list(bench.ops.OPS)


def test_other_suites_plug_in(monkeypatch):
    seen = {}

    def add(p):
        p.add_argument("--model")

    def run(args):
        seen["model"] = args.model
        return 0

    monkeypatch.setitem(bench.SUITES, "realign", bench.Suite("the pipeline", add, run))
    assert bench.main(["realign", "--model", "tiny"]) == 0
    assert seen == {"model": "tiny"}


def test_unknown_op_is_rejected():
    with pytest.raises(SystemExit):
        bench.main(["--ops", "no_such_op"])
    with pytest.raises(ValueError, match="no_such_op"):
        bench.OpsConfig(ops=("no_such_op",))
