"""LoRA on any nn.Linear, with merge/unmerge, a switch-off context and the PEFT file format.

    names = apply_lora(model, rank=32, alpha=32, init="gaussian")   # Identity-GRPO's recipe
    with disable_lora(model):                                         # the frozen reference policy
        v_ref = model(...)
    save_peft(model, "out/lora")        # adapter_model.safetensors + adapter_config.json
    load_peft(model, "published/lora")  # applies LoRA with the file's config when needed

A targeted Linear becomes a `LoRALinear` (a subclass of nn.Linear whose own `weight`/`bias` stay the
same Parameter objects), with `lora_A` (in -> r) and `lora_B` (r -> out):
    y = W x + b + (alpha / r) * B (A x)            (alpha / sqrt(r) with use_rslora)
Base tensor names are unchanged, and the adapter names are exactly PEFT's once the adapter name is
dropped: `blocks.0.attn1.to_q.lora_A.weight` here is `base_model.model.blocks.0.attn1.to_q.lora_A.weight`
in `adapter_model.safetensors`, the file `peft`'s `save_pretrained` writes for a diffusers
transformer (Identity-GRPO's checkpoints).

Targets follow PEFT's matching: a list of names matches a module whose full name equals one of them
or ends with "." + it; a single string is a regular expression matched against the full name.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# q/k/v/out of every attention (self and cross, main and VACE blocks), as the Identity-GRPO recipe.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
INITS = ("gaussian", "kaiming", "zeros")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update. Built from an existing Linear by `LoRALinear.wrap`."""

    lora_A: nn.Linear
    lora_B: nn.Linear

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, *, init: str = "gaussian", dropout: float = 0.0,
             use_rslora: bool = False, dtype: torch.dtype | None = torch.float32) -> LoRALinear:
        if type(linear) is not nn.Linear:
            raise TypeError(f"LoRA wraps plain nn.Linear modules, got {type(linear).__name__}")
        # Note: re-classing keeps the base Parameters (and anything holding them) untouched.
        linear.__class__ = cls
        device = linear.weight.device
        dtype = dtype or linear.weight.dtype
        linear.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=dtype)
        linear.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=dtype)
        linear.rank, linear.alpha, linear.use_rslora = rank, alpha, use_rslora
        linear.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        linear.lora_dropout = dropout
        linear.lora_enabled = True
        linear.merged = False
        linear.reset_lora(init)
        return linear

    @torch.no_grad()
    def reset_lora(self, init: str = "gaussian") -> None:
        """PEFT's inits: "gaussian" A ~ N(0, 1/r), "kaiming" A ~ kaiming_uniform(a=sqrt(5)); B = 0 (a no-op
        adapter at start). "zeros": both zero (filled by loading)."""
        if self.lora_A.weight.is_meta:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.rank)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "zeros":
            self.lora_A.weight.zero_()
        else:
            raise ValueError(f"init={init!r}: expected one of {INITS}")
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled or self.merged:
            return out
        h = x.to(self.lora_A.weight.dtype)
        if self.lora_dropout and self.training:
            h = F.dropout(h, self.lora_dropout)
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(module: nn.Module, rank: int, alpha: float, targets: str | Sequence[str] = DEFAULT_TARGETS, *,
               init: str = "gaussian", dropout: float = 0.0, use_rslora: bool = False,
               dtype: torch.dtype | None = torch.float32) -> list[str]:
    """Wrap every matching nn.Linear of `module` in LoRA; returns the wrapped names. The adapters are
    created on each Linear's device in `dtype` (None: the Linear's dtype); base weights are not frozen
    here (see `mark_only_lora_trainable`)."""
    if rank <= 0 or alpha <= 0:
        raise ValueError(f"rank={rank} and alpha={alpha} must be positive")
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {INITS}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    names = [name for name, m in module.named_modules()
             if type(m) is nn.Linear and ".lora_" not in name and _matches(name, targets)]
    if not names:
        raise ValueError(f"LoRA targets {targets!r} match no nn.Linear of {type(module).__name__}")
    for name in names:
        LoRALinear.wrap(module.get_submodule(name), rank, alpha, init=init, dropout=dropout, use_rslora=use_rslora,
                        dtype=dtype)
    module._lora_settings = {"r": rank, "lora_alpha": alpha, "target_modules": targets if isinstance(targets, str)
                             else list(targets), "init_lora_weights": init, "lora_dropout": dropout,
                             "use_rslora": use_rslora}
    return names


def lora_modules(module: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def lora_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    for _, m in lora_modules(module):
        yield m.lora_A.weight
        yield m.lora_B.weight


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under their (PEFT-without-prefix) names, e.g. `blocks.0.attn1.to_q.lora_A.weight`."""
    out = {}
    for name, m in lora_modules(module):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B.weight"] = m.lora_B.weight
    return out


def mark_only_lora_trainable(module: nn.Module) -> None:
    """requires_grad on the adapters only (the base model is the frozen reference policy)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(module):
        p.requires_grad_(True)


@contextlib.contextmanager
def disable_lora(module: nn.Module):
    """Run the base model: every adapter is skipped inside the block, exactly (not merged)."""
    mods = [m for _, m in lora_modules(module)]
    if any(m.merged for m in mods):
        raise RuntimeError("disable_lora on merged adapters would not give the base model exactly: unmerge first")
    previous = [m.lora_enabled for m in mods]
    for m in mods:
        m.lora_enabled = False
    try:
        yield module
    finally:
        for m, state in zip(mods, previous):
            m.lora_enabled = state


def merge_lora(module: nn.Module) -> None:
    """W += scaling * B A in every adapter (computed in fp32); the adapters then stop contributing."""
    for _, m in lora_modules(module):
        m.merge()


def unmerge_lora(module: nn.Module) -> None:
    for _, m in lora_modules(module):
        m.unmerge()


# ----------------------------------------------------------------------------- PEFT format


def save_peft(module: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_model.safetensors` (keys `base_model.model.<module>.lora_{A,B}.weight`) and
    `adapter_config.json` (peft_type LORA) in the layout PEFT's `save_pretrained` produces."""
    from safetensors.torch import save_file

    mods = list(lora_modules(module))
    if not mods:
        raise ValueError("save_peft: the module has no LoRA adapters")
    ranks = {m.rank for _, m in mods}
    alphas = {m.alpha for _, m in mods}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"save_peft supports one rank/alpha for all adapters, found ranks {ranks} alphas {alphas}")
    settings = getattr(module, "_lora_settings", None) or {}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in lora_state_dict(module).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": ranks.pop(), "lora_alpha": alphas.pop(),
        "target_modules": settings.get("target_modules", sorted(name for name, _ in mods)),
        "lora_dropout": settings.get("lora_dropout", mods[0][1].lora_dropout), "bias": "none",
        "use_rslora": mods[0][1].use_rslora, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": settings.get("init_lora_weights", "gaussian"), "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True, "revision": None,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _adapter_name(key: str) -> str:
    """PEFT / diffusers adapter key -> our name: strip `base_model.model.` or `transformer.`, drop an
    adapter name (`lora_A.default.weight`)."""
    for prefix in (PEFT_PREFIX, "transformer."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def load_peft(module: nn.Module, directory: str | Path, *, dtype: torch.dtype | None = torch.float32) -> list[str]:
    """Load a PEFT LoRA (directory with adapter_config.json + adapter_model.safetensors). Applies LoRA
    with the file's rank/alpha/targets first when the module has none. Every adapter tensor must find
    its module and every adapter module its tensors; otherwise one error lists them all."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (a PEFT LoRA directory has {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{config_file}: only plain LoRA adapters are supported (peft_type "
                         f"{config.get('peft_type')!r}, use_dora {config.get('use_dora')})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{config_file}: per-module rank_pattern / alpha_pattern are not supported")
    if not any(True for _ in lora_modules(module)):
        apply_lora(module, config["r"], config["lora_alpha"], config["target_modules"], init="zeros",
                   dropout=config.get("lora_dropout", 0.0), use_rslora=config.get("use_rslora", False), dtype=dtype)
    tensors = {_adapter_name(k): v for k, v in load_file(str(weights_file)).items()}
    expected = {k: tuple(v.shape) for k, v in lora_state_dict(module).items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or misshaped:
        lines = [f"LoRA {weights_file} does not fit the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines += [f"  {len(keys)} {title} adapter tensors:", *(f"    {k}" for k in keys[:40])]
        if misshaped:
            lines += [f"  {len(misshaped)} mis-shaped:", *(f"    {k}: file {found[k]} vs model {expected[k]}"
                                                          for k in misshaped[:40])]
        raise ValueError("\n".join(lines))
    params = lora_state_dict(module)
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    return sorted({k.rsplit(".lora_", 1)[0] for k in tensors})


__all__ = [
    "DEFAULT_TARGETS", "LoRALinear", "apply_lora", "disable_lora", "load_peft", "lora_modules", "lora_parameters",
    "lora_state_dict", "mark_only_lora_trainable", "merge_lora", "save_peft", "unmerge_lora",
]
