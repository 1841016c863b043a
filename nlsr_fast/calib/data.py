"""Calibration data: JSONL safety prompts with responses (or preference pairs), formatted and tokenised (SPEC §3, §8).

Each sample is `prompt ++ response` as token ids plus a boolean mask of the response positions: only response tokens
count in statistics and losses, prompt tokens are context.

Token rules (SPEC §8 "response tokens"):
  * prompt: the formatted prompt tokenised with the tokenizer's defaults (adds a BOS when the tokenizer does). With
    the "chat" template the text already carries the model's special tokens, so it is tokenised without adding any.
  * response, preset `paper`: tokenised without special tokens, all tokens kept.
  * response, preset `official`: tokenised with the tokenizer's defaults, then the first token dropped (meant to drop
    a BOS; with a tokenizer that adds none it drops a real token, as the released code does).
  * the response is then truncated to `max_response_tokens`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ALPACA_TEMPLATE",
    "Sample",
    "PairSample",
    "CalibrationSet",
    "format_prompt",
    "load_calibration",
]

logger = logging.getLogger(__name__)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:"
)
_TEMPLATES = ("alpaca", "chat")
_PRESETS = ("paper", "official")


@dataclass
class Sample:
    """One calibration sequence.

    input_ids: (T,) int64, prompt tokens then response tokens.
    response_mask: (T,) bool, True at the positions of response tokens.
    """

    input_ids: torch.Tensor
    response_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 1 or self.response_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"Sample needs 1-D input_ids and a response_mask of the same shape, got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.response_mask.shape)}"
            )

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_response(self) -> int:
        return int(self.response_mask.sum())


@dataclass
class PairSample:
    """A preference pair: the shared prompt ids (P,) and the chosen / rejected sequences (each prompt ++ response)."""

    prompt_ids: torch.Tensor
    chosen: Sample
    rejected: Sample


@dataclass
class CalibrationSet:
    """The samples (all `Sample` or all `PairSample`) plus `meta` (source file, lines used, seed, token counts)."""

    samples: list[Sample] | list[PairSample]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def is_pairs(self) -> bool:
        return bool(self.samples) and isinstance(self.samples[0], PairSample)

    def sequences(self) -> list[Sample]:
        """Every sequence in order: the samples, or for pairs chosen_0, rejected_0, chosen_1, ..."""
        out: list[Sample] = []
        for s in self.samples:
            if isinstance(s, PairSample):
                out += [s.chosen, s.rejected]
            else:
                out.append(s)
        return out


def format_prompt(prompt: str, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text for `template`: "alpaca" (SPEC §3, the authors' template) or "chat" (the tokenizer's chat
    template applied to one user turn with add_generation_prompt=True)."""
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(prompt=prompt)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat_template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}; expected one of {_TEMPLATES}")


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _response_ids(tokenizer: Any, text: str, preset: str) -> list[int]:
    if preset == "paper":
        return _ids(tokenizer, text, add_special_tokens=False)
    return _ids(tokenizer, text, add_special_tokens=True)[1:]


def _pair_fields(rec: dict[str, Any], preset: str, where: str) -> tuple[str, str]:
    """(chosen, rejected) texts of a pair record; see `load_calibration` for the accepted layouts."""
    if "chosen" in rec or "rejected" in rec:
        for k in ("chosen", "rejected"):
            if not isinstance(rec.get(k), str):
                raise ValueError(f"{where}: pair record needs string fields 'prompt', 'chosen', 'rejected' (bad {k!r})")
        return rec["chosen"], rec["rejected"]
    if "response_0" in rec and "response_1" in rec:
        if preset == "paper" and "safer_response_id" in rec:
            key = "safer_response_id"
        elif "better_response_id" in rec:
            key = "better_response_id"
        elif "safer_response_id" in rec:
            key = "safer_response_id"
        else:
            raise ValueError(f"{where}: pair record with response_0/response_1 needs 'better_response_id' "
                             f"or 'safer_response_id'")
        if preset == "paper" and key != "safer_response_id":
            logger.warning("%s: preset 'paper' wants the safer response as chosen but the record has no "
                           "'safer_response_id'; using 'better_response_id'", where)
        choice = rec[key]
        if choice not in (0, 1, "0", "1"):
            raise ValueError(f"{where}: {key} must be 0 or 1, got {choice!r}")
        c = int(choice)
        chosen, rejected = rec[f"response_{c}"], rec[f"response_{1 - c}"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError(f"{where}: response_0 and response_1 must be strings")
        return chosen, rejected
    raise ValueError(f"{where}: pair record needs fields 'chosen' and 'rejected' (or 'response_0', 'response_1' "
                     f"and 'better_response_id'/'safer_response_id'); got {sorted(rec)}")


def _sample(prompt_ids: list[int], resp: list[int], where: str, what: str) -> Sample:
    if not resp:
        raise ValueError(f"{where}: the {what} is empty after tokenisation/truncation")
    ids = torch.tensor(prompt_ids + resp, dtype=torch.long)
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    mask[len(prompt_ids):] = True
    return Sample(ids, mask)


def load_calibration(
    path: str | os.PathLike[str],
    tokenizer: Any,
    *,
    nsamples: int = 2000,
    max_response_tokens: int = 256,
    seed: int = 42,
    template: str = "alpaca",
    preset: str = "paper",
    pairs: bool = False,
) -> CalibrationSet:
    """Read, choose, format and tokenise the calibration JSONL at `path`.

    Records: {"prompt", "response"}; with `pairs`: {"prompt", "chosen", "rejected"} or the PKU-SafeRLHF layout
    {"prompt", "response_0", "response_1", "better_response_id", "safer_response_id"} where chosen is the safer
    response in preset `paper` (falls back to better_response_id with a warning) and `better_response_id` in preset
    `official`. Blank lines are skipped. When the file has more than `nsamples` records, a seeded choice
    (torch.randperm with a Generator seeded by `seed`) picks `nsamples` of them, kept in file order; `meta["lines"]`
    lists the 1-based line numbers used.

    Raises ValueError naming the file (and the 1-based line) for a missing file, an empty file or one with no
    records, bad JSON, missing fields, or a response that is empty after tokenisation/truncation.
    """
    path = Path(path)
    if template not in _TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {_TEMPLATES}")
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {_PRESETS}")
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    if max_response_tokens < 1:
        raise ValueError(f"max_response_tokens must be >= 1, got {max_response_tokens}")
    if not path.is_file():
        raise ValueError(f"calibration file {path} does not exist")
    raw = path.read_bytes()
    records: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if not isinstance(rec.get("prompt"), str):
            raise ValueError(f"{where}: missing string field 'prompt'")
        if pairs:
            _pair_fields(rec, preset, where)  # validate now, so errors name the line even if it is not chosen
        elif not isinstance(rec.get("response"), str):
            raise ValueError(f"{where}: missing string field 'response'")
        records.append((lineno, rec))
    if not records:
        raise ValueError(f"calibration file {path} is empty (no valid samples)")

    n_avail = len(records)
    if n_avail > nsamples:
        gen = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(n_avail, generator=gen)[:nsamples].tolist())
        chosen_recs = [records[i] for i in idx]
    else:
        if n_avail < nsamples:
            logger.info("%s has %d samples, fewer than nsamples=%d: using all", path, n_avail, nsamples)
        chosen_recs = records

    samples: list[Any] = []
    n_trunc = 0
    n_prompt_tok = n_resp_tok = 0
    for lineno, rec in chosen_recs:
        where = f"{path}:{lineno}"
        text = format_prompt(rec["prompt"], template, tokenizer)
        prompt_ids = _ids(tokenizer, text, add_special_tokens=(template != "chat"))
        n_prompt_tok += len(prompt_ids)
        if pairs:
            c_text, r_text = _pair_fields(rec, preset, where)
            seqs = []
            for what, t in (("chosen response", c_text), ("rejected response", r_text)):
                resp = _response_ids(tokenizer, t, preset)
                n_trunc += len(resp) > max_response_tokens
                resp = resp[:max_response_tokens]
                n_resp_tok += len(resp)
                seqs.append(_sample(prompt_ids, resp, where, what))
            samples.append(PairSample(torch.tensor(prompt_ids, dtype=torch.long), seqs[0], seqs[1]))
        else:
            resp = _response_ids(tokenizer, rec["response"], preset)
            n_trunc += len(resp) > max_response_tokens
            resp = resp[:max_response_tokens]
            n_resp_tok += len(resp)
            samples.append(_sample(prompt_ids, resp, where, "response"))

    meta: dict[str, Any] = {
        "path": str(path),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "n_records": n_avail,
        "nsamples_requested": nsamples,
        "n_samples": len(samples),
        "lines": [ln for ln, _ in chosen_recs],
        "seed": seed,
        "template": template,
        "preset": preset,
        "pairs": pairs,
        "max_response_tokens": max_response_tokens,
        "n_truncated": n_trunc,
        "prompt_tokens": n_prompt_tok,
        "response_tokens": n_resp_tok,
    }
    logger.info("calibration: %d samples from %s (%d response tokens, %d truncated)",
                len(samples), path, n_resp_tok, n_trunc)
    return CalibrationSet(samples, meta)
