"""Configuration of a realign run: every hyper-parameter in one frozen, validated object, and the presets
(docs/algorithm.md §8)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from nlsr_fast import methods

__all__ = [
    "BACKENDS",
    "CALIB_DTYPES",
    "EXTRA_TENSORS",
    "METHODS",
    "MODES",
    "SCORE_ON",
    "PRESETS",
    "SELECTIONS",
    "TEMPLATES",
    "Preset",
    "RealignConfig",
    "resolve_preset",
]

#: The method names (their declarations, modes and needs: nlsr_fast.methods).
METHODS = methods.names()
MODES = ("auto", "lora", "dense")
SCORE_ON = ("delta", "weight")
EXTRA_TENSORS = ("refuse", "restore", "keep")
SELECTIONS = ("adaptive", "threshold", "fraction", "count", "all")
TEMPLATES = ("alpaca", "chat")
CALIB_DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("reference", "cpu", "triton")


@dataclass(frozen=True)
class Preset:
    """One column of docs/algorithm.md §8: where the paper and the released code disagree.

    Attributes:
        name: "paper" or "official".
        amplify_mode: "sqrt" multiplies each LoRA factor by sqrt(1+alpha) (dW_e = (1+alpha) dW_a);
            "two_alpha" multiplies each factor by 2*alpha (dW_e = 4 alpha^2 dW_a), as the released code does.
        adaptive_direction: "dissimilar" restores the least similar modules most often (paper);
            "similar" gives the most similar modules the highest chance (released code).
        snip_accumulate: "per_sample" sums |dL_n/dW| with gradients reset per sample; "running" sums
            |sum_{j<=n} dL_j/dW| over n (gradients never reset).
        pref_chosen: "safer" takes the safer response as chosen; "better" takes `better_response_id`.
        low_rank_count_offset: 0 keeps n - floor(s n) entries; 1 keeps one fewer (the code's strict `>`).
        response_tokens: "plain" tokenises responses without special tokens; "drop_first" tokenises with the
            tokenizer's defaults and drops the first token.
    """

    name: str
    amplify_mode: Literal["sqrt", "two_alpha"]
    adaptive_direction: Literal["dissimilar", "similar"]
    snip_accumulate: Literal["per_sample", "running"]
    pref_chosen: Literal["safer", "better"]
    low_rank_count_offset: Literal[0, 1]
    response_tokens: Literal["plain", "drop_first"]

    def __post_init__(self) -> None:
        allowed: dict[str, tuple[Any, ...]] = {
            "amplify_mode": ("sqrt", "two_alpha"),
            "adaptive_direction": ("dissimilar", "similar"),
            "snip_accumulate": ("per_sample", "running"),
            "pref_chosen": ("safer", "better"),
            "low_rank_count_offset": (0, 1),
            "response_tokens": ("plain", "drop_first"),
        }
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(f"preset {self.name!r}: {key} must be one of {values}, got {getattr(self, key)!r}")

    def amplification_factor(self, alpha: float) -> float:
        """The number each LoRA factor of the aligned adapter is multiplied by (docs/algorithm.md §2)."""
        return math.sqrt(1.0 + alpha) if self.amplify_mode == "sqrt" else 2.0 * alpha


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        amplify_mode="sqrt",
        adaptive_direction="dissimilar",
        snip_accumulate="per_sample",
        pref_chosen="safer",
        low_rank_count_offset=0,
        response_tokens="plain",
    ),
    "official": Preset(
        name="official",
        amplify_mode="two_alpha",
        adaptive_direction="similar",
        snip_accumulate="running",
        pref_chosen="better",
        low_rank_count_offset=1,
        response_tokens="drop_first",
    ),
}


def resolve_preset(preset: Preset | str) -> Preset:
    """A Preset given as itself or by its name in PRESETS."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _check_range(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


#: The largest seed torch.Generator.manual_seed accepts (2**64 - 1).
SEED_MAX = 2**64 - 1


def _check_device_available(name: str, dev: Any) -> None:
    """Refuse a device this machine does not have (up front, not deep inside a run)."""
    import torch

    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda}); use device='cpu' (--device cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
                             "choose one of them or use device='cpu' (--device cpu)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine; use device='cpu' (--device cpu)")


@dataclass(frozen=True)
class RealignConfig:
    """Every hyper-parameter of a realign run (defaults: docs/algorithm.md §8, "Defaults shared by both").

    Attributes:
        preset: a key of PRESETS ("paper" or "official").
        method: neuron score, one of METHODS.
        sparsity: s in [0, 1]; each mask keeps the top 1 - s share.
        alpha: amplification coefficient >= 0 (ignored when a ready reference is given).
        selection: "adaptive" (Bernoulli per module), "threshold" (S < tau), "fraction" (ceil(q N) least similar),
            "count" (the `count` least similar) or "all" (every module); None: the method's default (the first of its
            `selections`: adaptive for NLSR's scores, count for safelora, all for antidote).
        prune_rate: rho in [0, 1], the mean restore probability of `adaptive`.
        epsilon: spread in [0, 1] of the adaptive probabilities around rho.
        tau: similarity threshold in [-1, 1], required by "threshold".
        fraction: q in [0, 1], required by "fraction".
        count: the number of least similar modules "count" chooses (safelora's default: 10).
        prune_ratio: antidote: the share of each row pruned (zeroed), in [0, 1] (default 0.1).
        beta: resta: the weight of the safety vector (aligned - unaligned), in [0, 10] (default 0.5).
        dare_rate: resta: DARE's drop rate p in [0, 1) on the fine-tuning change; None: no DARE.
        seed: seed of the Bernoulli draw, the calibration sampling and the `random` masks.
        nsamples: calibration samples used (>= 1).
        max_response_tokens: response tokens kept per sample (>= 1).
        template: prompt format, "alpaca" or "chat" (the tokenizer's chat template).
        sequential: recompute each layer's outputs with its projected / masked factors (low_rank, wanda).
        micro_batch: samples per calibration forward; None picks one from the model size.
        calib_dtype: dtype of the calibration forward; None uses the base checkpoint's dtype.
        device: torch device of calibration and ops ("cpu", "cuda", "cuda:1"); None picks cuda if available.
        backend: ops backend ("reference", "cpu", "triton"); None picks the fastest available per op.
        mode: "lora" (adapters that continued the aligned one), "dense" (full weights, or adapters merged on the
            fly) or "auto" (lora when the fine-tuned adapter has the aligned adapter's keys and ranks).
        targets: dense mode: a regex on module names (weight keys without ".weight"); None = the seven projections.
        score_on: dense mode: score the reference's delta W_e - W_0 ("delta") or W_e itself ("weight").
        allow_nonfinite: go on when an input holds NaN/Inf (listed in report.json) instead of refusing it.
        extra_tensors: non-LoRA tensors of the fine-tuned adapter (modules_to_save heads): "refuse" the run,
            "restore" them from the aligned adapter (or the base), or "keep" them (reported).
        max_shard_bytes: dense output: tensor bytes per shard (5 GiB, as save_pretrained).
    """

    preset: str = "paper"
    method: str = methods.DEFAULT
    sparsity: float = 0.8
    alpha: float = 0.9
    selection: str | None = None
    prune_rate: float = 0.5
    epsilon: float = 0.2
    tau: float | None = None
    fraction: float | None = None
    count: int | None = None
    prune_ratio: float | None = None
    beta: float | None = None
    dare_rate: float | None = None
    seed: int = 42
    nsamples: int = 2000
    max_response_tokens: int = 256
    template: str = "alpaca"
    sequential: bool = True
    micro_batch: int | None = None
    calib_dtype: str | None = None
    device: str | None = None
    backend: str | None = None
    mode: str = "auto"
    targets: str | None = None
    score_on: str = "delta"
    allow_nonfinite: bool = False
    extra_tensors: str = "refuse"
    max_shard_bytes: int = 5 * 2**30

    def __post_init__(self) -> None:
        _check_choice("preset", self.preset, tuple(PRESETS))
        _check_choice("method", self.method, METHODS)
        self._resolve_method_options()
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("template", self.template, TEMPLATES)
        _check_range("sparsity", self.sparsity, 0.0, 1.0)
        _check_range("prune_rate", self.prune_rate, 0.0, 1.0)
        _check_range("epsilon", self.epsilon, 0.0, 1.0)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0.0:
            raise ValueError(f"alpha must be a number >= 0, got {self.alpha!r}")
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"alpha must be finite, got {self.alpha!r}")
        if self.selection == "threshold":
            if self.tau is None:
                raise ValueError("selection='threshold' needs tau (restore modules with similarity < tau)")
            _check_range("tau", self.tau, -1.0, 1.0)
        elif self.tau is not None:
            raise ValueError(
                f"tau={self.tau!r} is only used with selection='threshold', got selection={self.selection!r}"
            )
        if self.selection == "fraction":
            if self.fraction is None:
                raise ValueError("selection='fraction' needs fraction (the share of least similar modules restored)")
            _check_range("fraction", self.fraction, 0.0, 1.0)
        elif self.fraction is not None:
            raise ValueError(
                f"fraction={self.fraction!r} is only used with selection='fraction', got selection={self.selection!r}"
            )
        if self.selection == "count":
            _check_int("count", self.count, 0)
        elif self.count is not None:
            raise ValueError(f"count={self.count!r} is only used with selection='count', got "
                             f"selection={self.selection!r}")
        # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; seeds here are non-negative.
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in [0, {SEED_MAX}], got {self.seed!r}")
        _check_int("nsamples", self.nsamples, 1)
        _check_int("max_response_tokens", self.max_response_tokens, 1)
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be a bool, got {self.sequential!r}")
        if self.micro_batch is not None:
            _check_int("micro_batch", self.micro_batch, 1)
        if self.calib_dtype is not None:
            _check_choice("calib_dtype", self.calib_dtype, CALIB_DTYPES)
        if self.backend is not None:
            _check_choice("backend", self.backend, BACKENDS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("score_on", self.score_on, SCORE_ON)
        _check_choice("extra_tensors", self.extra_tensors, EXTRA_TENSORS)
        if self.mode != "auto":
            methods.get(self.method, self.mode)  # refused with the reason and the mode's methods
        if self.targets is not None and not isinstance(self.targets, str):
            raise ValueError(f"targets must be a regular expression string, got {self.targets!r}")
        if not isinstance(self.allow_nonfinite, bool):
            raise ValueError(f"allow_nonfinite must be a bool, got {self.allow_nonfinite!r}")
        _check_int("max_shard_bytes", self.max_shard_bytes, 1)
        if self.device is not None:
            import torch

            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device {self.device!r} is not a torch device: {exc}") from None
            _check_device_available(self.device, dev)

    def _resolve_method_options(self) -> None:
        """Fill the options the method gives defaults (its first selection, its count, its prune ratio) and refuse
        the ones that do not apply to it (one line naming the option and the method)."""
        spec = methods.METHODS[self.method]
        if self.selection is None:
            object.__setattr__(self, "selection", spec.selections[0])
        if self.selection not in spec.selections:
            raise ValueError(f"method {self.method!r} takes selection {' or '.join(map(repr, spec.selections))}, got "
                             f"selection={self.selection!r}")
        if self.selection == "count" and self.count is None and "count" in spec.defaults:
            object.__setattr__(self, "count", spec.defaults["count"])
        for option, lo, hi in (("prune_ratio", 0.0, 1.0), ("beta", 0.0, 10.0), ("dare_rate", 0.0, 0.999)):
            value = getattr(self, option)
            users = [n for n, m in methods.METHODS.items() if option in m.options]
            if self.method not in users:
                if value is not None:
                    raise ValueError(f"{option}={value!r} applies to {users}, not to method {self.method!r}")
                continue
            if value is None and option in spec.defaults:
                object.__setattr__(self, option, value := spec.defaults[option])
            if value is not None:
                _check_range(option, value, lo, hi)

    @property
    def mask_sparsity(self) -> float:
        """The s of the run's mask functions: sparsity, or 1 - prune_ratio for a method that marks what it prunes."""
        return self.method_spec.mask_sparsity(self.sparsity, self.prune_ratio)

    @property
    def preset_spec(self) -> Preset:
        """The Preset object named by `preset`."""
        return PRESETS[self.preset]

    @property
    def method_spec(self) -> methods.Method:
        """The Method declaration named by `method` (nlsr_fast.methods)."""
        return methods.METHODS[self.method]

    @property
    def keep(self) -> float:
        """Share of entries each mask keeps, 1 - sparsity."""
        return 1.0 - float(self.sparsity)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RealignConfig:
        """Build from a dict; unknown keys raise ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown realign option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)
