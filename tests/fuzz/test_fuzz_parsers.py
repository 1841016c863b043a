"""Property-based fuzzing of the four input parsers (issue 8): random and mutated safetensors headers, checkpoint
indexes, adapter configs + weights, calibration lines. Each gives a parsed result that is safe to use or the
project's own error naming the file; never another exception, a hang or a read outside the file. The properties and
strategies live in tests/fuzz/properties.py, shared with the long campaign (benches/fuzz_campaign.py)."""

from __future__ import annotations

from hypothesis import given, settings

from . import properties as P


@given(P.header_inputs())
@settings(max_examples=200)
def test_safetensors_header(data: bytes) -> None:
    P.check_header(data)


@given(P.index_inputs())
def test_checkpoint_index(case: P.IndexCase) -> None:
    P.check_index(case)


@given(P.adapter_inputs())
@settings(max_examples=150)
def test_adapter_config(case: P.AdapterCase) -> None:
    P.check_adapter(case)


@given(P.calibration_inputs())
@settings(max_examples=150)
def test_calibration_lines(case: P.CalibCase) -> None:
    P.check_calibration(case)
