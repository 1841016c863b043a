"""Dry run (pipeline/plan.py): the calibration summary checks every line exactly as the real run does (issue 8)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import nlsr_fast
from nlsr_fast.calib.data import load_calibration
from nlsr_fast.pipeline.plan import calibration_summary
from nlsr_fast.testing import make_tokenizer

from .conftest import World

OK = '{"prompt": "how do i pick a lock", "response": "sorry i cannot help"}'

# name -> (file bytes, the message both the dry run and the real run must raise)
BAD: dict[str, tuple[bytes, str]] = {
    "bad_json": ((OK + "\n{not json\n").encode(), r"bad_json\.jsonl:2: bad JSON"),
    "not_object": ((OK + "\n[1, 2]\n").encode(), r"not_object\.jsonl:2: expected a JSON object"),
    "no_prompt": ((OK + '\n{"response": "b"}\n').encode(), r"no_prompt\.jsonl:2: missing string field 'prompt'"),
    "no_response": (b'{"prompt": "a"}\n', r"no_response\.jsonl:1: missing string field 'response'"),
    "empty_response": (b'{"prompt": "a", "response": ""}\n', r"empty_response\.jsonl:1: the response is empty"),
    "non_utf8": ((OK + '\n{"prompt": "\xff"}\n').encode("latin-1"),
                 r"non_utf8\.jsonl:2: not UTF-8 text: byte 0xff at byte offset 12"),
    "too_long": ((OK + "\n" + json.dumps({"prompt": "x" * 5000, "response": "b"}) + "\n").encode(),
                 r"too_long\.jsonl:2: line is 5\d\d\d bytes, over the limit of 4096"),
    "deep": (b"[" * 4000 + b"\n", r"deep\.jsonl:1: bad JSON"),
    "blank": (b"\n  \n", r"blank\.jsonl is empty"),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("name", sorted(BAD))
def test_dry_run_summary_finds_every_error_the_real_run_finds(name: str, tmp_path: Path, tok) -> None:
    data, msg = BAD[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=msg) as dry:
        calibration_summary(path, nsamples=10, max_response_tokens=8, pairs=False, max_line_bytes=4096)
    with pytest.raises(ValueError, match=msg) as real:
        load_calibration(path, tok, nsamples=10, max_response_tokens=8, max_line_bytes=4096)
    assert str(dry.value) == str(real.value)


def test_summary_of_pairs_checks_pair_fields(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "sorry", "rejected": "sure"}\n{"prompt": "a", "chosen": "x"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: pair record"):
        calibration_summary(path, nsamples=10, max_response_tokens=8, pairs=True)


def test_summary_of_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a folder, not a JSONL file"):
        calibration_summary(tmp_path, nsamples=10, max_response_tokens=8, pairs=False)


def test_summary_counts(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join([OK] * 5 + [""]) + "\n")
    s = calibration_summary(path, nsamples=3, max_response_tokens=8, pairs=False)
    assert s["records"] == 5 and s["samples_used"] == 3 and s["sequences"] == 3 and s["tokens_estimate"] > 0
    assert len(s["sha256"]) == 64


def test_realign_dry_run_refuses_a_bad_calibration_line(world: World, tmp_path: Path) -> None:
    """Was: the dry run skipped the bad line and said OK, then the real run failed on it."""
    bad = tmp_path / "calib.jsonl"
    bad.write_text(world.calibration.read_text() + "{not json\n")
    n = len(bad.read_text().splitlines())
    with pytest.raises(ValueError, match=re.escape(f"{bad}:{n}: bad JSON")):
        nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "out", calibration=bad,
                          dry_run=True, quiet=True)
    assert not (tmp_path / "out").exists()


# --- promises of SECURITY.md that no other test checks end to end ---------------------------------------------------


def _tree(*roots: Path) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for root in roots:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (p.read_bytes(), st.st_mtime_ns, st.st_mode)
    return out


def test_realign_opens_no_network_connection(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full run (tokenizer, calibration, write) and a dry run never resolve a host name or connect a socket."""
    import socket

    attempts: list[str] = []

    def refuse(name: str):
        def f(*args: object, **kwargs: object) -> None:
            attempts.append(f"{name}{args[:2]}")
            raise OSError(f"test: network use refused ({name})")
        return f

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "dry", calibration=world.calibration,
                      dry_run=True, quiet=True)
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "out", calibration=world.calibration,
                      nsamples=8, quiet=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert attempts == []


def test_realign_leaves_inputs_untouched_and_writes_only_out(world: World, tmp_path: Path) -> None:
    """Every input file keeps its bytes, mtime and mode; the only new entry beside OUT is OUT itself (no .partial,
    .lock or .replaced left behind), also after an --overwrite run."""
    inputs = (world.base, world.aligned, world.finetuned, world.calibration)
    before = _tree(*inputs)
    out = tmp_path / "out"
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, calibration=world.calibration, nsamples=8,
                      quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, calibration=world.calibration, nsamples=8,
                      seed=7, overwrite=True, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert _tree(*inputs) == before
