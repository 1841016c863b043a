"""Calibration data: JSONL safety prompts with responses (or preference pairs), formatted and tokenised
(docs/algorithm.md §3, §8).

Each sample is `prompt ++ response` as token ids plus a boolean mask of the response positions: only response tokens
count in statistics and losses, prompt tokens are context.

Token rules (docs/algorithm.md §8 "response tokens"):
  * prompt: the formatted prompt tokenised with the tokenizer's defaults (adds a BOS when the tokenizer does). With
    the "chat" template the text already carries the model's special tokens, so it is tokenised without adding any.
  * response, preset `paper`: tokenised without special tokens, all tokens kept.
  * response, preset `official`: tokenised with the tokenizer's defaults, then the first token dropped (meant to drop
    a BOS; with a tokenizer that adds none it drops a real token, as the released code does).
  * the response is then truncated to `max_response_tokens`.
  * with `max_context` (the model's `max_position_embeddings`), a sequence longer than the context is cut to fit:
    the prompt from the left (its end is kept, and its first token too when that is the tokenizer's BOS), the
    response to at most `max_context` tokens. Counts go to the set's meta.

Bounded inputs: the file is read line by line, each line at most `max_line_bytes` (MAX_LINE_BYTES, 1 MiB) before it
is decoded or parsed, so a huge line costs neither time nor memory; no sample is longer than `max_context` tokens.
Calibration memory is then bounded by micro-batch x context for the per-batch activations, plus
samples x context x hidden for the hidden states the streamed engine keeps between layers.

One parser (`read_calibration_records`) validates every line; the dry run (`pipeline.plan.calibration_summary`) uses
it too, so a dry run finds every error in the file that the real run would, before any tokenizer work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nlsr_fast.config import Preset, resolve_preset

__all__ = [
    "ALPACA_TEMPLATE",
    "MAX_LINE_BYTES",
    "Sample",
    "PairSample",
    "CalibrationRecord",
    "CalibrationFile",
    "CalibrationSet",
    "check_calibration_path",
    "format_prompt",
    "load_calibration",
    "read_calibration_records",
]

logger = logging.getLogger(__name__)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:"
)
_TEMPLATES = ("alpaca", "chat")
# The longest calibration line accepted, in bytes (without its newline). A safety prompt with its response is a few
# KiB; a line this long is not a calibration sample, and reading it whole would cost memory before any check.
MAX_LINE_BYTES = 2**20


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
    """The prompt text for `template`: "alpaca" (docs/algorithm.md §3, the authors' template) or "chat" (the
    tokenizer's chat template applied to one user turn with add_generation_prompt=True)."""
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


def _response_ids(tokenizer: Any, text: str, preset: Preset) -> list[int]:
    if preset.response_tokens == "plain":
        return _ids(tokenizer, text, add_special_tokens=False)
    return _ids(tokenizer, text, add_special_tokens=True)[1:]


@dataclass(frozen=True)
class CalibrationRecord:
    """One valid line of a calibration file: its 1-based line number, the prompt, and the response texts:
    (response,) for plain samples, (chosen, rejected) for preference pairs."""

    line: int
    prompt: str
    responses: tuple[str, ...]


@dataclass(frozen=True)
class CalibrationFile:
    """Every valid record of a calibration file, with the file's sha256 and size in bytes."""

    path: Path
    records: list[CalibrationRecord]
    sha256: str
    nbytes: int


def check_calibration_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path if it names a readable regular file, else a ValueError saying what it is instead."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"calibration file {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"calibration file {path} cannot be read: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"calibration file {path} is a folder, not a JSONL file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"calibration file {path} is not a regular file")
    return path


def _check_text(value: str, where: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: field {what!r} holds a lone surrogate escape ({value[e.start]!r} at character "
                         f"{e.start}), which is not text") from None
    return value


def _pair_fields(rec: dict[str, Any], pref_chosen: str, where: str) -> tuple[tuple[str, str], bool]:
    """((chosen, rejected) texts, whether preference 'safer' fell back to better_response_id) of a pair record;
    see `load_calibration` for the accepted layouts."""
    if "chosen" in rec or "rejected" in rec:
        for k in ("chosen", "rejected"):
            if not isinstance(rec.get(k), str):
                raise ValueError(f"{where}: pair record needs string fields 'prompt', 'chosen', 'rejected' (bad {k!r})")
        return (rec["chosen"], rec["rejected"]), False
    if "response_0" in rec and "response_1" in rec:
        if pref_chosen == "safer" and "safer_response_id" in rec:
            key = "safer_response_id"
        elif "better_response_id" in rec:
            key = "better_response_id"
        elif "safer_response_id" in rec:
            key = "safer_response_id"
        else:
            raise ValueError(f"{where}: pair record with response_0/response_1 needs 'better_response_id' "
                             f"or 'safer_response_id'")
        choice = rec[key]
        if isinstance(choice, bool) or choice not in (0, 1, "0", "1"):
            raise ValueError(f"{where}: {key} must be 0 or 1, got {choice!r}")
        c = int(choice)
        chosen, rejected = rec[f"response_{c}"], rec[f"response_{1 - c}"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError(f"{where}: response_0 and response_1 must be strings")
        return (chosen, rejected), pref_chosen == "safer" and key != "safer_response_id"
    raise ValueError(f"{where}: pair record needs fields 'chosen' and 'rejected' (or 'response_0', 'response_1' "
                     f"and 'better_response_id'/'safer_response_id'); got {sorted(rec)}")


def _parse_line(text: str, where: str, pairs: bool, pref_chosen: str) -> tuple[str, tuple[str, ...], bool] | None:
    """(prompt, responses, fell back) of one line's text, None for a blank line; ValueError naming `where`."""
    if not text.strip():
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer too long to convert, nesting too deep
        raise ValueError(f"{where}: bad JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if not isinstance(rec.get("prompt"), str):
        raise ValueError(f"{where}: missing string field 'prompt'")
    fell_back = False
    responses: tuple[str, ...]
    if pairs:
        responses, fell_back = _pair_fields(rec, pref_chosen, where)
        names: tuple[str, ...] = ("chosen", "rejected")
    elif not isinstance(rec.get("response"), str):
        raise ValueError(f"{where}: missing string field 'response'")
    else:
        responses, names = (rec["response"],), ("response",)
    _check_text(rec["prompt"], where, "prompt")
    for name, value in zip(names, responses, strict=True):
        _check_text(value, where, name)
        if not value:  # empty under every tokenizer and preset: found here, before any tokenizer work
            raise ValueError(f"{where}: the {name if name == 'response' else name + ' response'} is empty")
    return rec["prompt"], tuple(responses), fell_back


def _lines(f: Any, path: Path, max_line_bytes: int, digest: Any) -> Any:
    """Yield (1-based line number, byte offset of the line in the file, the line's bytes without its newline);
    refuse a line longer than `max_line_bytes` before reading more of it than that."""
    lineno = offset = 0
    while True:
        chunk = f.readline(max_line_bytes + 1)
        if not chunk:
            return
        lineno += 1
        if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
            size = len(chunk)
            while not chunk.endswith(b"\n"):
                chunk = f.readline(2**20)
                if not chunk:
                    break
                size += len(chunk) - chunk.endswith(b"\n")
            raise ValueError(f"{path}:{lineno}: line is {size} bytes, over the limit of {max_line_bytes} bytes per "
                             f"calibration line (max_line_bytes)")
        digest.update(chunk)
        yield lineno, offset, chunk.rstrip(b"\n").rstrip(b"\r")
        offset += len(chunk)


def read_calibration_records(
    path: str | os.PathLike[str],
    *,
    pairs: bool = False,
    preset: Preset | str = "paper",
    max_line_bytes: int = MAX_LINE_BYTES,
) -> CalibrationFile:
    """Read and validate every line of the calibration JSONL at `path`, without a tokenizer.

    The one line parser of the project: `load_calibration` and the dry run's `calibration_summary` both call it.
    Lines are split on '\n' only (a JSON string may hold U+2028 and other characters that `str.splitlines` would
    split on), each line read at most `max_line_bytes` bytes at a time. Blank lines are skipped. For pairs, the
    preset's `pref_chosen` says which response of a response_0/response_1 record is chosen.

    Raises:
        ValueError: naming the file and the 1-based line: a line over `max_line_bytes` (with its size), bytes that
        are not UTF-8 (with the byte offset in the line and in the file), bad JSON, not an object, missing or
        non-string fields, a lone surrogate escape in a text; or naming the file: a folder, a missing file, no
        valid record at all.
    """
    p = resolve_preset(preset)
    if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) or max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be an integer >= 1, got {max_line_bytes!r}")
    path = check_calibration_path(path)
    digest = hashlib.sha256()
    records: list[CalibrationRecord] = []
    fell_back: list[int] = []
    nbytes = 0
    with path.open("rb") as f:
        for lineno, offset, raw in _lines(f, path, max_line_bytes, digest):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, offset = raw[3:], offset + 3  # a UTF-8 byte order mark
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} of "
                                 f"the line (offset {offset + e.start} in the file)") from None
            parsed = _parse_line(text, where, pairs, p.pref_chosen)
            if parsed is None:
                continue
            prompt, responses, fb = parsed
            if fb:
                fell_back.append(lineno)
            records.append(CalibrationRecord(lineno, prompt, responses))
        nbytes = f.tell()
    if not records:
        raise ValueError(f"calibration file {path} is empty (no valid samples)")
    if fell_back:
        logger.warning("%s: %d pair records have no 'safer_response_id' (first: line %d); preset %r wants the safer "
                       "response as chosen, so 'better_response_id' is used for them", path, len(fell_back),
                       fell_back[0], p.name)
    return CalibrationFile(path, records, digest.hexdigest(), nbytes)


def _sample(prompt_ids: list[int], resp: list[int], where: str, what: str) -> Sample:
    if not resp:
        raise ValueError(f"{where}: the {what} is empty after tokenisation/truncation")
    ids = torch.tensor(prompt_ids + resp, dtype=torch.long)
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    mask[len(prompt_ids):] = True
    return Sample(ids, mask)


def _fit_prompt(prompt_ids: list[int], keep: int, bos: int | None) -> list[int]:
    """The prompt cut from the left to `keep` tokens, keeping its first token when that is the BOS."""
    if keep >= len(prompt_ids):
        return prompt_ids
    if keep <= 0:
        return []
    if bos is not None and prompt_ids[0] == bos:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - (keep - 1):]
    return prompt_ids[len(prompt_ids) - keep:]


def load_calibration(
    path: str | os.PathLike[str],
    tokenizer: Any,
    *,
    nsamples: int = 2000,
    max_response_tokens: int = 256,
    seed: int = 42,
    template: str = "alpaca",
    preset: Preset | str = "paper",
    pairs: bool = False,
    max_context: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> CalibrationSet:
    """Read, choose, format and tokenise the calibration JSONL at `path`.

    Records: {"prompt", "response"}; with `pairs`: {"prompt", "chosen", "rejected"} or the PKU-SafeRLHF layout
    {"prompt", "response_0", "response_1", "better_response_id", "safer_response_id"} where chosen is the safer
    response when the preset's `pref_chosen` is "safer" (falls back to better_response_id with a warning) and
    `better_response_id` when it is "better". Blank lines are skipped. When the file has more than `nsamples`
    records, a seeded choice (torch.randperm with a Generator seeded by `seed`) picks `nsamples` of them, kept in
    file order; `meta["lines"]` lists the 1-based line numbers used. Fewer valid records than `nsamples` logs a
    warning with both numbers and uses them all (`meta["n_requested"]`, `meta["n_samples"]`).

    Args:
        preset: a `Preset` or its name; its `response_tokens` and `pref_chosen` fields set the token rules.
        max_context: the model's context (`max_position_embeddings` of the base config), or None for no limit.
            Longer sequences are cut: the prompt from the left, the response to `max_context` tokens
            (`meta["n_truncated_prompt"]`, `meta["n_truncated_response"]` count them; the latter also counts
            responses cut to `max_response_tokens`).
        max_line_bytes: the longest line accepted (MAX_LINE_BYTES by default).

    Memory: no sample exceeds `max_context` tokens, so one micro-batch's activations are bounded by
    micro-batch x context; the streamed engine also keeps every sample's hidden state (samples x context x hidden).

    Raises ValueError naming the file (and the 1-based line) for a missing file or a folder, an empty file or one
    with no records, a line over `max_line_bytes`, bytes that are not UTF-8, bad JSON, missing fields, or a
    response that is empty after tokenisation/truncation.
    """
    p = resolve_preset(preset)
    if template not in _TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {_TEMPLATES}")
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    if max_response_tokens < 1:
        raise ValueError(f"max_response_tokens must be >= 1, got {max_response_tokens}")
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 1):
        raise ValueError(f"max_context must be an integer >= 1 or None, got {max_context!r}")
    cfile = read_calibration_records(path, pairs=pairs, preset=p, max_line_bytes=max_line_bytes)
    path, records = cfile.path, cfile.records

    n_avail = len(records)
    if n_avail > nsamples:
        gen = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(n_avail, generator=gen)[:nsamples].tolist())
        chosen_recs = [records[i] for i in idx]
    else:
        if n_avail < nsamples:
            logger.warning("calibration file %s has %d valid samples, fewer than nsamples=%d: using all %d",
                           path, n_avail, nsamples, n_avail)
        chosen_recs = records

    bos = getattr(tokenizer, "bos_token_id", None)
    resp_limit = max_response_tokens if max_context is None else min(max_response_tokens, max_context)
    samples: list[Any] = []
    n_trunc_resp = n_trunc_prompt = 0
    n_prompt_tok = n_resp_tok = 0
    for rec in chosen_recs:
        where = f"{path}:{rec.line}"
        text = format_prompt(rec.prompt, template, tokenizer)
        prompt_ids = _ids(tokenizer, text, add_special_tokens=(template != "chat"))
        resps = []
        for t in rec.responses:
            resp = _response_ids(tokenizer, t, p)
            n_trunc_resp += len(resp) > resp_limit
            resps.append(resp[:resp_limit])
        if max_context is not None:
            fitted = _fit_prompt(prompt_ids, max_context - max(len(r) for r in resps), bos)
            n_trunc_prompt += len(fitted) < len(prompt_ids)
            prompt_ids = fitted
        n_prompt_tok += len(prompt_ids)
        n_resp_tok += sum(len(r) for r in resps)
        if pairs:
            chosen, rejected = (_sample(prompt_ids, r, where, what)
                                for r, what in zip(resps, ("chosen response", "rejected response"), strict=True))
            samples.append(PairSample(torch.tensor(prompt_ids, dtype=torch.long), chosen, rejected))
        else:
            samples.append(_sample(prompt_ids, resps[0], where, "response"))

    meta: dict[str, Any] = {
        "path": str(path),
        "sha256": cfile.sha256,
        "n_records": n_avail,
        "n_requested": nsamples,
        "nsamples_requested": nsamples,
        "n_samples": len(samples),
        "lines": [rec.line for rec in chosen_recs],
        "seed": seed,
        "template": template,
        "preset": p.name,
        "pairs": pairs,
        "max_response_tokens": max_response_tokens,
        "max_context": max_context,
        "n_truncated": n_trunc_resp,
        "n_truncated_response": n_trunc_resp,
        "n_truncated_prompt": n_trunc_prompt,
        "prompt_tokens": n_prompt_tok,
        "response_tokens": n_resp_tok,
    }
    if n_trunc_prompt or n_trunc_resp:
        logger.info("calibration: %d prompts cut from the left to fit the context (%s), %d responses cut to %d "
                    "tokens", n_trunc_prompt, max_context, n_trunc_resp, resp_limit)
    logger.info("calibration: %d samples from %s (%d response tokens, %d truncated)",
                len(samples), path, n_resp_tok, n_trunc_resp)
    return CalibrationSet(samples, meta)
