"""report.json's input hashes, end to end through nlsr_fast.realign, against hashlib of each whole file."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

import nlsr_fast
from nlsr_fast import testing
from nlsr_fast.io import hashing


def _hashers(monkeypatch: pytest.MonkeyPatch) -> list[hashing.BackgroundHasher]:
    """The BackgroundHashers the runs make (api.py looks the class up in nlsr_fast.io.hashing at run time)."""
    made: list[hashing.BackgroundHasher] = []

    class Recording(hashing.BackgroundHasher):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(hashing, "BackgroundHasher", Recording)
    return made


def _check_report(out: Path, roles: tuple[str, ...]) -> list[Path]:
    report = json.loads((out / "report.json").read_text())
    seen = []
    for role in roles:
        files = report["inputs"][role]["files"]
        assert files, role
        for f in files:
            data = Path(f["path"]).read_bytes()
            assert f["size"] == len(data), f["path"]
            assert f["sha256"] == hashlib.sha256(data).hexdigest(), f["path"]
            seen.append(Path(f["path"]))
    return seen


def _header(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_lora_report_hashes_come_from_the_runs_reads(tmp_path: Path, tiny_base: Path, adapter_plain: Path,
                                                     adapter_continued: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    made = _hashers(monkeypatch)
    out = tmp_path / "out"
    nlsr_fast.realign(tiny_base, adapter_plain, adapter_continued, out, method="random", quiet=True)
    files = _check_report(out, ("aligned", "finetuned"))
    report = json.loads((out / "report.json").read_text())
    assert all(f["sha256"] is None for f in report["inputs"]["base"]["files"])  # random LoRA never reads the base
    (h,) = made
    # The executor reads the adapters in their files' order, so every tensor byte was hashed from its reads: the
    # hasher itself read only the safetensors headers and the JSON files (no second pass).
    assert h.bytes_read == sum(_header(p) if p.suffix == ".safetensors" else p.stat().st_size for p in files)
    assert h.bytes_offered == sum(p.stat().st_size - _header(p) for p in files if p.suffix == ".safetensors")
    assert not hashing._registry and hashing._held == 0


def test_dense_report_hashes(tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aligned = testing.derive_checkpoint(tmp_path / "aligned", tiny_base, seed=1)
    finetuned = testing.derive_checkpoint(tmp_path / "finetuned", aligned, seed=2)
    made = _hashers(monkeypatch)
    out = tmp_path / "out"
    nlsr_fast.realign(tiny_base, aligned, finetuned, out, method="magnitude", quiet=True, mode="dense")
    files = _check_report(out, ("base", "aligned", "finetuned"))
    (h,) = made
    assert h.bytes_offered > 0
    assert h.bytes_read + h.bytes_offered == sum(p.stat().st_size for p in files)
    assert not hashing._registry and hashing._held == 0


@pytest.mark.parametrize("method", ["wanda", "snip"])
def test_lora_calibration_hashes_the_base_from_its_own_reads(tmp_path: Path, method: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    base = testing.make_tiny_llama(tmp_path / "base", layers=2)
    aligned = testing.make_lora_adapter(tmp_path / "aligned", base, r=4, alpha=8.0)
    finetuned = testing.continue_lora_adapter(tmp_path / "finetuned", aligned)
    calib = testing.write_calibration_jsonl(tmp_path / "calib.jsonl", n=4)
    made = _hashers(monkeypatch)
    out = tmp_path / "out"
    nlsr_fast.realign(base, aligned, finetuned, out, method=method, calibration=calib, quiet=True)
    files = _check_report(out, ("base", "aligned", "finetuned"))
    (h,) = made
    # Calibration reads every decoder layer of the base through the streamed reader, so those bytes were hashed
    # from its reads; the hasher read by itself at most the headers, JSON files and the tensors calibration skips
    # (before, it read the whole base a second time).
    from nlsr_fast.io import CheckpointReader

    reader = CheckpointReader(base)
    layer_bytes = sum(reader.info(k).nbytes for k in reader.keys() if k.startswith("model.layers."))
    assert layer_bytes > 0
    assert h.bytes_offered >= layer_bytes
    assert h.bytes_read <= sum(p.stat().st_size for p in files) + calib.stat().st_size - layer_bytes
    assert not hashing._registry and hashing._held == 0
