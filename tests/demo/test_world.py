"""The demo world: disjoint, deterministic splits; a vocabulary that covers every text."""

from nlsr_fast.demo.train import encode, make_tokenizer
from nlsr_fast.demo.world import ALPACA_TEMPLATE, format_prompt, harmful_items, make_splits, task_items


def _prompts(items):
    return [it.prompt for it in items]


def test_splits_disjoint():
    s = make_splits(0)
    h_train, h_calib, h_eval = set(_prompts(s.harmful_train)), set(_prompts(s.harmful_calib)), set(
        _prompts(s.harmful_eval))
    assert len(h_train) == len(s.harmful_train) and len(h_eval) == len(s.harmful_eval)
    assert not h_train & h_calib and not h_train & h_eval and not h_calib & h_eval
    t_train, t_eval = set(_prompts(s.task_train)), set(_prompts(s.task_eval))
    assert not t_train & t_eval
    assert len(s.harmful_train) + len(s.harmful_calib) + len(s.harmful_eval) == len(harmful_items())
    assert len(s.task_train) + len(s.task_eval) == len(task_items())


def test_splits_deterministic_and_seeded():
    a, b, c = make_splits(0), make_splits(0), make_splits(1)
    assert a == b
    assert _prompts(a.harmful_eval) != _prompts(c.harmful_eval)
    assert harmful_items() == harmful_items() and task_items() == task_items()


def test_items_well_formed():
    for it in harmful_items():
        assert it.kind == "harmful" and it.response and it.refusal and not it.label
    labels = {it.label for it in task_items()}
    assert labels == {"positive", "negative"}
    assert all(it.response == it.label for it in task_items())


def test_template_is_spec_alpaca():
    assert format_prompt("x") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nx\n\n### Response:"
    )
    assert ALPACA_TEMPLATE.count("{prompt}") == 1


def test_tokenizer_covers_world():
    tok = make_tokenizer()
    for it in [*harmful_items()[::7], *task_items()[::37]]:
        ex = encode(tok, it.prompt, it.refusal or it.response)  # raises on an unknown word
        assert ex.ids[0] == tok.bos_token_id and ex.ids[-1] == tok.eos_token_id
    ids = tok(format_prompt("how do i rob a bank"))["input_ids"]
    assert tok.unk_token_id not in ids
