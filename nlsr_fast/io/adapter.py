"""Read, check and write PEFT LoRA adapter folders (`adapter_config.json` + `adapter_model.safetensors`)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nlsr_fast.io._format import TensorInfo, read_header
from nlsr_fast.io.checkpoint import CheckpointReader

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_SAFETENSORS",
    "ADAPTER_BIN",
    "MODULE_ORDER",
    "LoraAdapter",
    "LoraModule",
    "check_compatible",
    "check_adapter_matches_base",
    "get_pattern_key",
    "layer_of",
    "module_order_key",
    "write_adapter",
]

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

# Within a decoder layer, the order PEFT lists the modules of a Llama-family model.
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_PREFIX = "base_model.model."
# <module>.lora_A.weight or <module>.lora_A.<adapter name>.weight (PEFT strips the adapter name on save).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# Config fields that select a LoRA variant whose weights are not plain (A, B) pairs or whose forward differs.
# use_dora is refused on its own, with a DoRA-specific message.
_VARIANT_FIELDS = (
    "use_qalora",
    "use_bdlora",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
    "target_parameters",
    "layer_replication",
)


def _is_rank(v: object) -> bool:
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def get_pattern_key(pattern_keys: Sequence[str], key_to_match: str) -> str:
    """The first pattern key matching `key_to_match` as a dotted suffix (regex), else `key_to_match` itself.

    Same rule as `peft.utils.other.get_pattern_key`, which PEFT uses for `rank_pattern` and `alpha_pattern`:
    https://github.com/huggingface/peft/blob/main/src/peft/utils/other.py
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def layer_of(name: str) -> int | None:
    """Decoder layer of a module name: its first integer path segment, or None."""
    return _layer_of(name)


def _layer_of(name: str) -> int | None:
    for part in name.split("."):
        if part.isascii() and part.isdigit() and len(part) < 19:  # not "²", not a 5000-digit number
            return int(part)
    return None


def module_order_key(name: str) -> tuple[int, int, int, str]:
    """Sort key of model order: decoder layer, then PEFT's order of the projections, then the name."""
    return _order_key(name)


def _order_key(name: str) -> tuple[int, int, int, str]:
    layer = _layer_of(name)
    leaf = name.rsplit(".", 1)[-1]
    known = MODULE_ORDER.index(leaf) if leaf in MODULE_ORDER else len(MODULE_ORDER)
    # Layered modules first (by layer, then PEFT's order), then the rest; ties broken by name.
    return (0 if layer is not None else 1, layer if layer is not None else 0, known, name)


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear: its normalised name, raw keys and factor geometry."""

    name: str
    key_a: str
    key_b: str
    rank: int
    d_in: int
    d_out: int
    scale: float
    # True when the file stores A as (d_in, r) and B as (r, d_out) (hand-made fan_in_fan_out layouts).
    transposed: bool


class LoraAdapter:
    """A PEFT LoRA adapter: factors per module in model order, scales as PEFT computes them.

    Factors are read lazily from the memory-mapped safetensors file; `.factors(name)` returns A (r, d_in) and
    B (d_out, r) in the stored dtype, so that the module's update is `scale(name) * B @ A` (transposed to
    (d_in, d_out) for a Conv1D base when `fan_in_fan_out`).
    """

    def __init__(
        self,
        folder: Path,
        config: dict[str, Any],
        infos: dict[str, TensorInfo],
        *,
        weights_file: Path,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.folder: Path = folder
        self.config: dict[str, Any] = config
        self.weights_file: Path = weights_file
        self.files: list[Path] = [folder / ADAPTER_CONFIG, weights_file]
        self._infos = infos
        self._tensors = tensors
        self._handle: Any = None
        self._validate_config()
        self._modules: dict[str, LoraModule] = {}
        self.extra_keys: list[str] = []
        self._build()

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, allow_pickle: bool = False) -> LoraAdapter:
        """Read `folder`/adapter_config.json and the adapter weights (safetensors; a .bin only with allow_pickle).

        Args:
            folder: a PEFT adapter folder.
            allow_pickle: accept `adapter_model.bin`, loaded with `torch.load(weights_only=True)`.

        Returns:
            The adapter, validated (complete A/B pairs, consistent ranks, a plain LoRA config).
        """
        folder = Path(folder)
        cfg_path = folder / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise ValueError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{cfg_path}: malformed JSON: {type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
        st, binf = folder / ADAPTER_SAFETENSORS, folder / ADAPTER_BIN
        if st.is_file():
            infos, _ = read_header(st)
            return cls(folder, config, infos, weights_file=st)
        if binf.is_file():
            if not allow_pickle:
                raise ValueError(
                    f"{folder}: only {ADAPTER_BIN} (a pickle, which can run code when loaded) is present. Convert it "
                    "to safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True)"
                )
            log.warning("loading pickle adapter %s with torch.load(weights_only=True)", binf)
            sd = torch.load(binf, map_location="cpu", weights_only=True)
            if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
                raise ValueError(f"{binf}: not a state dict of tensors")
            infos = {k: TensorInfo(binf, t.dtype, tuple(t.shape), 0, t.nbytes) for k, t in sd.items()}
            return cls(folder, config, infos, weights_file=binf, tensors=dict(sd))
        raise ValueError(f"{folder}: no {ADAPTER_SAFETENSORS} (or {ADAPTER_BIN})")

    def _validate_config(self) -> None:
        cfg, path = self.config, self.folder / ADAPTER_CONFIG
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters (LORA) are supported")
        if cfg.get("use_dora"):
            raise NotImplementedError(f"{path}: DoRA adapters (use_dora: true) are not supported, only plain LoRA")
        for field in _VARIANT_FIELDS:
            if cfg.get(field):
                raise NotImplementedError(
                    f"{path}: LoRA variant {field}={cfg[field]!r} is not supported, only plain LoRA"
                )
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith("mica"):
            raise NotImplementedError(f"{path}: LoRA variant init_lora_weights={init!r} (MiCA) is not supported")
        if not _is_rank(cfg.get("r")):
            raise ValueError(f"{path}: r must be a positive number, a whole LoRA rank, got {cfg.get('r')!r}")
        if not _is_positive(cfg.get("lora_alpha")):
            raise ValueError(f"{path}: lora_alpha must be a positive finite number, got {cfg.get('lora_alpha')!r}")
        for field, ok, what in (("rank_pattern", _is_rank, "a positive integer"),
                                ("alpha_pattern", _is_positive, "a positive finite number")):
            pattern = cfg.get(field) or {}
            if not isinstance(pattern, dict):
                raise ValueError(f"{path}: {field} must be an object, got {cfg.get(field)!r}")
            for key, value in pattern.items():
                if not ok(value):
                    raise ValueError(f"{path}: {field}[{key!r}] must be {what}, got {value!r}")
                try:
                    re.compile(rf"(.*\.)?({key})$")
                except (re.error, RecursionError, OverflowError) as e:
                    raise ValueError(f"{path}: {field} key {key!r} is not a valid regular expression: {e}") from None
        targets = cfg.get("target_modules")
        if not (targets is None or isinstance(targets, str)
                or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise ValueError(f"{path}: target_modules must be a string or a list of strings, got {targets!r}")

    def _build(self) -> None:
        pairs: dict[str, dict[str, str]] = {}
        for key in self._infos:
            if "lora_magnitude_vector" in key:
                raise NotImplementedError(f"{self.weights_file}: tensor {key!r} is a DoRA magnitude; DoRA unsupported")
            m = _LORA_KEY.match(key)
            if m is None:
                self.extra_keys.append(key)
                continue
            module = m["module"]
            if module.startswith(_PREFIX):
                module = module[len(_PREFIX) :]
            slot = pairs.setdefault(module, {})
            if m["which"] in slot:
                raise ValueError(
                    f"{self.weights_file}: module {module!r} has two lora_{m['which']} tensors: "
                    f"{slot[m['which']]!r} and {key!r}"
                )
            slot[m["which"]] = key
        if self.extra_keys:
            log.info(
                "%s: %d non-LoRA tensors copied through: %s",
                self.weights_file,
                len(self.extra_keys),
                self.extra_keys[:4],
            )
        cfg = self.config
        rank_pattern: dict[str, int] = cfg.get("rank_pattern") or {}
        alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
        for module in sorted(pairs, key=_order_key):
            slot = pairs[module]
            for which, other in (("A", "B"), ("B", "A")):
                if which not in slot:
                    raise ValueError(
                        f"{self.weights_file}: {slot[other]!r} has no matching lora_{which} tensor "
                        f"for module {module!r}"
                    )
            a, b = self._infos[slot["A"]], self._infos[slot["B"]]
            if len(a.shape) != 2 or len(b.shape) != 2:
                raise ValueError(
                    f"{self.weights_file}: module {module!r}: LoRA factors must be 2-D, got {slot['A']!r} "
                    f"{list(a.shape)} and {slot['B']!r} {list(b.shape)}"
                )
            r = int(rank_pattern.get(get_pattern_key(list(rank_pattern), module), cfg["r"]))
            alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), cfg["lora_alpha"]))
            transposed = False
            if a.shape[0] == r and b.shape[1] == r:
                d_in, d_out = a.shape[1], b.shape[0]
            elif cfg.get("fan_in_fan_out") and a.shape[1] == r and b.shape[0] == r:
                transposed, d_in, d_out = True, a.shape[0], b.shape[1]
            else:
                raise ValueError(
                    f"{self.weights_file}: module {module!r}: rank mismatch: {slot['A']!r} has shape {list(a.shape)} "
                    f"and {slot['B']!r} has shape {list(b.shape)}, expected A (r, d_in) and B (d_out, r) with "
                    f"r = {r} from {ADAPTER_CONFIG} (r / rank_pattern)"
                )
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"{self.folder / ADAPTER_CONFIG}: module {module!r}: scale lora_alpha / r = {scale} "
                                 f"(alpha {alpha}, r {r}) is not a positive finite number")
            self._modules[module] = LoraModule(module, slot["A"], slot["B"], r, d_in, d_out, scale, transposed)

    @property
    def modules(self) -> list[str]:
        """Module names as in the base checkpoint (`model.layers.0.self_attn.q_proj`), in model order."""
        return list(self._modules)

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def module(self, name: str) -> LoraModule:
        """The geometry record of module `name`."""
        try:
            return self._modules[name]
        except KeyError:
            raise KeyError(f"{self.folder}: no LoRA module {name!r} in this adapter") from None

    def key_a(self, name: str) -> str:
        """Raw tensor key of module `name`'s lora_A."""
        return self.module(name).key_a

    def key_b(self, name: str) -> str:
        """Raw tensor key of module `name`'s lora_B."""
        return self.module(name).key_b

    def rank(self, name: str) -> int:
        """LoRA rank r of module `name`."""
        return self.module(name).rank

    def scale(self, name: str) -> float:
        """PEFT's scaling of module `name`: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), patterns applied."""
        return self.module(name).scale

    def layer_of(self, name: str) -> int | None:
        """Decoder layer index of module `name` (the first integer path segment), None if it has none."""
        return _layer_of(name)

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base weights of the targets are stored (d_in, d_out) (Conv1D)."""
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def target_modules(self) -> list[str] | str | None:
        """`target_modules` from the config (a list of names, or a regex string)."""
        return self.config.get("target_modules")

    @property
    def raw_keys(self) -> list[str]:
        """Every tensor key in the weights file, in file order."""
        return list(self._infos)

    @property
    def nbytes(self) -> int:
        """Total bytes of all tensors in the adapter."""
        return sum(i.nbytes for i in self._infos.values())

    def raw_shape(self, key: str) -> tuple[int, ...]:
        """Stored shape of raw tensor `key` (header only)."""
        return self._info(key).shape

    def raw_dtype(self, key: str) -> torch.dtype:
        """Stored dtype of raw tensor `key` (header only)."""
        return self._info(key).dtype

    def raw_info(self, key: str) -> TensorInfo:
        """Header record (file, dtype, shape, byte range) of raw tensor `key`."""
        return self._info(key)

    @property
    def is_pickle(self) -> bool:
        """Whether the weights came from a pickle (held in memory) rather than a safetensors file."""
        return self._tensors is not None

    def _info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{self.weights_file}: no tensor {key!r}") from None

    def raw(self, key: str) -> torch.Tensor:
        """The stored tensor `key` (CPU, stored dtype and orientation; a copy-on-write view of the file)."""
        self._info(key)
        if self._tensors is not None:
            return self._tensors[key]
        if self._handle is None:
            self._handle = safe_open(os.fspath(self.weights_file), framework="pt", device="cpu")
        return self._handle.get_tensor(key)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The LoRA factors of module `name`.

        Returns:
            A (r, d_in) and B (d_out, r), stored dtype, on the CPU.
        """
        m = self.module(name)
        a, b = self.raw(m.key_a), self.raw(m.key_b)
        if m.transposed:
            a, b = a.t(), b.t()
        return a, b

    def to_raw(self, name: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw keys and stored orientation for new factors of module `name`, ready for `write_adapter`.

        Args:
            name: module name.
            a: (r, d_in), any dtype (kept).
            b: (d_out, r), any dtype (kept).

        Returns:
            {key_a: A as stored, key_b: B as stored}, contiguous.
        """
        m = self.module(name)
        if tuple(a.shape) != (m.rank, m.d_in) or tuple(b.shape) != (m.d_out, m.rank):
            raise ValueError(
                f"{self.folder}: module {name!r}: new factors have shapes A {list(a.shape)}, B {list(b.shape)}; "
                f"expected A {[m.rank, m.d_in]}, B {[m.d_out, m.rank]}"
            )
        if m.transposed:
            a, b = a.t(), b.t()
        return {m.key_a: a.contiguous(), m.key_b: b.contiguous()}

    def close(self) -> None:
        """Drop the open file handle (tensors already returned stay valid)."""
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle = None

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.folder)!r}, {len(self._modules)} modules, r={self.config.get('r')})"


def _norm_targets(t: object) -> object:
    return frozenset(t) if isinstance(t, (list, tuple, set)) else t


def check_compatible(finetuned: LoraAdapter, reference: LoraAdapter) -> None:
    """Check that `finetuned` continued training `reference`: same modules, ranks, shapes, targets and scales.

    Raises:
        ValueError: naming the first mismatch (in model order) and both adapters' folders.
    """
    ft, ref = finetuned, reference
    where = f"fine-tuned adapter {ft.folder} vs reference adapter {ref.folder}"
    ft_set, ref_set = set(ft.modules), set(ref.modules)
    missing_ft = [m for m in ref.modules if m not in ft_set]
    missing_ref = [m for m in ft.modules if m not in ref_set]
    if missing_ft or missing_ref:
        first = min(missing_ft + missing_ref, key=_order_key)
        side = "fine-tuned" if first in missing_ft else "reference"
        raise ValueError(
            f"{where}: module sets differ ({len(missing_ft)} missing in the fine-tuned adapter, {len(missing_ref)} "
            f"missing in the reference); first: {first!r} is missing in the {side} adapter"
        )
    for name in ref.modules:
        a, b = ft.module(name), ref.module(name)
        if a.rank != b.rank:
            raise ValueError(f"{where}: module {name!r}: rank differs: {a.rank} (fine-tuned) vs {b.rank} (reference)")
        for which, ka, kb in (("A", a.key_a, b.key_a), ("B", a.key_b, b.key_b)):
            sa, sb = ft.raw_shape(ka), ref.raw_shape(kb)
            if sa != sb:
                raise ValueError(
                    f"{where}: module {name!r}: lora_{which} shape differs: {list(sa)} ({ka!r}, fine-tuned) vs "
                    f"{list(sb)} ({kb!r}, reference)"
                )
    ta, tb = _norm_targets(ft.target_modules), _norm_targets(ref.target_modules)
    if ta != tb:
        raise ValueError(
            f"{where}: target_modules differ: {ft.target_modules!r} (fine-tuned) vs {ref.target_modules!r} (reference)"
        )
    for name in ref.modules:
        fa, fb = ft.scale(name), ref.scale(name)
        if not math.isclose(fa, fb, rel_tol=1e-12, abs_tol=0.0):
            raise ValueError(
                f"{where}: module {name!r}: scale differs: {fa} (fine-tuned) vs {fb} (reference); compare lora_alpha, "
                "use_rslora and alpha_pattern in the two adapter_config.json files"
            )
    if ft.fan_in_fan_out != ref.fan_in_fan_out:
        raise ValueError(
            f"{where}: fan_in_fan_out differs: {ft.fan_in_fan_out} (fine-tuned) vs {ref.fan_in_fan_out} (reference)"
        )


def check_adapter_matches_base(adapter: LoraAdapter, base: CheckpointReader) -> None:
    """Check that every module of `adapter` has `<name>.weight` in `base` with a shape matching its factors.

    The base weight is (d_out, d_in), or (d_in, d_out) when the adapter says `fan_in_fan_out` (Conv1D).

    Raises:
        ValueError: naming the module, both shapes and the files.
    """
    for name in adapter.modules:
        m = adapter.module(name)
        key = f"{name}.weight"
        if key not in base:
            raise ValueError(
                f"adapter {adapter.weights_file} module {name!r}: the base checkpoint {base.folder} has no tensor "
                f"{key!r}; is this adapter for another base model?"
            )
        expected = (m.d_in, m.d_out) if adapter.fan_in_fan_out else (m.d_out, m.d_in)
        got = base.shape(key)
        if tuple(got) != expected:
            layout = "(d_in, d_out)" if adapter.fan_in_fan_out else "(d_out, d_in)"
            raise ValueError(
                f"adapter {adapter.weights_file} module {name!r}: factors A {[m.rank, m.d_in]}, B {[m.d_out, m.rank]} "
                f"need a base weight {list(expected)} {layout}, but {key!r} in {base.file_of(key)} has shape "
                f"{list(got)}; is this adapter for another base model?"
            )


def write_adapter(
    folder: str | os.PathLike[str],
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a PEFT adapter into an existing folder: `adapter_model.safetensors` + `adapter_config.json`.

    Args:
        folder: an existing folder (usually the `atomic_output` partial folder).
        config: the adapter config, written as JSON with sorted keys and indent 2.
        tensors: raw key -> tensor, written contiguous in the dtype given.
        metadata: extra string pairs for the safetensors header.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"write_adapter: folder {folder} does not exist")
    from nlsr_fast.io.writer import write_safetensors  # function-local: io.writer imports io.checkpoint

    write_safetensors(folder / ADAPTER_SAFETENSORS, dict(tensors), metadata)
    text = json.dumps(dict(config), sort_keys=True, indent=2) + "\n"
    with (folder / ADAPTER_CONFIG).open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    log.debug("wrote adapter %s (%d tensors)", folder, len(tensors))
