"""`nlsr-fast verify OUT`: check a realign output against its manifest, its report, its masks and its inputs.

Checks, in order:
  1. manifest.json: every file present with its size and sha256, nothing added (io.manifest.check_manifest);
  2. report.json and masks.safetensors agree: every module of the report has its masks (and no mask is left over),
     with the recorded shapes and densities; each mask keeps exactly the count of its method's rule (per row, or
     per factor for low_rank, with the preset's offset: docs/algorithm.md §9.1); the restored flags agree with the
     counts, the adaptive draws, the threshold rule and the changed-entry counts;
  3. the weights agree with the report: the output holds every module of the report;
  4. with the fine-tuned input: every module not restored, and every other tensor, equals it bit for bit; in a
     restored module every entry outside the mask equals it, and the number of changed entries is the report's;
  5. with the reference (given, or recomputed from the aligned input with the report's alpha and preset): every
     masked entry of a restored module equals the reference, cast to the output's dtype.
LoRA mode (a PEFT adapter; masks `<module>.lora_A` / `.lora_B`) and dense mode (a checkpoint; masks `<module>` on
the weight `<module>.weight`), as report.json's "mode" says (LoRA when absent).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from nlsr_fast.ops import PackedMask

__all__ = ["verify", "verify_summary"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
_TOL = 1e-9


def verify(out: PathLike, *, base: PathLike | None = None, aligned: PathLike | None = None,
           finetuned: PathLike | None = None, reference: PathLike | None = None,
           unaligned: PathLike | None = None) -> list[str]:
    """The problems found in the realign output `out` (empty when every check passes).

    Args:
        out: the output folder.
        base: the base checkpoint (dense mode: to recompute the reference from a full aligned checkpoint).
        aligned: the aligned input: the reference is recomputed from it (alpha and preset from report.json).
        finetuned: the fine-tuned input: everything not restored must equal it bit for bit.
        reference: the ready reference the run was given, if any.
        unaligned: the unaligned model a resta run was given, if any (else the base stands for it).
    Raises:
        ValueError: `out` or a given input does not exist (bad input, not a failed check).
    """
    return verify_summary(out, base=base, aligned=aligned, finetuned=finetuned, reference=reference,
                          unaligned=unaligned)[0]


def verify_summary(out: PathLike, *, base: PathLike | None = None, aligned: PathLike | None = None,
                   finetuned: PathLike | None = None, reference: PathLike | None = None,
                   unaligned: PathLike | None = None) -> tuple[list[str], list[str]]:
    """(problems, what was checked): `verify` plus one line per check that ran, for the CLI's "OK: ..." line."""
    out_p = Path(out)
    if not out_p.is_dir():
        raise ValueError(f"output {out_p} is not a folder (or does not exist)")
    given = {"base": base, "aligned": aligned, "finetuned": finetuned, "reference": reference,
             "unaligned": unaligned}
    for role, path in given.items():
        if path is not None and not Path(path).exists():
            raise ValueError(f"--{role} {path} does not exist")
    from nlsr_fast.io.manifest import check_manifest, read_manifest

    problems: list[str] = []
    checked: list[str] = []
    manifest_problems = check_manifest(out_p)
    problems += manifest_problems
    if not manifest_problems:
        checked.append(f"manifest ({len(read_manifest(out_p)['files'])} files)")
    report = _load_report(out_p, problems)
    masks = _load_masks(out_p, problems)
    if report is None or masks is None:
        return problems, checked
    mode = report.get("mode", "lora")
    records = report.get("modules")
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                                for r in records):
        problems.append(f"{out_p / 'report.json'}: 'modules' is not a list of module records")
        return problems, checked
    if mode not in ("lora", "dense"):
        problems.append(f"{out_p / 'report.json'}: unknown mode {mode!r}")
        return problems, checked
    n_before = len(problems)
    _check_records(out_p, report, records, masks, mode, problems)
    if len(problems) == n_before:
        checked.append(f"report and masks agree ({len(records)} modules, "
                       f"{sum(bool(r.get('restored')) for r in records)} restored)")
    paths = {k: Path(v) for k, v in given.items() if v is not None}
    if mode == "lora":
        _check_lora(out_p, report, records, masks, paths, problems, checked)
    else:
        _check_dense(out_p, report, records, masks, paths, problems, checked)
    return problems, checked


# -- report and masks ---------------------------------------------------------------------------------------------

def _load_report(out: Path, problems: list[str]) -> dict[str, Any] | None:
    path = out / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{path}: missing")
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{path}: not readable JSON ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return data


def _load_masks(out: Path, problems: list[str]) -> dict[str, Any] | None:
    from nlsr_fast.ops import load_masks

    path = out / "masks.safetensors"
    if not path.is_file():
        problems.append(f"{path}: missing")
        return None
    try:
        return load_masks(path)
    except (ValueError, OSError) as exc:
        problems.append(f"{path}: {exc}")
        return None


def _section(report: dict[str, Any], key: str) -> dict[str, Any]:
    value = report.get(key)
    return value if isinstance(value, dict) else {}


def _mask_keys(name: str, mode: str) -> list[tuple[str, str]]:
    """[(mask name, record suffix)] of a module."""
    return [(f"{name}.lora_A", "a"), (f"{name}.lora_B", "b")] if mode == "lora" else [(name, "a")]


def _repair(report: dict[str, Any]) -> str:
    """What the run's method does to a chosen module (Method.repair): restore, prune or project."""
    from nlsr_fast import methods

    spec = methods.METHODS.get(str(_section(report, "config").get("method")))
    return spec.repair if spec is not None else "restore"


def _mask_rule(report: dict[str, Any]) -> tuple[str, str, float, int] | None:
    """(method, mask group, sparsity, entries fewer) of the run's masks, from its method's declaration (None when the
    report names no known method or sparsity). Group "all": every entry (a projected module is replaced whole);
    an antidote mask marks the top prune_ratio, so its sparsity is 1 - prune_ratio."""
    from nlsr_fast import methods

    cfg = _section(report, "config")
    name, sparsity, ratio = cfg.get("method"), cfg.get("sparsity"), cfg.get("prune_ratio")
    if name not in methods.METHODS:
        return None
    spec = methods.METHODS[name]
    if spec.repair == "add":  # resta: every entry of the change kept, or DARE's draw (checked by _check_dense)
        return (name, "all", 0.0, 0) if cfg.get("dare_rate") is None else None
    if spec.repair == "project":
        return name, "all", 0.0, 0
    if spec.share == "prune_ratio":
        sparsity = 1.0 - ratio if isinstance(ratio, (int, float)) and 0 <= ratio <= 1 else None
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
        return None
    fewer = int(_section(report, "preset").get("low_rank_count_offset") or 0) if spec.group == "matrix" else 0
    return name, spec.group, float(sparsity), fewer


def _count_problem(key: str, mask: Any, rule: tuple[str, str, float, int]) -> str | None:
    """Why `mask` breaks the count rule of its method, or None."""
    from nlsr_fast.ops import keep_count_for_sparsity

    method, group, sparsity, fewer = rule
    if group == "all":
        if mask.count() != mask.rows * mask.cols:
            return f"mask {key} marks {mask.count()} of {mask.rows * mask.cols} entries; {method} marks every entry"
        return None
    if group == "matrix":
        want, got = keep_count_for_sparsity(mask.rows * mask.cols, sparsity, fewer=fewer), mask.count()
        if got != want:
            return f"mask {key} keeps {got} entries; {method} at sparsity {sparsity} keeps {want}"
        return None
    want = keep_count_for_sparsity(mask.cols, sparsity)
    counts = mask.row_counts()
    bad = (counts != want).nonzero()
    if len(bad):
        row = int(bad[0])
        return (f"mask {key}: row {row} keeps {int(counts[row])} entries; {method} at sparsity {sparsity} "
                f"keeps {want} per row ({len(bad)} rows differ)")
    return None


def _check_records(out: Path, report: dict[str, Any], records: list[dict[str, Any]], masks: Mapping[str, Any],
                   mode: str, problems: list[str]) -> None:
    where = out / "report.json"
    rule = _mask_rule(report)
    names = [r["name"] for r in records]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"{where}: modules listed twice: {dupes[:5]}")
    expected: set[str] = set()
    cfg = _section(report, "config")
    for rec in records:
        name = rec["name"]
        for key, suffix in _mask_keys(name, mode):
            expected.add(key)
            if key not in masks:
                problems.append(f"module {name}: no mask {key!r} in masks.safetensors")
                continue
            mask = masks[key]
            shape = rec.get(f"shape_{suffix}")
            if shape and list(mask.shape) != list(shape):
                problems.append(f"module {name}: mask {key} has shape {list(mask.shape)}, report.json says {shape}")
            density = rec.get(f"density_{suffix}")
            if isinstance(density, (int, float)) and abs(mask.density() - density) > _TOL:
                problems.append(f"module {name}: mask {key} has density {mask.density():.6g}, report.json says "
                                f"{density:.6g}")
            broken = _count_problem(key, mask, rule) if rule is not None else None
            if broken is not None:
                problems.append(f"module {name}: {broken}")
        restored = rec.get("restored")
        if not isinstance(restored, bool):
            problems.append(f"module {name}: restored flag {restored!r} is not true or false")
            continue
        draw = rec.get("draw")
        if cfg.get("selection") == "adaptive" and draw is not None and bool(draw) != restored:
            problems.append(f"module {name}: adaptive draw {draw} but restored={restored}")
        tau, sim = cfg.get("tau"), rec.get("similarity")
        if cfg.get("selection") == "threshold" and isinstance(tau, (int, float)) and isinstance(sim, (int, float)):
            if (sim < tau) != restored:
                problems.append(f"module {name}: similarity {sim:.6g} vs tau {tau} but restored={restored}")
        if cfg.get("selection") == "all" and not restored:
            problems.append(f"module {name}: selection 'all' but restored={restored}")
        changed = sum(int(rec.get(f"changed_{s}") or 0) for s in "ab")
        if not restored and changed:
            problems.append(f"module {name}: not restored but report.json counts {changed} changed entries")
    if cfg.get("selection") == "count":
        _check_count_selection(records, cfg.get("count"), problems)
    extra = sorted(set(masks) - expected)
    if extra:
        problems.append(f"masks.safetensors holds masks of no module in report.json: {extra[:5]}")
    counts = _section(report, "counts")
    n_restored = sum(bool(r.get("restored")) for r in records)
    if "restored" in counts and counts["restored"] != n_restored:
        problems.append(f"{where}: counts.restored is {counts['restored']} but {n_restored} modules are marked "
                        "restored")
    if "modules" in counts and counts["modules"] != len(records):
        problems.append(f"{where}: counts.modules is {counts['modules']} but {len(records)} modules are listed")


def _check_count_selection(records: list[dict[str, Any]], count: Any, problems: list[str]) -> None:
    """selection 'count': min(count, N) modules repaired, and none of them more similar than one left alone."""
    chosen = [r for r in records if r.get("restored") is True]
    if isinstance(count, int) and len(chosen) != min(count, len(records)):
        problems.append(f"selection 'count' {count}: {len(chosen)} of {len(records)} modules repaired")
    sims = {r["name"]: float(r["similarity"]) for r in records if isinstance(r.get("similarity"), (int, float))}
    top = max((sims[r["name"]] for r in chosen if r["name"] in sims), default=None)
    low = min((sims[r["name"]] for r in records if r.get("restored") is False and r["name"] in sims), default=None)
    if top is not None and low is not None and top > low:
        problems.append(f"selection 'count': a repaired module has similarity {top:.6g}, above {low:.6g} of one "
                        "left alone")


# -- weights --------------------------------------------------------------------------------------------------------

def _differ(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean tensor: where the bits of x and y differ (same shape and dtype)."""
    if x.dtype.is_floating_point:
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return x.contiguous().view(int_dtype) != y.contiguous().view(int_dtype)
    return x != y


def _compare(label: str, out_t: torch.Tensor, ft_t: torch.Tensor | None, ref_t: torch.Tensor | None, mask: Any,
             restored: bool, changed: int | None, problems: list[str], *, ref_ulp: bool = False) -> None:
    """Compare one output tensor with the fine-tuned one (everything outside the restored mask) and the reference
    (inside it). `ref_ulp`: accept a masked entry within one unit in the last place of the output's dtype of the
    fp32 reference (a recomputed dense reference: another backend may round the fp32 extrapolation differently)."""
    if ft_t is not None:
        if tuple(out_t.shape) != tuple(ft_t.shape) or out_t.dtype != ft_t.dtype:
            problems.append(f"{label}: shape {list(out_t.shape)} {out_t.dtype}, the fine-tuned input has "
                            f"{list(ft_t.shape)} {ft_t.dtype}")
            return
        diff = _differ(out_t, ft_t)
        if not restored:
            n = int(diff.sum())
            if n:
                problems.append(f"{label}: {n} entries differ from the fine-tuned input though the module was not "
                                "restored")
            return
        bool_mask = mask.to_bool().reshape(out_t.shape)
        outside = int((diff & ~bool_mask).sum())
        if outside:
            problems.append(f"{label}: {outside} entries outside the mask differ from the fine-tuned input")
        if changed is not None and int(diff.sum()) != changed:
            problems.append(f"{label}: {int(diff.sum())} entries differ from the fine-tuned input, report.json says "
                            f"{changed}")
    if ref_t is not None and restored:
        if tuple(ref_t.shape) != tuple(out_t.shape):
            problems.append(f"{label}: the reference has shape {list(ref_t.shape)}, the output {list(out_t.shape)}")
            return
        bool_mask = mask.to_bool().reshape(out_t.shape)
        wrong = _differ(out_t, ref_t.to(out_t.dtype)) & bool_mask
        if ref_ulp and out_t.dtype.is_floating_point and bool(wrong.any()):
            ref32 = ref_t.float()
            ulp = torch.finfo(out_t.dtype).eps * ref32.abs() + torch.finfo(out_t.dtype).tiny
            wrong &= (out_t.float() - ref32).abs() > ulp
        inside = int(wrong.sum())
        if inside:
            problems.append(f"{label}: {inside} masked entries differ from the reference")


def _check_finite(report: dict[str, Any], tensors: Any, problems: list[str], checked: list[str]) -> None:
    """Unless the run allowed non-finite inputs (config.allow_nonfinite), every output tensor must be finite."""
    from nlsr_fast.io.finite import first_nonfinite

    if _section(report, "config").get("allow_nonfinite") is True:
        checked.append("non-finite values NOT checked: the run allowed them (report.json lists the inputs' ones)")
        return
    n_before, n = len(problems), 0
    for key, t in tensors:
        n += 1
        found = first_nonfinite(t)
        if found is not None:
            index, value, count = found
            problems.append(f"tensor {key}: {count} non-finite value(s), the first at flat index {index} ({value}); "
                            "the run did not allow non-finite inputs")
    if len(problems) == n_before:
        checked.append(f"all {n} output tensors finite")


def _extra_actions(report: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for rec in report.get("extra_tensors") or []:
        if isinstance(rec, dict) and isinstance(rec.get("tensor"), str):
            out[rec["tensor"]] = str(rec.get("action", ""))
    return out


def _preset_and_alpha(report: dict[str, Any]) -> tuple[Any, float] | None:
    from nlsr_fast.config import PRESETS, Preset

    cfg = _section(report, "config")
    alpha = cfg.get("alpha")
    preset: Any = None
    fields = report.get("preset")
    if isinstance(fields, dict):
        try:
            preset = Preset(**fields)
        except (TypeError, ValueError):
            preset = None
    if preset is None and cfg.get("preset") in PRESETS:
        preset = PRESETS[cfg["preset"]]
    if preset is None or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    return preset, float(alpha)


def _used_reference(report: dict[str, Any]) -> bool:
    inputs = _section(report, "inputs")
    ref = inputs.get("reference")
    return bool(ref) and (not isinstance(ref, dict) or bool(ref.get("path")))


def _reference_source(report: dict[str, Any], paths: Mapping[str, Path], checked: list[str]) -> str | None:
    """"reference", "aligned" or None (with a note in `checked` saying why the values are not compared)."""
    if "reference" in paths:
        return "reference"
    if "aligned" in paths:
        if _used_reference(report):
            checked.append("restored values NOT checked: the run was given a ready reference; pass --reference")
            return None
        if _preset_and_alpha(report) is None:
            checked.append("restored values NOT checked: report.json lacks alpha or the preset")
            return None
        return "aligned"
    return None


def _check_lora(out: Path, report: dict[str, Any], records: list[dict[str, Any]], masks: Mapping[str, Any],
                paths: Mapping[str, Path], problems: list[str], checked: list[str]) -> None:
    from nlsr_fast.io import LoraAdapter

    try:
        out_ad = LoraAdapter.load(out)
    except (ValueError, OSError, KeyError) as exc:
        problems.append(f"{out}: not a readable LoRA adapter ({exc})")
        return
    names = [r["name"] for r in records]
    missing = [n for n in names if n not in out_ad]
    if missing:
        problems.append(f"{out}: report.json's module {missing[0]} is not in the adapter ({len(missing)} missing)")
    unlisted = [n for n in out_ad.modules if n not in set(names)]
    if unlisted:
        problems.append(f"{out}: the adapter's module {unlisted[0]} is not in report.json ({len(unlisted)} unlisted)")
    if missing or unlisted:
        return
    _check_finite(report, ((k, out_ad.raw(k)) for k in out_ad.raw_keys), problems, checked)
    ft = LoraAdapter.load(paths["finetuned"]) if "finetuned" in paths else None
    repair = _repair(report)
    source = _reference_source(report, paths, checked) if repair == "restore" else None
    projector = _lora_projector(paths, ft, checked) if repair == "project" else None
    ref_ad = None
    if source is not None:
        ref_ad = LoraAdapter.load(paths[source])
        for n in names:
            if n not in ref_ad:
                problems.append(f"the {source} input {paths[source]} has no module {n}")
                return
    amplify_args = _preset_and_alpha(report) if source == "aligned" else None
    n_before = len(problems)
    if ft is not None:
        if sorted(ft.raw_keys) != sorted(out_ad.raw_keys):
            only_out = sorted(set(out_ad.raw_keys) - set(ft.raw_keys))
            only_ft = sorted(set(ft.raw_keys) - set(out_ad.raw_keys))
            problems.append(f"{out}: tensors differ from the fine-tuned input's: only in the output {only_out[:3]}, "
                            f"only in the input {only_ft[:3]}")
            return
    for rec in records:
        name, restored = rec["name"], bool(rec.get("restored"))
        if ft is None and ((ref_ad is None and repair == "restore") or not restored):
            continue
        a_o, b_o = out_ad.factors(name)
        a_t, b_t = ft.factors(name) if ft is not None else (None, None)
        a_e = b_e = None
        if repair == "prune" and restored:
            a_e, b_e = torch.zeros(a_o.shape), torch.zeros(b_o.shape)
        elif projector is not None and restored:
            a_e, b_e = projector(name)
        elif ref_ad is not None and restored:
            a_e, b_e = ref_ad.factors(name)
            if amplify_args is not None:
                from nlsr_fast.pipeline.amplify import amplify

                a_e, b_e = amplify({name: (a_e, b_e)}, amplify_args[1], amplify_args[0])[name]
            else:
                a_e, b_e = a_e.float(), b_e.float()
        _compare(f"module {name}: lora_A", a_o, a_t, a_e, masks[f"{name}.lora_A"], restored,
                 rec.get("changed_a") if isinstance(rec.get("changed_a"), int) else None, problems,
                 ref_ulp=projector is not None)
        _compare(f"module {name}: lora_B", b_o, b_t, b_e, masks[f"{name}.lora_B"], restored,
                 rec.get("changed_b") if isinstance(rec.get("changed_b"), int) else None, problems)
    _check_lora_extras(out_ad, ft, names, report, paths, problems, checked)
    if ft is not None and len(problems) == n_before:
        checked.append("unrestored weights equal the fine-tuned input bit for bit")
    if len(problems) == n_before:
        how = "the given reference" if source == "reference" else "the reference recomputed from the aligned adapter"
        _say_repair_checked(repair, f"restored entries equal {how}" if ref_ad is not None else None,
                            projector is not None, checked)
    out_ad.close()
    if ft is not None:
        ft.close()
    if ref_ad is not None:
        ref_ad.close()


def _resta_reference(report: dict[str, Any], paths: Mapping[str, Path], model: Callable[[str], Any], base_ck: Any,
                     ft: Any, masks: Mapping[str, Any], checked: list[str],
                     problems: list[str]) -> Callable[[str], torch.Tensor] | None:
    """resta: weight key -> theta (fp32) recomputed from the inputs, after checking DARE's masks are its draw."""
    from nlsr_fast.methods.resta import combine, dare_keep

    cfg = _section(report, "config")
    beta, rate, seed = cfg.get("beta"), cfg.get("dare_rate"), cfg.get("seed")
    if rate is not None and isinstance(seed, int):
        drawn = [n for n, m in masks.items() if not m.equal(PackedMask.from_bool(dare_keep(m.shape, rate, seed, n)))]
        if drawn:
            problems.append(f"mask {drawn[0]}: not DARE's draw at rate {rate}, seed {seed} ({len(drawn)} differ)")
    al_model = model("aligned")
    un_model = model("unaligned") if "unaligned" in paths else None
    if "unaligned" in _section(report, "inputs") and un_model is None:
        checked.append("resta's weights NOT checked: the run was given an unaligned model; pass --unaligned")
        return None
    if ft is None or al_model is None or base_ck is None or not isinstance(beta, (int, float)):
        checked.append("resta's weights NOT checked: pass --base, --aligned and --finetuned")
        return None
    base_reader, ft_model, aligned_reader = base_ck, ft, al_model

    def reference(key: str) -> torch.Tensor:
        w_0 = base_reader.get(key)
        keep = masks[key[: -len(".weight")]].to_bool() if rate is not None else None
        return combine(ft_model(key), aligned_reader(key), un_model(key) if un_model is not None else w_0,
                       beta=float(beta), keep=keep, rate=float(rate or 0.0))

    return reference


def _say_repair_checked(repair: str, restored_note: str | None, projected: bool, checked: list[str]) -> None:
    """What the weight check found true of the repaired modules (`restored_note`: for a restore, when checked)."""
    if repair == "prune":
        checked.append("pruned entries are zero")
    elif repair == "project" and projected:
        checked.append("repaired modules equal W_a + C dW recomputed from the inputs (within one unit in the last "
                       "place)")
    elif repair == "add" and projected:
        checked.append("every module equals theta_ft + beta (theta_aligned - theta_unaligned) recomputed from the "
                       "inputs (within one unit in the last place)")
    elif repair == "restore" and restored_note is not None:
        checked.append(restored_note)


def _lora_projector(paths: Mapping[str, Path], ft: Any,
                    checked: list[str]) -> Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None:
    """safelora: module -> (its output A in fp64, the aligned B) recomputed from the aligned and fine-tuned adapters."""
    from nlsr_fast.io import LoraAdapter
    from nlsr_fast.methods.safelora import lora_projection

    if ft is None or "aligned" not in paths:
        checked.append("projected modules NOT checked: pass --aligned and --finetuned")
        return None
    aligned = LoraAdapter.load(paths["aligned"])

    def project(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a_a, b_a = aligned.factors(name)
        new_a, _ = lora_projection(name, (a_a.float(), b_a.float()), aligned.scale(name), ft.factors(name),
                                   ft.scale(name))
        return new_a, b_a.float()

    return project


def _check_lora_extras(out_ad: Any, ft: Any, names: list[str], report: dict[str, Any], paths: Mapping[str, Path],
                       problems: list[str], checked: list[str]) -> None:
    """The output's non-LoRA tensors (modules_to_save heads, others): each listed in report.json; a kept one equals
    the fine-tuned input, a replaced one the aligned adapter's copy or else the base's tensor (as realign picks)."""
    from nlsr_fast.io import CheckpointReader, LoraAdapter
    from nlsr_fast.lora import base_key_of_extra

    module_keys = {k for n in names for k in (out_ad.key_a(n), out_ad.key_b(n))}
    extras = [k for k in out_ad.raw_keys if k not in module_keys]
    if not extras:
        return
    actions = _extra_actions(report)
    aligned = LoraAdapter.load(paths["aligned"]) if "aligned" in paths else None
    base = CheckpointReader(paths["base"]) if "base" in paths else None
    n_before, compared = len(problems), 0
    for key in extras:
        action = actions.get(key)
        out_t = out_ad.raw(key)
        if action is None:
            problems.append(f"tensor {key}: a non-LoRA tensor in the output that report.json does not list "
                            "(copied silently)")
            continue
        if action.startswith("kept"):
            want, what = (ft.raw(key) if ft is not None and key in ft.raw_keys else None), "the fine-tuned input"
        else:
            want, what = None, "its replacement"
            if aligned is not None and key in aligned.raw_keys:
                want, what = aligned.raw(key), f"the aligned adapter's {key}"
            elif base is not None and base_key_of_extra(key) in base:
                want, what = base.get(base_key_of_extra(key)), f"the base's {base_key_of_extra(key)}"
            if want is not None:
                want = want.to(out_t.dtype)
        if want is None:
            continue
        compared += 1
        if tuple(want.shape) != tuple(out_t.shape) or out_t.dtype != want.dtype or bool(_differ(out_t, want).any()):
            problems.append(f"tensor {key}: differs from {what} (report.json: {action!r})")
    if compared and len(problems) == n_before:
        checked.append(f"{compared} non-LoRA tensor(s) equal what report.json says was done with them")
    if aligned is not None:
        aligned.close()


def _check_dense(out: Path, report: dict[str, Any], records: list[dict[str, Any]], masks: Mapping[str, Any],
                 paths: Mapping[str, Path], problems: list[str], checked: list[str]) -> None:
    from nlsr_fast.io import CheckpointReader

    try:
        out_ck = CheckpointReader(out)
    except (ValueError, OSError) as exc:
        problems.append(f"{out}: not a readable checkpoint ({exc})")
        return
    names = [r["name"] for r in records]
    _check_finite(report, ((k, out_ck.get(k)) for k in out_ck.keys()), problems, checked)
    missing = [n for n in names if f"{n}.weight" not in out_ck]
    if missing:
        problems.append(f"{out}: report.json's module {missing[0]} has no weight {missing[0]}.weight in the "
                        f"checkpoint ({len(missing)} missing)")
        return

    base_ck = CheckpointReader(paths["base"]) if "base" in paths else None

    def model(role: str) -> Callable[[str], torch.Tensor] | None:
        """A reader of full weights for the input `role`: a checkpoint, or an adapter merged on the base."""
        if role not in paths:
            return None
        folder = paths[role]
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            if base_ck is None:
                checked.append(f"--{role} is an adapter: it is merged on the base, so pass --base too; skipped")
                return None
            from nlsr_fast.dense import DenseInput
            from nlsr_fast.io import LoraAdapter
            from nlsr_fast.io.finite import NonFinite

            merged = DenseInput(role, LoraAdapter.load(folder), base_ck, NonFinite(True))
            return merged.read
        reader = CheckpointReader(folder)
        return reader.get

    ft = model("finetuned")
    ft_keys: list[str] | None = None
    if ft is not None:
        folder = paths["finetuned"]
        adapter_ft = (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()
        ft_keys = base_ck.keys() if adapter_ft and base_ck is not None else CheckpointReader(folder).keys()
    reference: Callable[[str], torch.Tensor] | None = None
    recomputed = False
    repair = _repair(report)
    if repair == "prune":
        def reference(key: str) -> torch.Tensor:
            return torch.zeros(out_ck.shape(key))
    elif repair == "add":
        reference = _resta_reference(report, paths, model, base_ck, ft, masks, checked, problems)
        recomputed = reference is not None
    elif repair == "project":
        al_model = model("aligned")
        if ft is None or al_model is None or base_ck is None:
            checked.append("projected modules NOT checked: pass --base, --aligned and --finetuned")
        else:
            from nlsr_fast.dense import aligned_change
            from nlsr_fast.io import LoraAdapter
            from nlsr_fast.methods.safelora import dense_lowrank_projection, dense_lowrank_weight, dense_projection

            recomputed, ft_model, al_reader, base_reader = True, ft, al_model, base_ck
            folder = paths["aligned"]
            al_adapter = LoraAdapter.load(folder) if (folder / "adapter_config.json").is_file() else None

            def reference(key: str) -> torch.Tensor:
                factors = aligned_change(al_adapter, key[: -len(".weight")])
                if factors is not None:  # the run projected on the adapter's rank-r change: W_0 + left @ Q, as here
                    q, _ = dense_lowrank_projection(key, *factors, al_reader(key), ft_model(key))
                    return dense_lowrank_weight(base_reader.get(key), factors[0], q)
                return dense_projection(key, al_reader(key), base_reader.get(key), ft_model(key))[0]
    elif "reference" in paths:
        ref_model = model("reference")
        if ref_model is not None:
            def reference(key: str) -> torch.Tensor:
                return ref_model(key).float()
    elif "aligned" in paths:
        if _used_reference(report):
            checked.append("restored values NOT checked: the run was given a ready reference; pass --reference")
        elif base_ck is None:
            checked.append("restored values NOT checked: recomputing a dense reference needs --base too")
        else:
            al_model, pa = model("aligned"), _preset_and_alpha(report)
            if al_model is not None and pa is not None:
                alpha, base_reader, recomputed = pa[1], base_ck, True

                def reference(key: str) -> torch.Tensor:
                    from nlsr_fast.ops import extrapolate

                    w_a, w_0 = al_model(key), base_reader.get(key)
                    return extrapolate(w_a, w_0, alpha, out=torch.empty(w_a.shape, dtype=torch.float32))
    n_before = len(problems)
    targets = set()
    for rec in records:
        name, restored = rec["name"], bool(rec.get("restored"))
        key = f"{name}.weight"
        targets.add(key)
        if ft is None and (reference is None or not restored):
            continue
        w_o = out_ck.get(key)
        w_t = ft(key) if ft is not None else None
        w_e = reference(key) if reference is not None and restored else None
        changed = rec.get("changed_a") if isinstance(rec.get("changed_a"), int) else None
        mask = masks[name] if repair != "add" else PackedMask.ones(tuple(w_o.shape))  # resta changes every entry
        _compare(f"module {name}", w_o, w_t, w_e, mask, restored, changed, problems, ref_ulp=recomputed)
    if ft is not None and ft_keys is not None:
        if sorted(ft_keys) != sorted(out_ck.keys()):
            problems.append(f"{out}: tensor names differ from the fine-tuned input's")
        else:
            for key in ft_keys:
                if key in targets:
                    continue
                a, b = out_ck.get(key), ft(key)
                if a.dtype != b.dtype or a.shape != b.shape or bool(_differ(a, b).any()):
                    problems.append(f"tensor {key}: differs from the fine-tuned input (not a restored target)")
        if len(problems) == n_before:
            checked.append("unrestored weights equal the fine-tuned input bit for bit")
    if reference is not None and len(problems) == n_before:
        _say_repair_checked(repair, "restored entries equal the reference", recomputed, checked)
