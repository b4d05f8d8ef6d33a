"""`VLMReward`: the Identity-GRPO identity reward model (Qwen2.5-VL-3B + LoRA + a bias-free `rm_head`
read at the `<|SA_reward|>` token), on idgrpo's own Qwen2.5-VL, processor and LoRA.

    reward = VLMReward.from_pretrained("Qwen2.5-VL-3B-Instruct", "identity_reward/checkpoint-1000",
                                       dtype=torch.bfloat16, device="cuda")
    scores = reward.score(frames, references, prompts)   # frames uint8 (B, T, H, W, 3) on device -> (B,) fp32

Each sample is one user turn (docs/models.md#reward-head-and-reward-token): every reference image
("Picture k: ..."), then the video
(5 frames requested -> 4 used, sampled uniformly), then the subject-alignment instruction ending in the
reward token. The reward is the raw `rm_head` output at that token, read from the hidden state after
the final norm (the LM head is not used).

Checkpoint directory (as published): `adapter_model.safetensors` + `adapter_config.json` (PEFT LoRA on the
language model) and `non_lora_state_dict.pth` (or `.safetensors`): the trained non-LoRA tensors (rm_head,
resized embeddings, vision tower, merger) under PEFT names `base_model.model.<name>`. Both the transformers
<= 4.51 names (`model.layers...`, `visual...`) and the >= 4.52 names (`model.language_model...`,
`model.visual...`) are read. A tokenizer.json in the checkpoint directory wins over the base model's.

Training (`idgrpo train-reward --model vlm`, wired in idgrpo/reward/train.py): `build_vlm_reward_for_training`
returns the model with LoRA on every LLM Linear, the embeddings resized to the tokenizer, `rm_head`,
optionally the vision tower trainable; `VLMReward.rewards(...)` is the differentiable (B,) forward for the
BT/BTT losses; `VLMReward.save(...)` writes the published layout.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from idgrpo.models.lora import apply_lora, load_peft, lora_parameters, save_peft
from idgrpo.models.qwen2_5_vl import (
    Qwen2_5_VL,
    Qwen2_5_VLConfig,
    load_qwen2_5_vl,
    to_checkpoint_key,
    to_new_hf_key,
)
from idgrpo.models.qwen_processor import QwenBatch, QwenProcessor, QwenProcessorConfig
from idgrpo.models.weights import CheckpointError, refuse_nonfinite

PEFT_PREFIX = "base_model.model."
NON_LORA_FILES = ("non_lora_state_dict.safetensors", "non_lora_state_dict.pth")
REWARD_TOKEN = "<|SA_reward|>"
# Its id is 151665, the first free id of the 151,665-token Qwen2.5 tokenizer: the published Identity-GRPO reward's
# config.json (outputs/identity_reward/config.json) has vocab_size 151666, its embeddings resized to the tokenizer
# plus this one token. `QwenProcessor` appends added tokens after the vocabulary, which gives the same id.
# Note: written for idgrpo, not the Identity-GRPO rubric: same layout and the same ending ("... subject alignment:
# <|SA_reward|>\nEND"). The published checkpoint was trained with the `subject_alignment_special` template
# (SUBJECT_ALIGNMENT_PROMPT_WITH_SPECIAL_TOKEN in alibaba/identity-grpo vace_reward/prompt_template.py): a
# face-similarity rubric that does not include the caption. To score with that checkpoint, read its text with
# `read_instruction` (or let `published_scoring_config` do it; docs/recipe.md, "Reward scoring").
SUBJECT_ALIGNMENT_INSTRUCTION = (
    "The pictures above are reference images of the subjects, and the video was generated from the caption "
    "\"{prompt}\". Judge subject alignment: does every person in the video keep the identity of their reference "
    "image (face, hair, build, clothing) in every frame, without identities swapping, blending, drifting, being "
    "cloned or missing? Please provide the rating of subject alignment: " + REWARD_TOKEN + "\nEND")
# Every Linear of the language model (LoRA targets of the recipe; not the vision tower, lm_head or rm_head).
LLM_LINEARS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
REWARD_CONFIG_FILE = "reward_config.json"
# The published reward's training configuration (in its checkpoint's parent directory, outputs/identity_reward), and
# the template constant its `prompt_template_type` "subject_alignment_special" selects in prompt_template.py.
PUBLISHED_CONFIG_FILE = "model_config.json"
PUBLISHED_TEMPLATE_TYPE = "subject_alignment_special"
PUBLISHED_TEMPLATE_NAME = "SUBJECT_ALIGNMENT_PROMPT_WITH_SPECIAL_TOKEN"
# The official GRPO loop writes every rollout to an mp4 with diffusers' `export_to_video`, whose default rate is
# 10 fps, and the reward reads the rate from the file: the sampled frames' temporal positions follow from 10 fps.
IDENTITY_GRPO_VIDEO_FPS = 10.0


@dataclass
class VLMRewardConfig:
    reward_token: str = REWARD_TOKEN
    """Special token whose final hidden state the rm_head reads."""
    instruction: str = SUBJECT_ALIGNMENT_INSTRUCTION
    """Text after the video; `{prompt}` is replaced by the video's prompt; must contain reward_token."""
    num_frames: int = 5
    """Frames requested per video (rounded to a multiple of 2: 5 -> 4, as the reference)."""
    fps: float = 16.0
    """Frame rate of the scored videos: with num_frames it sets the sampled frames' temporal M-RoPE positions.
    Wan generates 16 fps video; the official GRPO loop scores its rollouts at 10 fps (`IDENTITY_GRPO_VIDEO_FPS`)."""
    max_pixels: int = 399_360
    """Pixel budget of reference images and video frames."""
    video_min_pixels: int = 128 * 28 * 28
    """Smallest frame size in pixels (smaller frames are upscaled, as qwen_vl_utils does)."""
    lora_rank: int = 64
    """LoRA rank for training (a loaded checkpoint uses its own adapter_config.json)."""
    lora_alpha: float = 128.0
    """LoRA alpha for training."""
    lora_dropout: float = 0.05
    """LoRA dropout for training."""

    def __post_init__(self):
        if self.reward_token not in self.instruction:
            raise ValueError(f"instruction must contain the reward token {self.reward_token!r}")
        if self.num_frames < 1 or self.fps <= 0 or self.max_pixels < 28 * 28:
            raise ValueError("num_frames >= 1, fps > 0 and max_pixels >= 784 are required")

    def save(self, path: str | Path) -> Path:
        """Write the settings as JSON (the `reward_config.json` of a checkpoint directory)."""
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> VLMRewardConfig:
        """Read settings written by `save`; an unknown field or a value of the wrong type names the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the reward settings ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of VLMRewardConfig fields")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{path}: unknown VLMRewardConfig fields {unknown}")
        for name, value in data.items():
            kinds = {"str": str, "int": int, "float": (int, float)}[fields[name].type]
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"{path}: field {name!r} must be {fields[name].type}, got {value!r}")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def read_instruction(source: str | Path) -> str:
    """An instruction text from a file, exactly as stored (leading and trailing whitespace included: it is part of
    the tokenized prompt). A Python file gives one module-level string constant, read with `ast` (the file is not
    run): `prompt_template.py:NAME`, by default `PUBLISHED_TEMPLATE_NAME`, so the official
    `vace_reward/prompt_template.py` yields the published reward's rubric. Any other file is the text itself."""
    source = str(source)
    path, _, name = source.partition(".py:")
    path, name = (path + ".py", name) if name else (source, PUBLISHED_TEMPLATE_NAME)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: instruction file not found")
    text = file.read_text(encoding="utf-8")
    if file.suffix != ".py":
        return text
    try:
        module = ast.parse(text, filename=str(file))
    except SyntaxError as e:
        raise ValueError(f"{file}: not a readable Python file ({e})") from e
    for node in module.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise ValueError(f"{file}: no module-level string constant {name!r}")


def published_scoring_config(checkpoint: str | Path, instruction: str) -> VLMRewardConfig:
    """How the official GRPO loop scores with a published-layout reward checkpoint: the frame count and pixel budget
    of its `model_config.json` (`data_config`, in the checkpoint directory or its parent; the published values when
    there is none), `instruction` (its template's text, see `read_instruction`) and 10 fps."""
    checkpoint = Path(checkpoint)
    config = VLMRewardConfig(instruction=instruction, fps=IDENTITY_GRPO_VIDEO_FPS)
    found = [f for f in (checkpoint / PUBLISHED_CONFIG_FILE, checkpoint.parent / PUBLISHED_CONFIG_FILE) if f.is_file()]
    if not found:
        return config
    file = found[0]
    try:
        data = json.loads(file.read_text()).get("data_config")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{file}: cannot read the reward's data_config ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: no data_config object")
    template = data.get("prompt_template_type")
    if template != PUBLISHED_TEMPLATE_TYPE:
        raise ValueError(f"{file}: data_config.prompt_template_type is {template!r}; only {PUBLISHED_TEMPLATE_TYPE!r} "
                         f"(one reward token, no caption) is supported")
    if data.get("num_frames") is None:
        raise ValueError(f"{file}: data_config.num_frames is null (frames sampled by fps), which idgrpo does not "
                         f"support; the published reward requests 5 frames")
    changes = {"num_frames": data["num_frames"], "max_pixels": data.get("max_frame_pixels", config.max_pixels)}
    for name, value in changes.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ValueError(f"{file}: data_config value for {name} must be a whole number, got {value!r}")
    return replace(config, **{name: int(value) for name, value in changes.items()})


class VLMReward(nn.Module):
    """Qwen2.5-VL backbone + `rm_head` Linear(hidden, 1, bias=False) at the reward token."""

    def __init__(self, backbone: Qwen2_5_VL, processor: QwenProcessor, config: VLMRewardConfig | None = None):
        super().__init__()
        self.config = config or VLMRewardConfig()
        self.backbone = backbone
        self.processor = processor
        c = backbone.config
        self.reward_token_id = processor.token_id(self.config.reward_token)
        for name, ours in (("<|image_pad|>", c.image_token_id), ("<|video_pad|>", c.video_token_id)):
            if processor.token_id(name) != ours:
                raise ValueError(f"tokenizer id of {name} ({processor.token_id(name)}) differs from the model "
                                 f"config's ({ours})")
        if self.reward_token_id >= c.vocab_size:
            raise ValueError(f"reward token id {self.reward_token_id} is outside the model's {c.vocab_size} "
                             f"embeddings (resize_embeddings first)")
        processor.config = replace(processor.config, patch_size=c.vision.patch_size,
                                   temporal_patch_size=c.vision.temporal_patch_size,
                                   merge_size=c.vision.spatial_merge_size, tokens_per_second=c.vision.tokens_per_second,
                                   num_frames=self.config.num_frames, image_max_pixels=self.config.max_pixels,
                                   video_max_pixels=self.config.max_pixels,
                                   video_min_pixels=min(self.config.video_min_pixels, self.config.max_pixels))
        weight = backbone.model.embed_tokens.weight
        self.rm_head = nn.Linear(c.hidden_size, 1, bias=False, device=weight.device, dtype=weight.dtype)

    # ------------------------------------------------------------------------- inputs

    def conversations(self, frames: torch.Tensor, references: list[list[torch.Tensor]],
                      prompts: list[str]) -> list[list[dict]]:
        """One user turn per video: the references, the video, the instruction
        (docs/models.md#reward-head-and-reward-token)."""
        if frames.dim() != 5 or frames.dtype != torch.uint8 or frames.shape[-1] != 3:
            raise ValueError(f"frames: expected uint8 (B, T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        if not len(references) == len(prompts) == frames.shape[0]:
            raise ValueError(f"batch of {frames.shape[0]} videos with {len(references)} reference lists and "
                             f"{len(prompts)} prompts")
        rows = []
        for video, refs, prompt in zip(frames, references, prompts):
            content = [{"type": "image", "image": ref} for ref in refs]
            content.append({"type": "video", "video": video, "fps": self.config.fps})
            content.append({"type": "text", "text": self.config.instruction.replace("{prompt}", prompt)})
            rows.append(content)
        return rows

    def encode(self, frames, references, prompts) -> QwenBatch:
        """Processor batch on frames.device (grids on the host), checked to hold one reward token per row."""
        batch = self.processor(self.conversations(frames, references, prompts))
        counts = (batch.input_ids == self.reward_token_id).sum(-1)  # host tensor: no device sync
        if not torch.all(counts == 1):
            raise ValueError(f"every row needs exactly one {self.config.reward_token}; found {counts.tolist()}")
        return batch.to(frames.device)

    # ------------------------------------------------------------------------- forward

    def set_attention_impl(self, impl: str) -> None:
        """"idgrpo" (our kernel, default) or "sdpa" (torch SDPA) in the backbone from now on: the same switch as the
        compact `IdentityRewardModel` and `WanDiT`, so callers need not know which reward model they hold."""
        self.backbone.set_attention_impl(impl)

    def forward(self, batch: QwenBatch) -> torch.Tensor:
        """(B,) fp32 rewards: rm_head of the final-normed hidden state at the reward token."""
        hidden = self.backbone(batch.input_ids, batch.position_ids, **batch.model_inputs())  # (B, L, C)
        # Exactly one reward token per row (checked in `encode`), so its index is the argmax of the match.
        position = (batch.input_ids == self.reward_token_id).int().argmax(dim=-1)  # (B,)
        at_token = hidden[torch.arange(hidden.shape[0], device=hidden.device), position]  # (B, C)
        return self.rm_head(at_token.to(self.rm_head.weight.dtype)).squeeze(-1).float()

    def rewards(self, frames: torch.Tensor, references: list[list[torch.Tensor]], prompts: list[str]) -> torch.Tensor:
        """Differentiable (B,) rewards from raw frames (training)."""
        return self(self.encode(frames, references, prompts))

    @torch.no_grad()
    def score(self, frames: torch.Tensor, references: list[list[torch.Tensor]], prompts: list[str]) -> torch.Tensor:
        """The reward interface: frames uint8 (B, T, H, W, 3), references per video (uint8 (h, w, 3) each),
        prompts -> (B,) fp32 on frames.device."""
        was_training = self.training
        self.eval()
        try:
            return self.rewards(frames, references, prompts)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, base: str | Path, checkpoint: str | Path | None = None, *,
                        config: VLMRewardConfig | None = None, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu") -> VLMReward:
        """Base model directory (HF layout + tokenizer.json) plus, optionally, a reward checkpoint directory
        (PEFT adapters + non-LoRA state). Without a checkpoint, rm_head is freshly initialised. Without `config`,
        the checkpoint's own `reward_config.json` when it has one, else the defaults."""
        base, checkpoint = Path(base), Path(checkpoint) if checkpoint is not None else None
        if config is None and checkpoint is not None and (checkpoint / REWARD_CONFIG_FILE).is_file():
            config = VLMRewardConfig.load(checkpoint / REWARD_CONFIG_FILE)
        config = config or VLMRewardConfig()
        non_lora = _read_non_lora(checkpoint) if checkpoint is not None else {}
        backbone = load_qwen2_5_vl(base, dtype=dtype, device=device)
        tokenizer_dir = checkpoint if checkpoint is not None and (checkpoint / "tokenizer.json").is_file() else base
        processor = QwenProcessor.from_pretrained(tokenizer_dir, QwenProcessorConfig(),
                                                  extra_special_tokens=[config.reward_token])
        embed = non_lora.get("model.embed_tokens.weight")
        if embed is not None and embed.shape[0] != backbone.config.vocab_size:
            resize_embeddings(backbone, embed.shape[0])
        model = cls(backbone, processor, config)
        if checkpoint is not None:
            model.load_checkpoint(checkpoint, non_lora)
        return model.to(device)

    def load_checkpoint(self, directory: str | Path, non_lora: dict[str, torch.Tensor] | None = None) -> None:
        """Load PEFT adapters (when present) and the non-LoRA state of a reward checkpoint directory."""
        directory = Path(directory)
        if (directory / "adapter_model.safetensors").is_file():
            _load_adapters(self.backbone, directory)
        non_lora = _read_non_lora(directory) if non_lora is None else non_lora
        if "rm_head.weight" not in non_lora:
            raise CheckpointError(f"{directory}: the non-LoRA state has no rm_head.weight")
        params = {**{f"backbone.{k}": v for k, v in self.backbone.named_parameters()},
                  "rm_head.weight": self.rm_head.weight}
        tied = self.backbone.config.tie_word_embeddings
        problems = []
        for name, tensor in non_lora.items():
            if name == "lm_head.weight" and tied:
                continue  # the tied head is the embedding itself
            target = params.get(name if name == "rm_head.weight" else f"backbone.{name}")
            if target is None:
                problems.append(f"    {name}: no such parameter")
            elif tuple(target.shape) != tuple(tensor.shape):
                problems.append(f"    {name}: file {tuple(tensor.shape)} vs model {tuple(target.shape)}")
        if problems:
            raise CheckpointError(f"{directory}: non-LoRA state does not fit the model:\n" + "\n".join(problems))
        with torch.no_grad():
            for name, tensor in non_lora.items():
                if name == "lm_head.weight" and tied:
                    continue
                target = params[name if name == "rm_head.weight" else f"backbone.{name}"]
                target.copy_(tensor)

    def save(self, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
        """Write the published layout: PEFT adapters + `non_lora_state_dict.safetensors` (rm_head, embeddings,
        and the vision tower when it is trainable) + tokenizer.json + reward_config.json."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if any(True for _ in lora_parameters(self.backbone)):
            # transformers >= 4.52 module names (`model.language_model.layers...`), which peft matches on today's
            # Qwen2.5-VL; `load_checkpoint` reads both namings.
            save_peft(self.backbone, directory, base_model_name_or_path=base_model_name_or_path, rename=to_new_hf_key)
        state = {"rm_head.weight": self.rm_head.weight, "model.embed_tokens.weight":
                 self.backbone.model.embed_tokens.weight}
        state.update({k: v for k, v in self.backbone.named_parameters()
                      if k.startswith("visual.") and v.requires_grad})
        save_file({PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(directory / NON_LORA_FILES[0]), metadata={"format": "pt"})
        self.processor.tokenizer.save(str(directory / "tokenizer.json"))
        self.config.save(directory / REWARD_CONFIG_FILE)
        return directory

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def resize_embeddings(backbone: Qwen2_5_VL, rows: int) -> None:
    """`resize_token_embeddings`: keep the first min(old, rows) rows; new rows get the mean embedding.
    The tied LM head follows; an untied one is resized the same way."""
    old = backbone.model.embed_tokens
    new = nn.Embedding(rows, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    keep = min(rows, old.num_embeddings)
    with torch.no_grad():
        new.weight[:keep] = old.weight[:keep]
        if rows > keep:
            new.weight[keep:] = old.weight.float().mean(0).to(old.weight.dtype)
    backbone.model.embed_tokens = new
    if backbone.lm_head is not None:
        head = nn.Linear(old.embedding_dim, rows, bias=False, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            head.weight[:keep] = backbone.lm_head.weight[:keep]
            if rows > keep:
                head.weight[keep:] = 0
        backbone.lm_head = head
    backbone.config = replace(backbone.config, vocab_size=rows)


def _strip(name: str) -> str:
    """PEFT / transformers name -> our backbone name (`rm_head.weight` stays)."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return to_checkpoint_key(name)


def _read_non_lora(directory: Path) -> dict[str, torch.Tensor]:
    for file_name in NON_LORA_FILES:
        file = directory / file_name
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            try:  # tensors only: pickled code is never executed
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - re-raised with the file name
                raise CheckpointError(f"{file}: cannot read as a weights-only state dict ({e})") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file}: expected a flat dict of tensors")
        return {_strip(k): refuse_nonfinite(file, k, v) for k, v in state.items()}
    raise CheckpointError(f"{directory}: no {' or '.join(NON_LORA_FILES)} (the reward checkpoint's rm_head and "
                          f"resized embeddings)")


def _load_adapters(backbone: Qwen2_5_VL, directory: Path) -> None:
    """`load_peft`, after mapping transformers >= 4.52 module names (`model.language_model.layers...`) in
    the adapter file and its target list to ours."""
    from safetensors.torch import load_file, save_file

    config = json.loads((directory / "adapter_config.json").read_text())
    weights_file = directory / "adapter_model.safetensors"
    tensors = {k: refuse_nonfinite(weights_file, k, v) for k, v in load_file(str(weights_file)).items()}
    new_names = any(".language_model." in k or k.startswith(PEFT_PREFIX + "model.visual.") for k in tensors)
    if not new_names:
        load_peft(backbone, directory)
        return
    targets = config.get("target_modules")
    if isinstance(targets, list):
        config["target_modules"] = [to_checkpoint_key(t) for t in targets]
    elif isinstance(targets, str):
        config["target_modules"] = targets.replace(r"language_model\.", "").replace("language_model.", "")
    with tempfile.TemporaryDirectory() as tmp:
        renamed = {PEFT_PREFIX + _strip(k): v for k, v in tensors.items()}
        save_file(renamed, str(Path(tmp) / "adapter_model.safetensors"))
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(config))
        load_peft(backbone, tmp)


def build_vlm_reward_for_training(base: str | Path | None, config: VLMRewardConfig | None = None, *,
                                  preset: str = "3b", tokenizer: str | Path | None = None,
                                  train_vision: bool = True, dtype: torch.dtype = torch.float32,
                                  device: torch.device | str = "cpu", seed: int = 0) -> VLMReward:
    """The model `idgrpo train-reward --model vlm` trains: base weights from `base` (or a random `preset`
    when None, with `tokenizer` naming a tokenizer.json), the embeddings resized to the tokenizer with the
    reward token added (as the reference's `resize_token_embeddings(len(tokenizer))`), LoRA (rank/alpha/
    dropout of `config`) on every LLM Linear, and trainable: the adapters, rm_head, the embeddings and, with
    `train_vision`, the vision tower and merger. Everything else is frozen."""
    config = config or VLMRewardConfig()
    torch.manual_seed(seed)
    if base is not None:
        backbone = load_qwen2_5_vl(base, dtype=dtype, device=device)
        tokenizer = tokenizer or base
    else:
        if tokenizer is None:
            raise ValueError("a random-preset reward model needs tokenizer= (a tokenizer.json or its directory)")
        backbone = Qwen2_5_VL(Qwen2_5_VLConfig.from_name(preset)).to(device=device, dtype=dtype)
    processor = QwenProcessor.from_pretrained(tokenizer, extra_special_tokens=[config.reward_token])
    rows = processor.tokenizer.get_vocab_size(with_added_tokens=True)
    if rows != backbone.config.vocab_size:
        resize_embeddings(backbone, rows)
    model = VLMReward(backbone, processor, config)
    nn.init.normal_(model.rm_head.weight, std=1.0 / backbone.config.hidden_size ** 0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(backbone, config.lora_rank, config.lora_alpha, LLM_LINEARS, dropout=config.lora_dropout,
               dtype=torch.float32)
    for p in lora_parameters(backbone):
        p.requires_grad_(True)
    model.rm_head.weight.requires_grad_(True)
    backbone.model.embed_tokens.weight.requires_grad_(True)
    if train_vision:
        for p in backbone.visual.parameters():
            p.requires_grad_(True)
    return model


__all__ = ["IDENTITY_GRPO_VIDEO_FPS", "LLM_LINEARS", "REWARD_CONFIG_FILE", "REWARD_TOKEN",
           "SUBJECT_ALIGNMENT_INSTRUCTION", "VLMReward", "VLMRewardConfig", "build_vlm_reward_for_training",
           "published_scoring_config", "read_instruction", "resize_embeddings"]
