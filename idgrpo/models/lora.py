"""LoRA on any nn.Linear, with merge/unmerge, a switch-off context and the PEFT and diffusers file formats.

    names = apply_lora(model, rank=32, alpha=32, init="gaussian")   # Identity-GRPO's recipe
    with disable_lora(model):                                         # the frozen reference policy
        v_ref = model(...)
    save_peft(model, "out/lora")              # adapter_model.safetensors + adapter_config.json
    save_diffusers_lora(model, "out/wan")     # pytorch_lora_weights.safetensors (Wan pipelines' load_lora_weights)
    load_peft(model, "published/lora")        # applies LoRA with the file's config when needed
    load_diffusers_lora(model, "other/wan")   # a LoRA diffusers saved

A targeted Linear becomes a `LoRALinear` (a subclass of nn.Linear whose own `weight`/`bias` stay the
same Parameter objects), with `lora_A` (in -> r) and `lora_B` (r -> out):
    y = W x + b + (alpha / r) * B (A x)            (alpha / sqrt(r) with use_rslora)
Base tensor names are unchanged, and the adapter names are exactly PEFT's once the adapter name is
dropped: `blocks.0.attn1.to_q.lora_A.weight` here is `base_model.model.blocks.0.attn1.to_q.lora_A.weight`
in `adapter_model.safetensors`, the file `peft`'s `save_pretrained` writes for a diffusers
transformer (Identity-GRPO's checkpoints), and `transformer.blocks.0.attn1.to_q.lora_A.weight` in diffusers'
`pytorch_lora_weights.safetensors`. Formats, the run directory's exports and `idgrpo export-lora`: docs/lora.md.

Targets follow PEFT's matching: a list of names matches a module whose full name equals one of them
or ends with "." + it; a single string is a regular expression matched against the full name.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

# q/k/v/out of every attention (self and cross, main and VACE blocks), as the Identity-GRPO recipe.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
INITS = ("gaussian", "kaiming", "zeros")
# Our init -> PEFT's `init_lora_weights`: PEFT's True is the kaiming-uniform A; "zeros" (both factors zero, filled by
# loading) has no PEFT counterpart and is written as PEFT's default.
PEFT_INIT = {"gaussian": "gaussian", "kaiming": True, "zeros": True}
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


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
        delta = self.adapter_output(x)
        return out if delta is None else out + delta.to(out.dtype)

    def adapter_output(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The adapter's term scaling * B (A x), computed in `dtype` (default: the adapters' own), with dropout on x
        in training; None while the adapter is switched off or merged. A model that evaluates a Linear its own way
        (e.g. in fp32 whatever the weights' dtype) adds this to its result, so unmerged acts as merged."""
        if not self.lora_enabled or self.merged:
            return None
        dtype = dtype or self.lora_A.weight.dtype
        h = x.to(dtype)
        if self.lora_dropout and self.training:
            h = F.dropout(h, self.lora_dropout)
        return F.linear(F.linear(h, self.lora_A.weight.to(dtype)), self.lora_B.weight.to(dtype)) * self.scaling

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
    module._lora_settings = {"init_lora_weights": PEFT_INIT[init]}
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


# ----------------------------------------------------------------------------- file formats
#
# PEFT and diffusers files hold the same tensors, lora_A (r, in) and lora_B (out, r) under the module names, with a
# different key prefix; r, lora_alpha and the targets live in PEFT's adapter_config.json and in the diffusers file's
# safetensors header (`lora_adapter_metadata`: PEFT LoraConfig fields prefixed by the component, "transformer.r").
# `target_modules` always names exactly the adapted modules (full names), so PEFT adapts those and no others.


def _peft_init(value: bool | str) -> bool | str:
    """`init_lora_weights` in a form PEFT's LoraConfig accepts (ours are mapped; PEFT's own pass through)."""
    return PEFT_INIT.get(value, value) if isinstance(value, str) else value


def _lora_fields(rank: int, alpha: float, targets: list[str] | str, *, use_rslora: bool, dropout: float,
                 init: bool | str) -> dict:
    """The LoraConfig fields both formats record."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": dropout, "bias": "none",
            "use_rslora": use_rslora, "use_dora": False, "init_lora_weights": _peft_init(init)}


def _exact_targets(names: Sequence[str], others: Sequence[str] = ()) -> list[str] | str:
    """`target_modules` matching exactly `names`: the list of full names, unless PEFT's suffix rule would also catch
    one of `others` (the model's other modules; a top-level `proj_out` also matches `vace_blocks.0.proj_out`): then an
    alternation of the escaped names, which PEFT matches against whole module names."""
    names = sorted(names)
    chosen = set(names)
    for other in others:
        parts = other.split(".")
        if other not in chosen and any(".".join(parts[i:]) in chosen for i in range(1, len(parts))):
            return "|".join(re.escape(n) for n in names)
    return names


def _module_name(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


def _adapters_to_save(module: nn.Module, tensors: dict[str, torch.Tensor] | None,
                      rename: Callable[[str], str] | None) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter tensors under the saved module names, LoraConfig fields) of the module's adapters. `tensors`: the
    adapter tensors by our names when the module's own are not at hand (the gathered state of a sharded model)."""
    mods = list(lora_modules(module))
    if not mods:
        raise ValueError(f"{type(module).__name__} has no LoRA adapters to save")
    kinds = {(m.rank, m.alpha, m.use_rslora) for _, m in mods}
    if len(kinds) != 1:
        raise ValueError(f"a LoRA file holds one (rank, alpha, use_rslora) for all adapters, found {sorted(kinds)}")
    expected = lora_state_dict(module)
    if tensors is None:
        tensors = expected
    missing = sorted(set(expected) - set(tensors))
    misshaped = sorted(k for k in set(expected) - set(missing) if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if missing or misshaped:
        raise ValueError(f"the given tensors do not fit the model's adapters: missing {missing[:5]}, mis-shaped "
                         f"{misshaped[:5]}")
    rename = rename or (lambda name: name)
    out = {rename(_module_name(k)) + k[len(_module_name(k)):]: tensors[k].detach().cpu().contiguous()
           for k in expected}
    adapted = {name for name, _ in mods}
    others = [rename(n) for n, _ in module.named_modules() if n and n not in adapted and ".lora_" not in n]
    m = mods[0][1]
    fields = _lora_fields(m.rank, m.alpha, _exact_targets([rename(n) for n in adapted], others),
                          use_rslora=m.use_rslora, dropout=m.lora_dropout,
                          init=getattr(module, "_lora_settings", {}).get("init_lora_weights", True))
    return out, fields


def _write_peft(directory: str | Path, tensors: dict[str, torch.Tensor], fields: dict,
                base_model_name_or_path: str | None) -> Path:
    from safetensors.torch import save_file

    from idgrpo.engine.checkpoint import _write_atomic_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path, **fields,
              "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
              "layers_to_transform": None, "layers_pattern": None, "inference_mode": True, "revision": None}
    weights = {PEFT_PREFIX + k: v for k, v in tensors.items()}
    _write_atomic_file(directory / ADAPTER_WEIGHTS, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    _write_atomic_file(directory / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _write_diffusers(directory: str | Path, tensors: dict[str, torch.Tensor], fields: dict, prefix: str) -> Path:
    from safetensors.torch import save_file

    from idgrpo.engine.checkpoint import _write_atomic_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in fields.items()},
                                                                   indent=2, sort_keys=True)}
    weights = {f"{prefix}.{k}": v for k, v in tensors.items()}
    _write_atomic_file(directory / DIFFUSERS_WEIGHTS, lambda p: save_file(weights, str(p), metadata=metadata))
    return directory


def save_peft(module: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None,
              tensors: dict[str, torch.Tensor] | None = None, rename: Callable[[str], str] | None = None) -> Path:
    """Write `adapter_model.safetensors` (keys `base_model.model.<module>.lora_{A,B}.weight`) and
    `adapter_config.json` as PEFT's `save_pretrained` does; `PeftModel.from_pretrained` loads them.
    tensors: the adapter tensors by name (`lora_state_dict` names; other entries ignored) when the module's own
    are not at hand, e.g. a sharded model's gathered state. rename: our module name -> the name the loading model
    uses (written in the keys and in target_modules)."""
    weights, fields = _adapters_to_save(module, tensors, rename)
    return _write_peft(directory, weights, fields, base_model_name_or_path)


def save_diffusers_lora(module: nn.Module, directory: str | Path, *, tensors: dict[str, torch.Tensor] | None = None,
                        prefix: str = "transformer") -> Path:
    """Write `pytorch_lora_weights.safetensors` in diffusers' layout (keys `transformer.<module>.lora_{A,B}.weight`,
    r / lora_alpha / target_modules in the header's `lora_adapter_metadata`), the file a Wan pipeline's
    `load_lora_weights(directory)` reads. `tensors` as in `save_peft`."""
    weights, fields = _adapters_to_save(module, tensors, None)
    return _write_diffusers(directory, weights, fields, prefix)


def _adapter_name(key: str) -> str:
    """PEFT / diffusers adapter key -> our name: strip `base_model.model.` or `transformer.`, drop an
    adapter name (`lora_A.default.weight`)."""
    for prefix in (PEFT_PREFIX, "transformer."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def _check_plain_lora(fields: dict, source: Path) -> None:
    if fields.get("peft_type", "LORA") != "LORA" or fields.get("use_dora") or fields.get("lora_bias"):
        raise ValueError(f"{source}: only plain LoRA adapters are supported (peft_type {fields.get('peft_type')!r}, "
                         f"use_dora {fields.get('use_dora')}, lora_bias {fields.get('lora_bias')})")
    if fields.get("rank_pattern") or fields.get("alpha_pattern"):
        raise ValueError(f"{source}: per-module rank_pattern / alpha_pattern are not supported")


def _read_peft(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(adapter_config, tensors by our names, weights file) of a PEFT LoRA directory; a tensor holding a NaN/Inf is
    refused (CheckpointError naming the file and the tensor)."""
    from safetensors.torch import load_file

    from idgrpo.models.weights import refuse_nonfinite

    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (a PEFT LoRA directory has {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads(config_file.read_text())
    _check_plain_lora(config, config_file)
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise ValueError(f"{config_file}: no {field!r}")
    tensors = {_adapter_name(k): refuse_nonfinite(weights_file, k, v) for k, v in load_file(str(weights_file)).items()}
    return config, tensors, weights_file


def _load_adapters(module: nn.Module, tensors: dict[str, torch.Tensor], fields: dict, source: Path,
                   dtype: torch.dtype | None) -> list[str]:
    """Copy adapter tensors (our names) into the module's adapters, first applying LoRA with `fields` (r,
    lora_alpha, target_modules, ...) when it has none. Every tensor must find its adapter, every adapter its tensors
    and the scaling must agree; otherwise one error lists it all."""
    rank, alpha, use_rslora = fields["r"], fields["lora_alpha"], fields.get("use_rslora", False)
    if not any(True for _ in lora_modules(module)):
        apply_lora(module, rank, alpha, fields["target_modules"], init="zeros", dropout=fields.get("lora_dropout", 0.0),
                   use_rslora=use_rslora, dtype=dtype)
        module._lora_settings = {"init_lora_weights": _peft_init(fields.get("init_lora_weights", True))}
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    other_scaling = sorted(name for name, m in lora_modules(module) if m.scaling != scaling)
    expected = {k: tuple(v.shape) for k, v in lora_state_dict(module).items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or misshaped or other_scaling:
        lines = [f"LoRA {source} does not fit the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines += [f"  {len(keys)} {title} adapter tensors:", *(f"    {k}" for k in keys[:40])]
        if misshaped:
            lines += [f"  {len(misshaped)} mis-shaped:", *(f"    {k}: file {found[k]} vs model {expected[k]}"
                                                          for k in misshaped[:40])]
        if other_scaling:
            lines += [f"  {len(other_scaling)} adapters of the model scale by other than the file's alpha/r "
                      f"({alpha}/{rank}{', rslora' if use_rslora else ''}), e.g. {other_scaling[0]}"]
        raise ValueError("\n".join(lines))
    params = lora_state_dict(module)
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    return sorted({_module_name(k) for k in tensors})


def load_peft(module: nn.Module, directory: str | Path, *, dtype: torch.dtype | None = torch.float32) -> list[str]:
    """Load a PEFT LoRA (directory with adapter_config.json + adapter_model.safetensors) and return the adapted
    module names. Applies LoRA with the file's rank/alpha/targets first when the module has none."""
    config, tensors, weights_file = _read_peft(directory)
    return _load_adapters(module, tensors, config, weights_file, dtype)


def load_diffusers_lora(module: nn.Module, path: str | Path, *, lora_alpha: float | None = None,
                        use_rslora: bool = False, prefix: str = "transformer",
                        dtype: torch.dtype | None = torch.float32) -> list[str]:
    """Load a LoRA in diffusers' layout (a directory with `pytorch_lora_weights.safetensors`, or the file itself), as
    diffusers' `save_lora_weights` writes it, and return the adapted module names. r, lora_alpha and use_rslora come
    from the header's `lora_adapter_metadata`; a file without it needs `lora_alpha=` (and `use_rslora=`) as trained,
    since diffusers would silently take alpha = r. LoRA is applied to exactly the modules the file names when the
    module has none. A tensor holding a NaN/Inf is refused (CheckpointError naming the file and the tensor)."""
    from safetensors import safe_open

    from idgrpo.models.weights import refuse_nonfinite

    file = Path(path)
    if file.is_dir():
        file = file / DIFFUSERS_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (diffusers' save_lora_weights writes {DIFFUSERS_WEIGHTS})")
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
        raw = {k: refuse_nonfinite(file, k, f.get_tensor(k)) for k in f.keys()}
    outside = sorted(k for k in raw if not k.startswith(prefix + "."))
    if outside:
        raise ValueError(f"{file}: {len(outside)} tensors are not under `{prefix}.` (e.g. {outside[0]}); only a "
                         f"{prefix} LoRA in diffusers' layout is read")
    tensors = {_adapter_name(k[len(prefix) + 1:]): v for k, v in raw.items()}
    names = sorted({_module_name(k) for k in tensors})
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{file}: expected one rank for every adapter, found {sorted(ranks)}")
    if DIFFUSERS_METADATA_KEY in header:
        metadata = json.loads(header[DIFFUSERS_METADATA_KEY])
        fields = {k[len(prefix) + 1:]: v for k, v in metadata.items() if k.startswith(prefix + ".")}
        for field in ("r", "lora_alpha"):
            if field not in fields:
                raise ValueError(f"{file}: {DIFFUSERS_METADATA_KEY} has no {prefix}.{field}")
        _check_plain_lora(fields, file)
        if lora_alpha is not None and lora_alpha != fields["lora_alpha"]:
            raise ValueError(f"{file}: lora_alpha={lora_alpha} given, but the file records {fields['lora_alpha']}")
    elif lora_alpha is None:
        raise ValueError(f"{file}: no {DIFFUSERS_METADATA_KEY} in the safetensors header, so lora_alpha is unknown "
                         f"(diffusers would assume lora_alpha = r = {ranks.pop()}): pass lora_alpha= (and "
                         f"use_rslora=True if so trained) as the adapter was trained")
    else:
        fields = {"r": ranks.pop(), "lora_alpha": lora_alpha, "use_rslora": use_rslora}
    fields["target_modules"] = "|".join(re.escape(n) for n in names)  # exactly the file's modules, as diffusers
    return _load_adapters(module, tensors, fields, file, dtype)


def convert_peft_lora(source: str | Path, out: str | Path, *, format: Literal["peft", "diffusers"]) -> Path:
    """Rewrite a PEFT LoRA directory in PEFT's or diffusers' format, with `target_modules` the full names of the
    modules its tensors adapt and a PEFT-valid init; returns the written weights file. Needs no model: r, lora_alpha
    and use_rslora come from its adapter_config.json. Files whose targets were the last name components ("proj",
    "2") or whose init PEFT rejects ("kaiming") come out loadable (docs/lora.md)."""
    config, tensors, _ = _read_peft(source)
    names = sorted({_module_name(k) for k in tensors})
    # Targets that already name exactly these modules (our own exports) are kept, the exact regex form included.
    targets = config.get("target_modules")
    targets = targets if targets in (names, "|".join(re.escape(n) for n in names)) else names
    fields = _lora_fields(config["r"], config["lora_alpha"], targets, use_rslora=config.get("use_rslora", False),
                          dropout=config.get("lora_dropout", 0.0), init=config.get("init_lora_weights", True))
    if format == "peft":
        return _write_peft(out, tensors, fields, config.get("base_model_name_or_path")) / ADAPTER_WEIGHTS
    if format == "diffusers":
        return _write_diffusers(out, tensors, fields, "transformer") / DIFFUSERS_WEIGHTS
    raise ValueError(f"format={format!r}: expected 'peft' or 'diffusers'")


__all__ = [
    "DEFAULT_TARGETS", "LoRALinear", "apply_lora", "convert_peft_lora", "disable_lora", "load_diffusers_lora",
    "load_peft", "lora_modules", "lora_parameters", "lora_state_dict", "mark_only_lora_trainable", "merge_lora",
    "save_diffusers_lora", "save_peft", "unmerge_lora",
]
