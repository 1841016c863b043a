"""The `nlsr-fast` command line: `realign`, `demo` and `bench`. The config is built here, never in the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from nlsr_fast import methods
from nlsr_fast.config import (
    BACKENDS,
    CALIB_DTYPES,
    EXTRA_TENSORS,
    MODES,
    PRESETS,
    SCORE_ON,
    SELECTIONS,
    TEMPLATES,
    RealignConfig,
)

__all__ = ["build_parser", "load_yaml_options", "main"]

log = logging.getLogger("nlsr_fast.cli")

#: Keys a --config YAML file may set besides the RealignConfig fields: input paths, then run switches.
_PATH_KEYS = ("calibration", "reference", "unaligned")
_SWITCH_KEYS = ("dry_run", "quiet", "overwrite", "wait", "force")
_EXTRA_KEYS = _PATH_KEYS + _SWITCH_KEYS
# Exceptions that mean "bad input": exit 2 with one line.
_INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotImplementedError)


def _add_realign(sub: Any) -> None:
    p = sub.add_parser(
        "realign",
        help="realign a fine-tuned model (LoRA adapter or checkpoint) with NLSR",
        description="Restore the safety-critical neurons of a fine-tuned model from the (amplified) safety-aligned "
        "model (NLSR, arXiv 2412.12497). Flags override --config values, which override defaults. "
        "BASE, ALIGNED, FINETUNED and --reference are folders or Hugging Face ids (org/name, org/name@revision) "
        "already in the local cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub); nothing is "
        "downloaded, and a local path wins over an id of the same spelling.",
    )
    p.add_argument("base", help="base checkpoint folder (sharded safetensors + config + tokenizer)")
    p.add_argument("aligned", help="safety-aligned model: PEFT LoRA adapter on BASE, or full checkpoint (dense)")
    p.add_argument("finetuned", help="fine-tuned model: adapter that continued ALIGNED (LoRA mode), any adapter on "
                   "BASE, or full checkpoint (dense mode)")
    p.add_argument("out", help="output folder (must not exist, unless --overwrite)")
    p.add_argument("--config", metavar="YAML", help="YAML file of option values (keys as the flags, - or _)")
    p.add_argument("--calibration", metavar="JSONL", help="calibration samples (pairs for pref_snip)")
    p.add_argument("--reference", metavar="DIR|ID", help="ready reference (adapter, or checkpoint in dense mode); "
                   "skips amplification")
    p.add_argument("--unaligned", metavar="DIR|ID", help="resta: the unaligned model (adapter on BASE or checkpoint) "
                   "whose difference from ALIGNED is the safety vector (default: BASE)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper (default) or official (the released code)")
    p.add_argument("--method", choices=methods.names(), metavar="METHOD",
                   help=f"the method (default {methods.DEFAULT}): "
                   + "; ".join(f"{n} ({', '.join(m.modes)}): {m.summary}" for n, m in methods.METHODS.items())
                   .replace("%", "%%"))
    p.add_argument("--sparsity", type=float, help="sparsity s; masks keep the top 1-s (default 0.8)")
    p.add_argument("--alpha", type=float, help="amplification coefficient (default 0.9)")
    p.add_argument("--selection", choices=SELECTIONS, help="module selection rule (default: the method's; "
                   "adaptive, count for safelora, all for antidote)")
    p.add_argument("--prune-rate", type=float, help="rho, mean restore probability of adaptive (default 0.5)")
    p.add_argument("--epsilon", type=float, help="spread of the adaptive probabilities (default 0.2)")
    p.add_argument("--tau", type=float, help="threshold selection: restore modules with S < tau")
    p.add_argument("--fraction", type=float, help="fraction selection: restore the ceil(q N) least similar")
    p.add_argument("--count", type=int, help="count selection: repair the COUNT least similar modules (safelora's "
                   "default: 10)")
    p.add_argument("--prune-ratio", type=float, help="antidote: the share of each row pruned, zeroed (default 0.1)")
    p.add_argument("--beta", type=float, help="resta: the weight of the safety vector (default 0.5)")
    p.add_argument("--dare-rate", type=float, help="resta: DARE's drop rate on the fine-tuning change (default: no "
                   "DARE)")
    p.add_argument("--seed", type=int, help="seed (default 42)")
    p.add_argument("--nsamples", type=int, help="calibration samples (default 2000)")
    p.add_argument("--max-response-tokens", type=int, help="response tokens kept per sample (default 256)")
    p.add_argument("--template", choices=TEMPLATES, help="prompt template (default alpaca)")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each layer with its projected/masked factors (default on)")
    p.add_argument("--micro-batch", type=int, help="sequences per calibration forward (default: by size)")
    p.add_argument("--calib-dtype", choices=CALIB_DTYPES, help="calibration forward dtype (default: the base's)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--backend", choices=BACKENDS, help="ops backend (default: fastest available)")
    p.add_argument("--mode", choices=MODES, help="lora, dense, or auto (default: lora when FINETUNED is an adapter "
                   "with ALIGNED's keys and ranks, else dense)")
    p.add_argument("--targets", metavar="REGEX", help="dense mode: target linears, a regex on module names "
                   "(default: the seven projections)")
    p.add_argument("--score-on", choices=SCORE_ON, help="dense mode: score the reference's delta W_e - W_0 "
                   "(default) or W_e itself")
    p.add_argument("--allow-nonfinite", action="store_true", default=None,
                   help="go on when an input holds NaN/Inf (each listed in report.json); default: refuse")
    p.add_argument("--extra-tensors", choices=EXTRA_TENSORS, help="non-LoRA tensors of the fine-tuned adapter "
                   "(modules_to_save heads): refuse (default), restore from the aligned adapter or base, or keep")
    p.add_argument("--max-shard-bytes", type=int, help="dense output: tensor bytes per shard (default 5 GiB)")
    p.add_argument("--dry-run", action="store_true", default=None, help="print the plan; write nothing")
    p.add_argument("--quiet", action="store_true", default=None,
                   help="no progress bars, and only the summary, not the per-module table")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing OUT (only an earlier nlsr_fast output, unless --force) and a leftover "
                   "OUT.partial")
    p.add_argument("--force", action="store_true", default=None,
                   help="with --overwrite, replace OUT even when it is not an nlsr_fast output (no manifest.json)")
    p.add_argument("--wait", action="store_true", default=None,
                   help="if another run holds OUT's lock (OUT.lock), wait for it instead of failing")
    p.add_argument("-v", "--verbose", action="store_true", help="info logs and tracebacks on errors")


def _add_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="check a realign output against its manifest, report, masks and (optionally) its inputs",
        description="Check OUT: every file against manifest.json (sha256), report.json and masks.safetensors against "
        "the weights; with the inputs, that restored entries equal the reference and everything else equals the "
        "fine-tuned input bit for bit. Exit 0 when every check passes, 1 when one fails, 2 on bad input.",
    )
    p.add_argument("out", help="the output folder of nlsr-fast realign")
    p.add_argument("--base", metavar="DIR|ID", help="the base checkpoint (dense mode: recompute the reference)")
    p.add_argument("--aligned", metavar="DIR|ID", help="the aligned input (recompute the reference from it)")
    p.add_argument("--finetuned", metavar="DIR|ID", help="the fine-tuned input (unrestored weights must equal it)")
    p.add_argument("--reference", metavar="DIR|ID", help="the reference the run used, if it was given one")
    p.add_argument("--unaligned", metavar="DIR|ID", help="the unaligned model a resta run was given, if any")
    p.add_argument("-v", "--verbose", action="store_true", help="info logs and tracebacks on errors")


def _add_eval(sub: Any) -> None:
    from nlsr_fast import evaluation

    p = sub.add_parser(
        "eval",
        help="greedy answers to harmful prompts (refuses / degenerate / answers) and task accuracy, with intervals",
        description=(evaluation.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluation.add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")


def _verify(args: argparse.Namespace) -> int:
    from nlsr_fast.io.hub import resolve
    from nlsr_fast.verify import verify_summary

    found = {role: resolve(spec, f"--{role}").path if spec is not None else None
             for role, spec in (("base", args.base), ("aligned", args.aligned), ("finetuned", args.finetuned),
                                ("reference", args.reference), ("unaligned", args.unaligned))}  # folders, or Hub ids
    problems, checked = verify_summary(args.out, **found)
    if problems:
        for problem in problems:
            print(f"FAIL: {problem}")
        print(f"nlsr-fast verify: {len(problems)} problem(s) in {args.out}", file=sys.stderr)
        return 1
    print(f"OK: {args.out}: {'; '.join(checked)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (realign, verify, eval, demo, bench)."""
    parser = argparse.ArgumentParser(prog="nlsr-fast", description="Neuron-level safety realignment of LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_realign(sub)
    _add_verify(sub)
    _add_eval(sub)
    sub.add_parser("demo", help="end-to-end demo on a tiny model (nlsr_fast.demo)", add_help=False)
    sub.add_parser("bench", help="benchmarks (python -m nlsr_fast.bench)", add_help=False)
    return parser


#: The width the CLI reference (docs/cli.md) is rendered at, and the Python whose argparse rendered it.
REFERENCE_COLUMNS = 100
REFERENCE_PYTHON = (3, 11)


def cli_reference() -> str:
    """docs/cli.md: every command's --help, as argparse prints it at REFERENCE_COLUMNS columns (a test compares the
    page with this, so the reference cannot drift from the code)."""
    import nlsr_fast.demo as demo

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(REFERENCE_COLUMNS)
    try:
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        helps = {name: sub.choices[name].format_help() for name in ("realign", "verify", "eval")}
        helps["demo"] = _demo_parser(demo.add_arguments, demo.__doc__).format_help()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    version = ".".join(map(str, REFERENCE_PYTHON))
    lines = ["# Command-line reference", "",
             f"Every command's `--help`, as it prints (argparse of Python {version}, {REFERENCE_COLUMNS} columns). "
             "The options of `nlsr-fast realign` are the same in Python (`nlsr_fast.realign(..., name=value)`) and "
             "in a `--config` YAML file; `nlsr-fast bench` is `python -m nlsr_fast.bench` "
             "([benchmarks](benchmarks.md)).", ""]
    for name, text in helps.items():
        lines += [f"## nlsr-fast {name}", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(lines)


def load_yaml_options(path: str | Path) -> dict[str, Any]:
    """Option values from a YAML mapping; keys may use - or _; unknown keys raise ValueError naming them."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: bad YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in fields(RealignConfig)} | set(_EXTRA_KEYS)
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k for k in out if k not in known)
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    types = {f.name: str(f.type) for f in fields(RealignConfig)}
    types.update({k: "path | None" for k in _PATH_KEYS})
    types.update({k: "bool" for k in _SWITCH_KEYS})
    for key, value in out.items():
        problem = _type_problem(value, types[key])
        if problem:
            raise ValueError(f"--config {path}: {key} must be {problem}, got {value!r}")
    return out


def _type_problem(value: Any, annotation: str) -> str | None:
    """What `value` should have been for a field annotated `annotation` ("float | None", ...); None when it fits or
    the annotation is not a simple one (RealignConfig checks the rest)."""
    parts = {p.strip() for p in annotation.split("|")}
    nullable = "None" in parts
    parts.discard("None")
    if nullable and value is None:
        return None
    kinds: dict[str, tuple[str, Any]] = {
        "bool": ("true or false", lambda v: isinstance(v, bool)),
        "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
        "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
        "str": ("a string", lambda v: isinstance(v, str)),
        "path": ("a path string", lambda v: isinstance(v, str) and v != ""),
    }
    if len(parts) != 1 or next(iter(parts)) not in kinds:
        return None
    what, fits = kinds[next(iter(parts))]
    if fits(value):
        return None
    return f"{what} or null" if nullable and what != "a path string" else what


def _realign(args: argparse.Namespace) -> int:
    from nlsr_fast.api import realign_with_config

    values: dict[str, Any] = load_yaml_options(args.config) if args.config else {}
    from_yaml = set(values)
    flags = vars(args)
    for key in [f.name for f in fields(RealignConfig)] + list(_EXTRA_KEYS):
        if flags.get(key) is not None:
            values[key] = flags[key]
            from_yaml.discard(key)
    paths = {key: values.pop(key, None) for key in _PATH_KEYS}
    switches = {key: bool(values.pop(key, False)) for key in _SWITCH_KEYS}
    try:
        config = RealignConfig(**values)
    except ValueError as exc:
        # Name the YAML file when the bad value came from it ("seed must be ...", "device 'x': ...").
        msg = str(exc)
        culprit = next((k for k in sorted(from_yaml) if msg.startswith((f"{k} ", f"{k}="))), None)
        if culprit is not None:
            raise ValueError(f"--config {args.config}: {msg}") from None
        raise
    kwargs: dict[str, Any] = dict(paths, **switches)
    report = realign_with_config(config, args.base, args.aligned, args.finetuned, args.out, **kwargs)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        # --quiet keeps the summary and drops the per-module rows (560 at 70B); a dry run's plan is its whole point.
        print(report.summary() if switches["quiet"] and not report.dry_run else report.table())
    return 0


def _demo(argv: Sequence[str]) -> int:
    try:
        # import_module reads sys.modules (not the package attribute), so an absent demo is reported cleanly.
        demo = importlib.import_module("nlsr_fast.demo")
    except ImportError as exc:
        print(f"nlsr-fast demo: not available ({exc})", file=sys.stderr)
        return 2
    add_arguments, run = getattr(demo, "add_arguments", None), getattr(demo, "main", None)
    if add_arguments is None or run is None:
        print("nlsr-fast demo: not available (nlsr_fast.demo has no main/add_arguments)", file=sys.stderr)
        return 2
    return int(run(_demo_parser(add_arguments, demo.__doc__).parse_args(list(argv))))


def _demo_parser(add_arguments: Any, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `nlsr-fast demo` (its flags come from nlsr_fast.demo), as it runs and as docs/cli.md shows it."""
    parser = argparse.ArgumentParser(prog="nlsr-fast demo", description=(doc or "").strip() or None)
    add_arguments(parser)
    return parser


def _bench(argv: Sequence[str]) -> int:
    return subprocess.call([sys.executable, "-m", "nlsr_fast.bench", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 bad input, 1 other failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # demo and bench own their arguments: forward everything after the command name.
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    command = str(args.command)
    try:
        if command == "eval":
            from nlsr_fast.evaluation import run as run_eval

            return run_eval(args)
        return _verify(args) if command == "verify" else _realign(args)
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's status for SIGINT; atomic_output has already removed OUT.partial.
        if verbose:
            traceback.print_exc()
        print(f"nlsr-fast {command}: interrupted", file=sys.stderr)
        return 130
    except _INPUT_ERRORS as exc:
        if verbose:
            traceback.print_exc()
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same bad input: one line
            print(f"nlsr-fast {command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI reports every failure in one line
        if verbose:
            traceback.print_exc()
        print(f"nlsr-fast {command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
