"""LoRA space: the executor's view of realignment on PEFT adapters (docs/algorithm.md §2-§6, LoRA mode).

A module is one adapted linear; its tensors are the fine-tuned factors (A_t, B_t) and the reference factors
(A_e, B_e), the amplified aligned adapter or a ready reference adapter. Every stage is the in-memory stage
function (nlsr_fast.pipeline) called on a one-module dict, so streaming and in-memory runs share one code path.
The output adapter is planned from the fine-tuned adapter's header and written slot by slot.
"""

from __future__ import annotations

import logging
import re
from typing import Any, NamedTuple

import torch

from nlsr_fast import methods
from nlsr_fast.config import Preset
from nlsr_fast.io import LoraAdapter
from nlsr_fast.io.finite import NonFinite
from nlsr_fast.io.stream import PlannedSafetensors, read_tensor
from nlsr_fast.ops import PackedMask
from nlsr_fast.pipeline.amplify import amplification, scaled
from nlsr_fast.pipeline.restore import masked_values, put_masked_values
from nlsr_fast.pipeline.score import masks_from_statistics
from nlsr_fast.pipeline.similarity import similarity

__all__ = ["EXTRA_POLICIES", "LoraSpace", "base_key_of_extra", "lora_mask_keys", "read_raw"]

log = logging.getLogger(__name__)

#: What happens to a non-LoRA tensor of the fine-tuned adapter (a `modules_to_save` head, say).
EXTRA_POLICIES = ("refuse", "restore", "keep")

_SAVED_WRAPPER = re.compile(r"\.(modules_to_save|original_module)(\.[^.]+)?(?=\.)")


class Reference(NamedTuple):
    """A module's reference: `scale` times each stored factor, in fp32 (docs/algorithm.md §2).

    Kept as stored so that no fp32 copy of the adapter is made: the similarity kernel applies the scale as it reads
    the factors, and restoration scales the masked entries only; both give the bits of `fp32()`.
    """

    a: torch.Tensor  # A (r, d_in), stored dtype, on the device
    b: torch.Tensor  # B (d_out, r)
    scale: float  # the amplification factor; 1.0 for a ready reference

    @property
    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a, self.b

    def fp32(self) -> tuple[torch.Tensor, torch.Tensor]:
        return scaled(self.a, self.scale), scaled(self.b, self.scale)


class LoraModuleTensors(NamedTuple):
    ft: tuple[torch.Tensor, torch.Tensor]  # A_t (r, d_in), B_t (d_out, r), stored dtype, on the device
    ref: Reference


def lora_mask_keys(name: str) -> tuple[str, str]:
    """Keys of a module's masks in masks.safetensors."""
    return f"{name}.lora_A", f"{name}.lora_B"


def read_raw(adapter: LoraAdapter, key: str, nonfinite: NonFinite | None = None) -> torch.Tensor:
    """One stored tensor of an adapter, read into private memory and checked by the non-finite policy."""
    t = adapter.raw(key).clone() if adapter.is_pickle else read_tensor(adapter.raw_info(key))
    if nonfinite is not None:
        nonfinite.check(t, file=adapter.weights_file, tensor=key)
    return t


def base_key_of_extra(key: str) -> str:
    """The base checkpoint's name of a non-LoRA adapter tensor (PEFT's prefix and modules_to_save wrapper off)."""
    name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    return _SAVED_WRAPPER.sub("", name)


class LoraSpace:
    """Modules of a fine-tuned adapter against a reference made from the aligned (or a given reference) adapter.

    Args:
        ft: the fine-tuned adapter.
        source: the aligned adapter (amplified here) or, with `amplify_alpha=None`, a ready reference adapter.
        preset: the run's preset.
        amplify_alpha: alpha of the amplification, or None when `source` is the reference itself.
        method: the score method; `random` masks are drawn here, the others come precomputed.
        sparsity, seed, backend, device: as in RealignConfig.
        nonfinite: the non-finite policy applied to every tensor read.
        out: the planned adapter_model.safetensors of the output (None for scoring only).
        extras: {raw key: (action, replacement tensor or None)} for the non-LoRA tensors (see `plan_extras`).
    """

    def __init__(self, ft: LoraAdapter, source: LoraAdapter, *, preset: Preset, amplify_alpha: float | None,
                 method: str, sparsity: float, seed: int, backend: str | None, device: torch.device,
                 nonfinite: NonFinite, out: PlannedSafetensors | None = None,
                 extras: dict[str, tuple[str, torch.Tensor | None]] | None = None) -> None:
        self.ft, self.source, self.preset = ft, source, preset
        self.method, self.sparsity, self.seed = method, sparsity, seed
        self.backend, self.device = backend, device
        self.nonfinite = nonfinite
        self.out = out
        self.extras = extras or {}
        self.modules: list[str] = ft.modules
        self.spec = methods.get(method, "lora")
        self.ref_scale = 1.0 if amplify_alpha is None else amplification(amplify_alpha, preset)
        self._projected: dict[str, torch.Tensor] = {}  # safelora: a module's output A, from pass 1's similarity

    def mask_keys(self, name: str) -> tuple[str, str]:
        return lora_mask_keys(name)

    # -- inputs ---------------------------------------------------------------------------------------------------
    def reference(self, name: str, raw: tuple[torch.Tensor, torch.Tensor]) -> Reference:
        """The reference of `name` from the source's stored factors (on the device, not yet scaled)."""
        a, b = self._oriented(self.source, name, raw)
        return Reference(a.to(self.device), b.to(self.device), self.ref_scale)

    def read_reference(self, name: str) -> Reference:
        src = self.source.module(name)
        return self.reference(name, (read_raw(self.source, src.key_a, self.nonfinite),
                                     read_raw(self.source, src.key_b, self.nonfinite)))

    def load_reference(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A_e, B_e of `name` in fp32, on the device."""
        return self.read_reference(name).fp32()

    def load_finetuned(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A_t, B_t (stored dtype, on the device) of `name`, read and checked."""
        m = self.ft.module(name)
        raw_t = (read_raw(self.ft, m.key_a, self.nonfinite), read_raw(self.ft, m.key_b, self.nonfinite))
        a_t, b_t = self._oriented(self.ft, name, raw_t)
        return a_t.to(self.device), b_t.to(self.device)

    def load(self, name: str) -> LoraModuleTensors:
        return LoraModuleTensors(self.load_finetuned(name), self.read_reference(name))

    @staticmethod
    def _oriented(adapter: LoraAdapter, name: str, raw: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        a, b = raw
        return (a.t(), b.t()) if adapter.module(name).transposed else (a, b)

    # -- stages ---------------------------------------------------------------------------------------------------
    def masks(self, name: str, loaded: LoraModuleTensors) -> dict[str, PackedMask]:
        if self.spec.needs_calibration:
            raise AssertionError(f"masks of method {self.method!r} are computed by calibration before pass 1")
        # Each mask has its own stream (seed, mask key): no other module is drawn, whatever the order or process.
        # A method without calibration draws its masks from the shapes (random, safelora): the stored factors serve.
        got = masks_from_statistics(self.method, {name: loaded.ref.stored}, sparsity=self.sparsity,
                                    preset=self.preset, seed=self.seed, backend=self.backend)[name]
        return dict(zip(lora_mask_keys(name), got, strict=True))

    def similarity(self, name: str, loaded: LoraModuleTensors, masks: dict[str, PackedMask]) -> float:
        if self.spec.repair == "project":  # safelora: the reference is the aligned adapter itself
            from nlsr_fast.methods.safelora import lora_projection

            self._projected[name], cos = lora_projection(name, loaded.ref.fp32(), self.source.scale(name),
                                                         loaded.ft, self.ft.scale(name))
            return cos
        key_a, key_b = lora_mask_keys(name)
        return similarity({name: loaded.ft}, {name: loaded.ref.stored}, {name: (masks[key_a], masks[key_b])},
                          ref_scale=loaded.ref.scale, backend=self.backend, warn=False)[name]

    def restore_values(self, name: str, loaded: LoraModuleTensors,
                       masks: dict[str, PackedMask]) -> dict[str, torch.Tensor]:
        """What the repair puts under each mask, cast to the fine-tuned dtype: the reference's entries (restore),
        the projected module's whole factors (project: the new A, and the aligned B); nothing for prune (zeros)."""
        if self.spec.repair == "prune":
            return {}
        key_a, key_b = lora_mask_keys(name)
        if self.spec.repair == "project":
            a_t, b_t = loaded.ft
            return {key_a: self._projected.pop(name).to(a_t.dtype).reshape(-1),
                    key_b: scaled(loaded.ref.b, loaded.ref.scale).to(b_t.dtype).reshape(-1)}
        # The stored entries under the mask, then scaled and cast: elementwise, the bits of fp32() cast and gathered.
        return {key: scaled(masked_values(e, masks[key], backend=self.backend), loaded.ref.scale).to(t.dtype)
                for key, t, e in zip((key_a, key_b), loaded.ft, loaded.ref.stored, strict=True)}

    # -- file order (pass 1 reads in it) and pass 2: the output adapter ------------------------------------------
    def file_order(self, items: list[str]) -> list[str]:
        """Modules (by their A factor) and non-LoRA tensors (by key) in the fine-tuned file's order."""
        if self.ft.is_pickle:
            return list(items)
        return sorted(items, key=lambda i: self.ft.raw_info(i if i in self.extras else self.ft.module(i).key_a).start)

    def output_items(self, modules: list[str], rest: bool) -> list[str]:
        return self.file_order(list(modules) + (list(self.extras) if rest else []))

    def load_output(self, item: str, restored: bool = False) -> Any:
        if item in self.extras:
            replacement = self.extras[item][1]
            return replacement if replacement is not None else read_raw(self.ft, item, self.nonfinite)
        m = self.ft.module(item)  # checked for non-finite values in pass 1
        return read_raw(self.ft, m.key_a), read_raw(self.ft, m.key_b)

    def write_output(self, item: str, loaded: Any, masks: dict[str, PackedMask] | None,
                     values: dict[str, torch.Tensor] | None) -> dict[str, int]:
        assert self.out is not None
        if item in self.extras:
            self.out.write(item, loaded)
            return {}
        m = self.ft.module(item)
        if masks is None or values is None:
            self.out.write(m.key_a, loaded[0])
            self.out.write(m.key_b, loaded[1])
            return {}
        changed = {}
        new = []
        for key, t in zip(lora_mask_keys(item), self._oriented(self.ft, item, loaded), strict=True):
            value = values.get(key)
            if value is None:  # prune: the masked entries become zero
                value = t.new_zeros(masks[key].count())
            restored, changed[key] = put_masked_values(t, masks[key], value, backend=self.backend)
            new.append(restored)
        for key, t in self.ft.to_raw(item, *new).items():
            self.out.write(key, t)
        return changed


def plan_extras(ft: LoraAdapter, aligned: LoraAdapter, base: Any, policy: str,
                nonfinite: NonFinite) -> tuple[dict[str, tuple[str, torch.Tensor | None]], list[dict[str, Any]]]:
    """What to do with each non-LoRA tensor of the fine-tuned adapter, decided before any computation.

    `refuse` raises naming them; `keep` copies them (reported); `restore` replaces each with the aligned adapter's
    copy, or the base model's tensor when the aligned adapter has none (a head trained by the fine-tune is where
    an attacker can hide, so it goes back to the safety model's).

    Returns:
        ({raw key: (action, replacement or None)}, report records).
    """
    if policy not in EXTRA_POLICIES:
        raise ValueError(f"extra_tensors must be one of {list(EXTRA_POLICIES)}, got {policy!r}")
    keys = list(ft.extra_keys)
    if not keys:
        return {}, []
    if policy == "refuse":
        raise ValueError(
            f"{ft.weights_file}: {len(keys)} non-LoRA tensor(s) (modules_to_save heads or others) would pass "
            f"realignment unchanged: {keys[:4]}. Choose --extra-tensors restore (replace them with the aligned "
            "adapter's or the base model's copy) or --extra-tensors keep (copy them, listed in report.json)"
        )
    plan: dict[str, tuple[str, torch.Tensor | None]] = {}
    records = []
    for key in keys:
        shape, dtype = tuple(ft.raw_shape(key)), ft.raw_dtype(key)
        if policy == "keep":
            log.warning("%s: non-LoRA tensor %r kept from the fine-tuned adapter (--extra-tensors keep)",
                        ft.weights_file, key)
            plan[key] = ("keep", None)
            records.append({"tensor": key, "action": "kept from the fine-tuned adapter", "source": str(ft.folder)})
            continue
        if key in aligned.extra_keys:
            src, where = read_raw(aligned, key, nonfinite), str(aligned.folder)
        else:
            base_key = base_key_of_extra(key)
            if base_key not in base:
                raise ValueError(f"{ft.weights_file}: non-LoRA tensor {key!r} has no copy in the aligned adapter "
                                 f"{aligned.folder} nor a tensor {base_key!r} in the base {base.folder}; it cannot "
                                 "be restored (use --extra-tensors keep to copy it, or remove it)")
            src, where = read_tensor(base.info(base_key)), f"{base.folder}:{base_key}"
            nonfinite.check(src, file=base.file_of(base_key), tensor=base_key)
        if tuple(src.shape) != shape:
            raise ValueError(f"{ft.weights_file}: non-LoRA tensor {key!r} has shape {list(shape)}, but its "
                             f"replacement {where} has shape {list(src.shape)}")
        plan[key] = ("restore", src.to(dtype))
        records.append({"tensor": key, "action": "replaced by the safety model's copy", "source": where})
    return plan, records
