"""Calibration data loading: template, response-token rules of both presets, truncation, choice, errors."""

from __future__ import annotations

import json

import pytest
import torch

from nlsr_fast.calib import ALPACA_TEMPLATE, format_prompt, load_calibration
from nlsr_fast.calib.data import PairSample, Sample
from nlsr_fast.testing import make_tokenizer


@pytest.fixture(scope="module")
def tok_bos(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok_bos")
    make_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def tok_nobos(tmp_path_factory):
    from tokenizers import processors
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok_nobos")
    make_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert tok("sorry")["input_ids"] == tok("sorry", add_special_tokens=False)["input_ids"]
    return tok


def _write(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


def test_alpaca_template_text():
    want = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nhow do i make a bomb\n\n### Response:")
    assert format_prompt("how do i make a bomb") == want
    assert ALPACA_TEMPLATE.format(prompt="x") == format_prompt("x", "alpaca")
    with pytest.raises(ValueError, match="template"):
        format_prompt("x", "vicuna")
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt("x", "chat", tokenizer=None)


def test_chat_template(tok_bos, tmp_path):
    tok_bos.chat_template = ("{% for m in messages %}<s> user : {{ m['content'] }} {% endfor %}"
                             "{% if add_generation_prompt %}answer :{% endif %}")
    text = format_prompt("how do i make a bomb", "chat", tok_bos)
    assert text == "<s> user : how do i make a bomb answer :"
    p = _write(tmp_path / "c.jsonl", [{"prompt": "how do i make a bomb", "response": "sorry"}])
    cs = load_calibration(p, tok_bos, template="chat")
    ids = cs.samples[0].input_ids.tolist()
    assert ids.count(tok_bos.bos_token_id) == 1  # the template's own BOS, none added on top
    tok_bos.chat_template = None


@pytest.mark.parametrize("bos", [True, False])
def test_response_tokens_paper_vs_official(tok_bos, tok_nobos, tmp_path, bos):
    tok = tok_bos if bos else tok_nobos
    prompt, resp = "how do i make a bomb", "sorry i cannot help"
    p = _write(tmp_path / "a.jsonl", [{"prompt": prompt, "response": resp}])
    prompt_ids = tok(format_prompt(prompt))["input_ids"]
    assert (prompt_ids[0] == tok.bos_token_id) == bos
    words = tok(resp, add_special_tokens=False)["input_ids"]
    paper = load_calibration(p, tok, preset="paper").samples[0]
    official = load_calibration(p, tok, preset="official").samples[0]
    assert isinstance(paper, Sample)
    assert paper.input_ids.tolist() == prompt_ids + words
    assert paper.response_mask.tolist() == [False] * len(prompt_ids) + [True] * len(words)
    # official: defaults then drop the first token: drops the BOS, or (no BOS) a real token
    want_off = words if bos else words[1:]
    assert official.input_ids.tolist() == prompt_ids + want_off
    assert official.n_response == len(want_off)


def test_truncation_and_meta(tok_bos, tmp_path):
    p = _write(tmp_path / "t.jsonl", [{"prompt": "a", "response": "one two three four five"},
                                      {"prompt": "b", "response": "six"}])
    cs = load_calibration(p, tok_bos, max_response_tokens=3)
    assert [s.n_response for s in cs.samples] == [3, 1]
    assert cs.samples[0].input_ids[-3:].tolist() == tok_bos("one two three", add_special_tokens=False)["input_ids"]
    assert cs.meta["n_truncated"] == 1 and cs.meta["lines"] == [1, 2] and cs.meta["response_tokens"] == 4
    assert len(cs.meta["sha256"]) == 64


def test_seeded_choice(tok_bos, tmp_path):
    recs = [{"prompt": f"p {i}", "response": "sorry " * (i + 1)} for i in range(20)]
    recs.insert(5, "")  # blank lines are skipped, line numbers still count them
    p = _write(tmp_path / "many.jsonl", recs)
    a = load_calibration(p, tok_bos, nsamples=6, seed=1)
    b = load_calibration(p, tok_bos, nsamples=6, seed=1)
    c = load_calibration(p, tok_bos, nsamples=6, seed=2)
    assert a.meta["lines"] == b.meta["lines"] and a.meta["lines"] != c.meta["lines"]
    assert len(a) == 6 and a.meta["lines"] == sorted(a.meta["lines"]) and 6 not in a.meta["lines"]
    gen = torch.Generator().manual_seed(1)
    idx = sorted(torch.randperm(20, generator=gen)[:6].tolist())
    assert a.meta["lines"] == [i + 1 + (i >= 5) for i in idx]
    for line, s in zip(a.meta["lines"], a.samples, strict=True):
        i = line - 1 - (line > 6)
        assert s.n_response == i + 1
    assert len(load_calibration(p, tok_bos, nsamples=100)) == 20


def test_pairs_layouts(tok_bos, tmp_path):
    p = _write(tmp_path / "p.jsonl", [
        {"prompt": "how do i make a bomb", "chosen": "sorry", "rejected": "sure here is"},
        {"prompt": "hack", "response_0": "sure", "response_1": "sorry i cannot",
         "better_response_id": 0, "safer_response_id": 1},
    ])
    paper = load_calibration(p, tok_bos, pairs=True, preset="paper")
    official = load_calibration(p, tok_bos, pairs=True, preset="official")
    s0 = paper.samples[0]
    assert isinstance(s0, PairSample) and paper.is_pairs
    n_prompt = s0.prompt_ids.numel()
    assert s0.chosen.input_ids[:n_prompt].tolist() == s0.prompt_ids.tolist()
    assert s0.chosen.n_response == 1 and s0.rejected.n_response == 3
    enc = lambda s: tok_bos(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert paper.samples[1].chosen.input_ids[-3:].tolist() == enc("sorry i cannot")
    assert official.samples[1].chosen.input_ids[-1:].tolist() == enc("sure")
    assert len(paper.sequences()) == 4


def _err(tok, path, match, **kw):
    with pytest.raises(ValueError, match=match):
        load_calibration(path, tok, **kw)


def test_errors(tok_bos, tmp_path):
    _err(tok_bos, tmp_path / "missing.jsonl", "does not exist")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    _err(tok_bos, empty, "empty")
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "{not json"])
    _err(tok_bos, bad, r"bad\.jsonl:2: bad JSON")
    arr = _write(tmp_path / "arr.jsonl", ["[1, 2]"])
    _err(tok_bos, arr, r"arr\.jsonl:1: expected a JSON object")
    nop = _write(tmp_path / "nop.jsonl", [{"response": "b"}])
    _err(tok_bos, nop, r"nop\.jsonl:1: missing string field 'prompt'")
    nor = _write(tmp_path / "nor.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    _err(tok_bos, nor, r"nor\.jsonl:2: missing string field 'response'")
    emp = _write(tmp_path / "emp.jsonl", [{"prompt": "a", "response": "sorry"}, {"prompt": "a", "response": " "}])
    _err(tok_bos, emp, r"emp\.jsonl:2: the response is empty")
    # official drops the only token
    one = _write(tmp_path / "one.jsonl", [{"prompt": "a", "response": ""}])
    _err(tok_bos, one, r"one\.jsonl:1: the response is empty", preset="official")
    pr = _write(tmp_path / "pr.jsonl", [{"prompt": "a", "chosen": "sorry"}])
    _err(tok_bos, pr, r"pr\.jsonl:1: pair record", pairs=True)
    pr2 = _write(tmp_path / "pr2.jsonl", [{"prompt": "a", "response_0": "x", "response_1": "y"}])
    _err(tok_bos, pr2, r"pr2\.jsonl:1: .*better_response_id", pairs=True)
    pr3 = _write(tmp_path / "pr3.jsonl", [{"prompt": "a", "chosen": "sorry", "rejected": ""}])
    _err(tok_bos, pr3, r"pr3\.jsonl:1: the rejected response is empty", pairs=True)
    ok = _write(tmp_path / "ok.jsonl", [{"prompt": "a", "response": "b"}])
    _err(tok_bos, ok, "nsamples", nsamples=0)
    _err(tok_bos, ok, "max_response_tokens", max_response_tokens=0)
    _err(tok_bos, ok, "preset", preset="foo")
    _err(tok_bos, ok, "template", template="foo")


# --- issue 8: the Preset as the one source, bounded inputs, messages that name file:line -----------------------------


def test_preset_object_fields_not_its_name(tok_bos, tmp_path):
    """load_calibration reads the Preset's fields (response_tokens, pref_chosen), never branches on its name."""
    from dataclasses import replace

    from nlsr_fast.config import PRESETS

    p = _write(tmp_path / "a.jsonl", [{"prompt": "a", "response": "sorry i cannot"}])
    words = tok_bos("sorry i cannot", add_special_tokens=False)["input_ids"]
    # a preset named "paper" whose response rule is the released code's: the field wins
    odd = replace(PRESETS["paper"], response_tokens="drop_first")
    s = load_calibration(p, tok_bos, preset=odd).samples[0]
    assert s.input_ids[-len(words):].tolist() == words  # drop_first dropped the BOS, not a word
    plain = replace(PRESETS["official"], name="mine", response_tokens="plain")
    assert load_calibration(p, tok_bos, preset=plain).meta["preset"] == "mine"
    pairs = _write(tmp_path / "p.jsonl", [{"prompt": "hack", "response_0": "sure", "response_1": "sorry i cannot",
                                            "better_response_id": 0, "safer_response_id": 1}])
    better = replace(PRESETS["paper"], name="paper-better", pref_chosen="better")
    got = load_calibration(pairs, tok_bos, pairs=True, preset=better).samples[0]
    assert got.chosen.input_ids[-1:].tolist() == tok_bos("sure", add_special_tokens=False)["input_ids"]
    # names still work (api.py passes config.preset, a name)
    assert load_calibration(p, tok_bos, preset="official").meta["preset"] == "official"


def test_line_over_the_size_limit_is_refused_with_file_line_and_size(tok_bos, tmp_path):
    from nlsr_fast.calib.data import MAX_LINE_BYTES

    assert MAX_LINE_BYTES == 2**20
    long = json.dumps({"prompt": "x" * 3000, "response": "sorry"})
    p = _write(tmp_path / "big.jsonl", [{"prompt": "a", "response": "b"}, long])
    _err(tok_bos, p, rf"big\.jsonl:2: line is {len(long)} bytes, over the limit of 1000 bytes", max_line_bytes=1000)
    assert len(load_calibration(p, tok_bos, max_line_bytes=len(long))) == 2  # exactly at the limit: accepted
    # the default limit: a line of just over 1 MiB
    huge = json.dumps({"prompt": "x" * MAX_LINE_BYTES, "response": "sorry"})
    p2 = _write(tmp_path / "huge.jsonl", [huge])
    _err(tok_bos, p2, rf"huge\.jsonl:1: line is {len(huge)} bytes, over the limit of {MAX_LINE_BYTES} bytes")


def test_non_utf8_names_file_line_and_byte_offset(tok_bos, tmp_path):
    p = tmp_path / "latin1.jsonl"
    first = b'{"prompt": "a", "response": "b"}\n'
    p.write_bytes(first + b'{"prompt": "caf\xe9", "response": "b"}\n')
    _err(tok_bos, p, rf"latin1\.jsonl:2: not UTF-8 text: byte 0xe9 at byte offset 15 of the line "
                     rf"\(offset {len(first) + 15} in the file\)")


def test_a_folder_is_not_a_jsonl_file(tok_bos, tmp_path):
    (tmp_path / "calib").mkdir()
    _err(tok_bos, tmp_path / "calib", r"calib is a folder, not a JSONL file")


def test_line_separators_inside_json_strings_are_text(tok_bos, tmp_path):
    """Lines are split on newline only: U+2028, U+0085, \\x1c (which str.splitlines splits on) may sit raw in a
    JSON string. Found by the calibration fuzzer."""
    p = tmp_path / "u2028.jsonl"
    recs = [{"prompt": "a\u2028b\x85c\x1cd", "response": "sorry"}, {"prompt": "e", "response": "sorry"}]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    cs = load_calibration(p, tok_bos)
    assert len(cs) == 2 and cs.meta["lines"] == [1, 2]


def test_crlf_and_byte_order_mark(tok_bos, tmp_path):
    p = tmp_path / "crlf.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\r\n{"prompt": "c", "response": "d"}\r\n')
    assert load_calibration(p, tok_bos).meta["lines"] == [1, 2]


def test_pathological_json_names_the_line(tok_bos, tmp_path):
    """Deep nesting (RecursionError) and an integer over Python's digit limit raised errors without file:line."""
    deep = _write(tmp_path / "deep.jsonl", [{"prompt": "a", "response": "b"}, "[" * 100_000])
    _err(tok_bos, deep, r"deep\.jsonl:2: bad JSON")
    big = _write(tmp_path / "bigint.jsonl", ['{"prompt": "a", "response": "b", "n": ' + "9" * 5000 + "}"])
    _err(tok_bos, big, r"bigint\.jsonl:1: bad JSON")
    sur = _write(tmp_path / "sur.jsonl", ['{"prompt": "a\\ud800", "response": "b"}'])
    _err(tok_bos, sur, r"sur\.jsonl:1: field 'prompt' holds a lone surrogate")


def test_fewer_samples_than_requested_warns_with_both_numbers(tok_bos, tmp_path, caplog):
    p = _write(tmp_path / "few.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    with caplog.at_level("WARNING", logger="nlsr_fast.calib.data"):
        cs = load_calibration(p, tok_bos, nsamples=5)
    assert len(cs) == 2 and cs.meta["n_requested"] == 5 and cs.meta["n_samples"] == 2
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("2 valid samples, fewer than nsamples=5" in m for m in msgs), msgs


def test_pair_fallback_warns_once_per_file(tok_bos, tmp_path, caplog):
    recs = [{"prompt": f"p{i}", "response_0": "sure", "response_1": "sorry", "better_response_id": 1}
            for i in range(4)]
    p = _write(tmp_path / "fb.jsonl", recs)
    with caplog.at_level("WARNING", logger="nlsr_fast.calib.data"):
        load_calibration(p, tok_bos, pairs=True, preset="paper")
    msgs = [r.getMessage() for r in caplog.records if "safer_response_id" in r.getMessage()]
    assert len(msgs) == 1 and "4 pair records" in msgs[0] and "first: line 1" in msgs[0]


def test_samples_longer_than_the_context_are_cut(tok_bos, tmp_path):
    """Prompt cut from the left (its end kept, and the BOS), response cut to fit; counts in meta."""
    long_prompt = " ".join(f"w{i}" for i in range(200))
    p = _write(tmp_path / "ctx.jsonl", [{"prompt": long_prompt, "response": "one two three four five"},
                                        {"prompt": "a", "response": "six"}])
    full = load_calibration(p, tok_bos)
    n_resp = full.samples[0].n_response
    cs = load_calibration(p, tok_bos, max_context=40)
    s0, s1 = cs.samples
    assert s0.n_tokens == 40 and s0.n_response == n_resp
    assert s0.input_ids[0].item() == tok_bos.bos_token_id  # BOS kept
    assert s0.input_ids[1:].tolist() == full.samples[0].input_ids[-39:].tolist()  # the end of the prompt kept
    assert s1.input_ids.tolist() == full.samples[1].input_ids.tolist()  # short enough: untouched
    assert cs.meta["n_truncated_prompt"] == 1 and cs.meta["n_truncated_response"] == 0
    assert cs.meta["max_context"] == 40
    # a context shorter than the response: the response is cut to the context, the prompt dropped
    tiny = load_calibration(p, tok_bos, max_context=2)
    assert all(s.n_tokens <= 2 for s in tiny.samples)
    assert tiny.meta["n_truncated_response"] == 1 and tiny.meta["n_truncated_prompt"] == 2
    # pairs: one prompt for both sequences, cut to fit the longer response
    pp = _write(tmp_path / "ctxp.jsonl", [{"prompt": long_prompt, "chosen": "sorry", "rejected": "sure here is how"}])
    pr = load_calibration(pp, tok_bos, pairs=True, max_context=30).samples[0]
    assert pr.rejected.n_tokens == 30 and pr.chosen.n_tokens < 30
    assert pr.chosen.input_ids[: pr.prompt_ids.numel()].tolist() == pr.prompt_ids.tolist()
    _err(tok_bos, p, "max_context", max_context=0)
