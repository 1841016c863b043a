"""The method registry (nlsr_fast.methods): each declaration is consistent, every consumer reads it, and a method's
unsupported mode is refused with its reason before anything runs."""

from __future__ import annotations

import pytest

import nlsr_fast
from nlsr_fast import methods
from nlsr_fast.cli import build_parser
from nlsr_fast.config import METHODS as CONFIG_METHODS
from nlsr_fast.config import RealignConfig
from nlsr_fast.methods import METHODS, Method, Needs


def test_every_consumer_lists_the_registrys_methods() -> None:
    assert list(METHODS) == ["low_rank", "wanda", "snip", "pref_snip", "random", "magnitude", "safelora", "antidote",
                            "resta"]
    assert CONFIG_METHODS == tuple(METHODS)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    method_flag = next(a for a in sub.choices["realign"]._actions if a.dest == "method")  # type: ignore[attr-defined]
    assert list(method_flag.choices) == list(METHODS)
    assert all(name in method_flag.help for name in METHODS)
    assert RealignConfig().method == methods.DEFAULT == "low_rank"


@pytest.mark.parametrize("name", list(METHODS))
def test_declaration_is_consistent(name: str) -> None:
    m = METHODS[name]
    assert m.name == name and m.reference.startswith("https://") and m.summary and m.title
    assert set(m.modes) | set(m.refused) == {"lora", "dense"} and not set(m.modes) & set(m.refused)
    assert (m.lora_masks is not None) == ("lora" in m.modes)  # LoRA mode masks every module through it
    assert (m.col_scale is not None) == (m.needs is Needs.STATISTICS and "dense" in m.modes)
    assert (m.draw is not None) == (not m.needs_calibration and "lora" in m.modes and m.repair == "restore")
    assert m.selections[0] in m.selections and (m.share == "prune_ratio") == ("prune_ratio" in m.defaults)
    assert m.splits_samples == (m.needs is Needs.STATISTICS)
    assert m.gradients == (m.loss is not None)
    assert m.record()["name"] == name and m.record()["needs"] == m.needs.value


def test_a_declaration_missing_a_reason_or_a_loss_is_refused() -> None:
    base = {"name": "x", "title": "x", "reference": "https://x", "summary": "x", "needs": Needs.NONE}
    with pytest.raises(ValueError, match="reason for each mode"):
        Method(modes=("lora",), **base)
    with pytest.raises(ValueError, match="modes must be"):
        Method(modes=("cpu",), **base)
    with pytest.raises(ValueError, match="a loss goes with gradient calibration"):
        Method(modes=("lora", "dense"), **{**base, "needs": Needs.GRADIENTS})


@pytest.mark.parametrize(("name", "mode", "reason"), [
    ("low_rank", "dense", "d_in x d_in Gram"), ("pref_snip", "dense", "two full models"),
    ("magnitude", "lora", "no change from the base"),
])
def test_unsupported_mode_refused_with_the_declared_reason(name: str, mode: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"method {name!r} is not available in {mode} mode: .*{reason}") as exc:
        RealignConfig(method=name, mode=mode)
    assert str(list(methods.names(mode))) in str(exc.value)
    with pytest.raises(ValueError, match="method must be one of"):
        methods.get("lowrank")


def test_methods_table_has_a_row_per_method_in_order() -> None:
    rows = methods.methods_table().splitlines()[2:]
    assert [r.split("|")[1].split()[0].strip("`") for r in rows] == list(METHODS)
    assert "(default)" in rows[0] and sum("(default)" in r for r in rows) == 1
    assert "top 1−s of each factor" in rows[0]
    assert "| restores the 1−s of each row |" in rows[list(METHODS).index("random")]
    row = {name: rows[i] for i, name in enumerate(METHODS)}
    assert "zeroes the top prune_ratio" in row["antidote"] and "the 10 least similar" in row["safelora"]
    assert "adds β (default 0.5)" in row["resta"]


def test_data_free_method_needs_no_calibration_file(tmp_path) -> None:
    """needs=NONE is what lets a run go without --calibration; a method that needs data is refused without it."""
    from nlsr_fast import testing

    base = testing.make_tiny_llama(tmp_path / "base", layers=1, hidden=16, intermediate=32)
    aligned = testing.make_lora_adapter(tmp_path / "a", base, r=2)
    ft = testing.continue_lora_adapter(tmp_path / "t", aligned)
    report = nlsr_fast.realign(base, aligned, ft, tmp_path / "out", method="random", quiet=True)
    assert report.method["needs"] == "nothing" and report.counts["calibration_samples"] == 0
    with pytest.raises(ValueError, match="method 'wanda' needs calibration data"):
        nlsr_fast.realign(base, aligned, ft, tmp_path / "out2", method="wanda", quiet=True)
    assert not (tmp_path / "out2").exists()
