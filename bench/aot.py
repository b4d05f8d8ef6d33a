"""Every Triton kernel of idgrpo/kernels compiled ahead of time for Ampere (sm_80) and Hopper (sm_90),
with Triton's own compiler, on a machine without a GPU.

The kernels' launch arguments are not written down twice: each case calls a public op
(`attention`, `grpo_loss`, `rms_norm`, ...) with the Triton path forced on `meta` tensors of
real model shapes (Wan 32760-token videos, GRPO latents, ...), forward and backward, and
records every kernel launch instead of running it. Each recorded launch goes through Triton's
own argument specialisation (the integer == 1 and divisible-by-16 rules the JIT applies on a
GPU) and is compiled for every autotune config the launch would try (after the kernel's own
config pruning) and for each target. Per compiled kernel the table gives shared memory
(Triton's metadata), registers and local memory (`cuobjdump --dump-resource-usage` on the
cubin: the per-thread stack frame is where ptxas spills registers, and what Triton's own
`n_spills` counts on a GPU),
how its matmuls lowered (wgmma, mma.sync, or fma: no tensor cores) and the compile time.

It fails when a kernel does not compile, when its shared memory exceeds what one block may
use on the target (Triton refuses to launch such a kernel), or when a bf16 or fp16 kernel of
the hot path (attention, the GRPO step, the GRPO and DiffusionNFT losses) spills. Spills
elsewhere are reported, not failed.

Triton: torch 2.13.0's CUDA wheel pins triton==3.7.1 (`TORCH_2_13_TRITON`), which is what a
GPU machine's `pip install torch==2.13.0` compiles with; `--pinned-triton` runs this check in
a side environment with that version (made on first use from the package index). Without it
the check uses whichever Triton is importable (the newest works too).

Usage:
    python -m bench aot                      # every kernel, both targets, all dtypes (minutes)
    python -m bench aot --quick              # a small subset: proves the machinery (CI)
    python -m bench.aot --pinned-triton      # the same under triton==3.7.1
    python -m bench.aot --only attention --targets sm_90 --dtypes bf16 --jobs 16
Results: the table is printed last and written, with the JSON, to bench/results/aot-<date>.{txt,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import venv
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
# The triton that torch 2.13.0's CUDA wheel requires (its `Requires-Dist: triton==...`).
TORCH_2_13_TRITON = "3.7.1"
PINNED_VENV = Path.home() / ".cache" / "idgrpo" / f"triton-{TORCH_2_13_TRITON}"
# (compute capability, shared memory one block may use). Triton refuses a launch above the
# device's opt-in per-block limit, which is 1 KB under the per-SM figure: 227 KB of the
# H100's 228 KB, 163 KB of the A100's 164 KB.
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
DTYPES = ("bf16", "fp16", "fp32")
# Modules whose kernels are on the hot path (attention, the sampler step and the training losses): a bf16 or
# fp16 spill there fails the check.
HOT_MODULES = ("idgrpo.kernels.attention", "idgrpo.kernels.grpo_loss", "idgrpo.kernels.nft_loss")
COLUMNS = ["kernel", "target", "dtype", "case", "config", "shared_KB", "regs", "spill_B", "matmul", "compile_s",
           "status"]


# ----------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: object  # a triton JITFunction or Autotuner
    args: tuple
    kwargs: dict
    phase: str = "fwd"  # "bwd" when launched from an autograd backward


_phase = ["fwd"]  # what `_backward` is running, for the launches it records


@contextlib.contextmanager
def capturing() -> Iterator[list[Launch]]:
    """Inside: every `kernel[grid](...)` is recorded, not run, and every op takes its Triton path
    whatever the device (meta tensors allocate nothing, so real model shapes cost nothing)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from idgrpo.kernels import backend

    launches: list[Launch] = []

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, _phase[0]))

    def record_autotuned(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(self, args, kwargs, _phase[0]))

    with mock.patch.object(JITFunction, "run", record_jit), mock.patch.object(Autotuner, "run", record_autotuned), \
            mock.patch.object(backend, "choose", lambda choice, on_cuda: "triton"):
        yield launches


# ----------------------------------------------------------------------------------------
# Compile jobs
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: a kernel (by module and name, so a worker process can import it), the
    signature / constexprs / attributes the JIT would build for the launch, and options."""

    module: str
    name: str
    target: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple
    case: str
    dtype: str
    config: str
    hot: bool

    def key(self) -> tuple:
        return self.module, self.name, self.target, self.signature, self.constexprs, self.attrs, self.options


def _jit_function(kernel):
    """The JITFunction under an autotuner (or the kernel itself)."""
    from triton.runtime.autotuner import Autotuner

    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def _placeholder(value):
    """A CPU stand-in for a (meta) tensor argument: same dtype, same 16-byte alignment, so
    Triton's specialisation reads it as it would the real GPU tensor."""
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    base = torch.empty(32, dtype=value.dtype)
    aligned = value.storage_offset() * value.element_size() % 16 == 0
    return base if aligned else base[1:]


def _specialise(jit, values: dict, target: str) -> tuple[tuple, tuple, tuple]:
    """(signature, constexprs, attrs) as Triton's JIT builds them for these argument values."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", TARGETS[target][0], 32))
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(jit.params):
        if param.name not in values:
            raise TypeError(f"{jit.fn.__name__}: launch is missing argument {param.name!r}")
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(type(backend), _placeholder(value), getattr(param, "is_const", False),
                                            not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":  # an integer 1 (or None) becomes a compile-time constant
            signature[param.name], constexprs[param.name] = "constexpr", spec
        else:
            signature[param.name] = kind
            if isinstance(spec, str) and spec:
                attrs[(index,)] = backend.parse_attr(spec)
    freeze = lambda d: tuple((k, json.dumps(v) if isinstance(v, list) else v) for k, v in d.items())  # noqa: E731
    return freeze(signature), freeze(constexprs), freeze(attrs)


def _config_label(kwargs: dict, options: dict) -> str:
    parts = [f"{k}={v}" for k, v in kwargs.items()]
    parts += [f"w{options['num_warps']}"] if "num_warps" in options else []
    parts += [f"s{options['num_stages']}"] if "num_stages" in options else []
    parts += [f"maxnreg={options['maxnreg']}"] if options.get("maxnreg") else []
    return " ".join(parts) or "default"


@contextlib.contextmanager
def target_device(target: str) -> Iterator[None]:
    """Inside: `torch.cuda.get_device_capability()` answers with the target's capability, so a
    kernel's config pruning picks the configs it would pick on that GPU."""
    major, minor = divmod(TARGETS[target][0], 10)
    with mock.patch("torch.cuda.get_device_capability", lambda device=None: (major, minor)):
        yield


def jobs_for(launch: Launch, *, target: str, case: str, dtype: str, hot: bool | None = None) -> list[Job]:
    """The compiles one launch stands for on `target`: one per autotune config it would try."""
    from triton.runtime.autotuner import Autotuner

    jit = _jit_function(launch.kernel)
    names = jit.arg_names
    values = dict(zip(names, launch.args)) | {k: v for k, v in launch.kwargs.items() if k in names}
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    variants = [({}, {})]
    if isinstance(launch.kernel, Autotuner):
        configs = launch.kernel.configs
        if launch.kernel.early_config_prune:  # as the autotuner prunes: positional args by name, kwargs as given
            with target_device(target):  # on a GPU of the target (attention keeps per-target config lists)
                configs = launch.kernel.early_config_prune(configs, dict(zip(names, launch.args)), **launch.kwargs)
        variants = [(cfg.kwargs, {k: v for k, v in cfg.all_kwargs().items() if k not in cfg.kwargs
                                  and k not in ("ir_override",)}) for cfg in configs]
    module = jit.fn.__module__
    jobs = []
    for cfg_kwargs, cfg_options in variants:
        signature, constexprs, attrs = _specialise(jit, values | cfg_kwargs, target)
        all_options = options | cfg_options
        jobs.append(Job(module=module, name=jit.fn.__name__, target=target, signature=signature,
                        constexprs=constexprs, attrs=attrs, options=tuple(sorted(all_options.items())), case=case,
                        dtype=dtype, config=_config_label(cfg_kwargs, all_options),
                        hot=module.startswith(HOT_MODULES) if hot is None else hot))
    return jobs


def _load_kernel(module: str, name: str):
    return _jit_function(getattr(importlib.import_module(module), name))


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, SHARED, LOCAL, STACK, ... of the one function in a cubin, read with cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    line = next((ln for ln in out.splitlines() if "REG:" in ln), None)
    if line is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}


def _matmul_lowering(asm: dict) -> str:
    """How the kernel's tl.dot lowered: wgmma (Hopper tensor cores), mma (mma.sync), fma (none)."""
    if "tt.dot" not in asm.get("ttir", ""):
        return "-"
    ptx = asm["ptx"]
    return "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma"


def compile_job(job: Job) -> dict:
    """Compile one job; a row of the table (with `error` set when it did not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = {"kernel": job.name, "target": job.target, "dtype": job.dtype, "case": job.case, "config": job.config,
           "hot": job.hot, "module": job.module, "error": None}
    t0 = time.perf_counter()
    try:
        fn = _load_kernel(job.module, job.name)
        source = triton.compiler.ASTSource(fn=fn, signature=dict(job.signature), constexprs=dict(job.constexprs),
                                           attrs={k: json.loads(v) for k, v in job.attrs})
        compiled = triton.compile(source, target=GPUTarget("cuda", TARGETS[job.target][0], 32),
                                  options=dict(job.options))
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as e:  # a kernel that does not compile is a row of the table, not a crash
        message = "".join(traceback.format_exception_only(type(e), e)).strip()
        return row | {"error": message, "compile_s": time.perf_counter() - t0}
    return row | {
        "compile_s": time.perf_counter() - t0,
        "shared_B": compiled.metadata.shared,
        "shared_KB": compiled.metadata.shared / 1024,
        "regs": usage["REG"],
        # ptxas puts spilled registers in the thread's stack frame (cuobjdump's STACK; LOCAL
        # stays 0): the driver's local size per thread, which Triton's n_spills counts in words.
        "spill_B": usage.get("STACK", 0) + usage.get("LOCAL", 0),
        "matmul": _matmul_lowering(compiled.asm),
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
    }


def problems(row: dict) -> list[str]:
    """Why a row fails the check (empty: it passes)."""
    if row.get("uncovered"):
        return ["no case of bench/aot.py launches this kernel"]
    if row.get("error"):
        return [f"does not compile: {row['error'].splitlines()[-1][:200]}"]
    found = []
    limit = TARGETS[row["target"]][1]
    if row["shared_B"] > limit:
        found.append(f"shared memory {row['shared_B'] / 1024:.0f} KB > {limit // 1024} KB")
    if row["spill_B"] and row["hot"] and row["dtype"] in ("bf16", "fp16"):
        found.append(f"spills {row['spill_B']} B per thread on the {row['dtype']} hot path")
    return found


def with_status(row: dict) -> dict:
    found = problems(row)
    status = "FAIL: " + "; ".join(found) if found else "spills" if row.get("spill_B") else "ok"
    return row | {"status": status}


def run_jobs(jobs: list[Job], workers: int) -> list[dict]:
    """Compile every distinct job (in `workers` processes): one row each, labelled with the first
    case and dtype that reach it."""
    unique: dict[tuple, Job] = {}
    for job in jobs:
        unique.setdefault(job.key(), job)
    todo = list(unique.values())
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            results = map(compile_job, todo)
        else:
            import multiprocessing

            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(compile_job, todo)
        done = []
        for row in results:  # progress on stderr: the full table takes minutes
            done.append(row)
            line = with_status(row)
            print(f"[{len(done)}/{len(todo)}] {line['kernel']} {line['target']} {line['dtype']} [{line['case']}] "
                  f"{line['config']}: shared {line.get('shared_KB')} KB, regs {line.get('regs')}, spill "
                  f"{line.get('spill_B')} B, {line.get('matmul')}, {line['compile_s']:.1f} s: {line['status']}",
                  file=sys.stderr, flush=True)
    return [with_status(row) for row in done]


# ----------------------------------------------------------------------------------------
# Cases: the launches of every op at representative shapes
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    name: str
    run: Callable  # run(torch dtype): call the op(s), forward and backward, on meta tensors


def _meta(*shape, dtype, grad=False):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _backward(out, *inputs):
    import torch

    _phase[0] = "bwd"
    try:
        torch.autograd.grad(out, inputs, torch.empty_like(out))
    finally:
        _phase[0] = "fwd"


def _attention_case(head_dim: int, causal: bool, varlen: bool, k_lens: bool = False) -> Case:
    """Wan self-attention (1 x 32760 x 12 heads), cross-attention to 512 padded text keys, a
    causal GQA language model (16 query / 2 kv heads) or packed Qwen-ViT windows (varlen)."""
    import torch

    from idgrpo.kernels.attention import attention

    def run(dtype):
        heads, kv_heads = (16, 2) if causal and not varlen else (12, 12)
        if varlen:
            lens = [64] * 28 + [16] * 4  # one image cut in 8x8 windows (bench/attention.py's qwenvit-window)
            tokens = sum(lens) * 8
            q = _meta(tokens, heads, head_dim, dtype=dtype, grad=True)
            k, v = (_meta(tokens, kv_heads, head_dim, dtype=dtype, grad=True) for _ in range(2))
            cu = torch.empty(len(lens) * 8 + 1, dtype=torch.int32, device="meta")
            out = attention(q, k, v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64)
        else:
            len_k = 512 if k_lens else 32760
            q = _meta(1, 32760, heads, head_dim, dtype=dtype, grad=True)
            k, v = (_meta(1, len_k, kv_heads, head_dim, dtype=dtype, grad=True) for _ in range(2))
            lens = torch.empty(1, dtype=torch.int64, device="meta") if k_lens else None
            out = attention(q, k, v, causal=causal, k_lens=lens)
        _backward(out, q, k, v)

    label = f"d{head_dim} {'causal' if causal else 'full'} {'varlen' if varlen else 'dense'}"
    return Case(f"attention {label}{' k_lens' if k_lens else ''}", run)


def _grpo_case(deterministic: bool, with_ref: bool) -> Case:
    """The SDE step and the GRPO loss on a group of 8 Wan-1.3B latents (16 x 21 x 60 x 104)."""
    import torch

    from idgrpo.kernels.grpo_loss import grpo_loss, grpo_step

    def run(dtype):
        shape = (8, 16, 21, 60, 104)
        x, v, noise = (_meta(*shape, dtype=dtype) for _ in range(3))
        sigma = torch.empty(8, device="meta")
        grpo_step(x, v, sigma, sigma, sigma, None if deterministic else noise, deterministic=deterministic)
        velocity = _meta(*shape, dtype=dtype, grad=True)
        ref = _meta(*shape, dtype=dtype) if with_ref else None
        loss, _ = grpo_loss(x, x, velocity, sigma, sigma, sigma, sigma, sigma, ref_mean=ref)
        _backward(loss, velocity)

    return Case(f"grpo {'ode' if deterministic else 'sde'} step, loss{' + kl' if with_ref else ''}", run)


def _nft_case(with_kl: bool) -> Case:
    """The DiffusionNFT loss on a group of 8 Wan-1.3B latents, forward and backward."""
    import torch

    from idgrpo.kernels.nft_loss import nft_loss

    def run(dtype):
        shape = (8, 16, 21, 60, 104)
        v_new = _meta(*shape, dtype=dtype, grad=True)
        v_old, v_ref, x_t, x0 = (_meta(*shape, dtype=dtype) for _ in range(4))
        per_sample = torch.empty(8, device="meta")
        loss = nft_loss(v_new, v_old, v_ref if with_kl else None, x_t, x0, per_sample, per_sample, beta=0.1,
                        adv_clip_max=5.0, kl_beta=1e-4 if with_kl else 0.0)
        _backward(loss, v_new)

    return Case(f"nft loss{' + kl' if with_kl else ''}", run)


def _group_advantage_case(columns: int, std: str, unbiased: bool, clip: float | None) -> Case:
    """8192 rewards in groups of 8 (one or several reward columns)."""
    import torch

    from idgrpo.kernels.group_advantage import group_advantage

    def run(dtype):
        rewards = _meta(8192, columns, dtype=dtype) if columns > 1 else _meta(8192, dtype=dtype)
        ids = torch.empty(8192, dtype=torch.int64, device="meta")
        group_advantage(rewards, ids, std=std, unbiased=unbiased, clip=clip, num_groups=1024)

    return Case(f"group_advantage T={columns} std={std}{' ddof1' if unbiased else ''}{' clip' if clip else ''}", run)


def _norm_case(op: str, width: int) -> Case:
    """The DiT's norms and gated residual on 32760 tokens (Wan widths 1536 / 5120) and the VLM's
    RMSNorm (Qwen2.5-VL widths 2048 / 3584), forward and backward."""
    from idgrpo.kernels import norm

    def run(dtype):
        x = _meta(1, 32760, width, dtype=dtype, grad=True)
        w = _meta(width, dtype=dtype, grad=True)
        if op == "rms_norm":
            out, inputs = norm.rms_norm(x, w), (x, w)
        elif op == "layer_norm":
            b = _meta(width, dtype=dtype, grad=True)
            out, inputs = norm.layer_norm(x, w, b), (x, w, b)
        elif op == "layer_norm_modulate":
            shift, scale = (_meta(1, width, dtype=dtype, grad=True) for _ in range(2))
            out, inputs = norm.layer_norm_modulate(x, shift, scale), (x, shift, scale)
        else:
            y, gate = _meta(1, 32760, width, dtype=dtype, grad=True), _meta(1, width, dtype=dtype, grad=True)
            out, inputs = norm.gated_residual(x, y, gate), (x, y, gate)
        _backward(out, *inputs)

    return Case(f"{op} C={width}", run)


def _rope_case(heads: int, head_dim: int, interleaved: bool) -> Case:
    """Wan's 3-D RoPE on 32760 tokens; Qwen's M-RoPE with a per-sample table."""
    import torch

    from idgrpo.kernels.rope import apply_rope

    def run(dtype):
        x = _meta(1, 32760, heads, head_dim, dtype=dtype, grad=True)
        table = (32760, head_dim // 2) if interleaved else (1, 32760, head_dim // 2)
        cos, sin = (torch.empty(*table, device="meta") for _ in range(2))
        _backward(apply_rope(x, cos, sin, interleaved=interleaved), x)

    return Case(f"rope H={heads} D={head_dim} {'interleaved' if interleaved else 'rotate-half'}", run)


def all_cases() -> list[Case]:
    cases = [_attention_case(d, causal, varlen) for d in (128, 80, 64) for causal in (False, True)
             for varlen in (False, True)]
    cases.append(_attention_case(128, False, False, k_lens=True))
    cases += [_grpo_case(False, True), _grpo_case(True, False), _nft_case(True), _nft_case(False)]
    cases += [_group_advantage_case(1, "group", False, 5.0), _group_advantage_case(3, "global", True, None)]
    cases += [_norm_case(op, width) for op in ("rms_norm", "layer_norm", "layer_norm_modulate", "gated_residual")
              for width in (1536, 5120)]
    cases += [_norm_case("rms_norm", width) for width in (2048, 3584)]
    cases += [_rope_case(12, 128, True), _rope_case(40, 128, True), _rope_case(16, 128, False),
              _rope_case(16, 80, False)]
    return cases


def quick_selection() -> tuple[list[Case], dict]:
    """The CI subset: a memory-bound kernel, the attention delta kernel and one attention
    forward config, on both targets, bf16/fp32 (seconds per compile on 2 cores)."""
    cases = [_rope_case(12, 128, True), _attention_case(128, False, False),
             _group_advantage_case(1, "group", False, 5.0)]
    keep = {
        "_rope_kernel": {"bf16"},
        "_group_advantage_kernel": {"fp32"},
        "_attention_bwd_delta_kernel": {"bf16"},
        "_attention_fwd_kernel": {"bf16"},
    }
    return cases, keep


def kernels_defined() -> set[str]:
    """Every kernel of every module in idgrpo/kernels, as `module.name` (kernels are named `*_kernel`;
    the jit helpers they call are compiled inside them)."""
    import pkgutil

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    import idgrpo.kernels

    names = set()
    for info in pkgutil.iter_modules(idgrpo.kernels.__path__):
        module = importlib.import_module(f"idgrpo.kernels.{info.name}")
        names |= {f"{module.__name__}.{name}" for name, value in vars(module).items()
                  if name.endswith("_kernel") and isinstance(value, JITFunction | Autotuner)}
    return names


def uncovered_rows(jobs: list[Job], targets) -> list[dict]:
    """A failing row per kernel that no case launches: a new kernel needs a case here."""
    launched = {f"{job.module}.{job.name}" for job in jobs}
    return [{"kernel": name.rsplit(".", 1)[1], "module": name.rsplit(".", 1)[0], "target": target, "dtype": "",
             "case": "", "config": "", "hot": False, "error": None, "uncovered": True, "compile_s": 0.0}
            for name in sorted(kernels_defined() - launched) for target in targets]


def plan(cases: list[Case], targets, dtypes, keep: dict | None = None, only: str | None = None) -> list[Job]:
    """Every compile job of `cases` (filtered: `keep` maps kernel -> dtypes; `only` matches a case
    or kernel name). The quick subset keeps only the first config of an autotuned kernel."""
    import torch

    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    jobs = []
    for case in cases:
        for dtype in dtypes:
            with capturing() as launches:
                case.run(torch_dtypes[dtype])
            for launch in launches:
                name = _jit_function(launch.kernel).fn.__name__
                if keep is not None and dtype not in keep.get(name, ()):
                    continue
                if only and only not in case.name and only not in name:
                    continue
                for target in targets:
                    expanded = jobs_for(launch, target=target, case=f"{case.name} ({launch.phase})", dtype=dtype)
                    jobs += expanded[:1] if keep is not None else expanded
    return jobs


# ----------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------


def summary(rows: list[dict]) -> list[str]:
    failed = [r for r in rows if r["status"].startswith("FAIL")]
    lines = [f"{len(rows)} compiles, {len(failed)} failing, "
             f"{sum(1 for r in rows if r.get('spill_B'))} spilling, "
             f"{sum(r['compile_s'] for r in rows):.0f} s of compile time"]
    lines += [f"FAIL {r['kernel']} {r['target']} {r['dtype']} [{r['case']}] {r['config']}: {r['status'][6:]}"
              for r in failed]
    return lines


def run(argv: list[str] | None = None) -> int:
    """The check in this process (Triton must not be in interpreter mode)."""
    parser = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--only", help="only cases or kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--pinned-triton", action="store_true",
                        help=f"run under triton=={TORCH_2_13_TRITON} (what torch 2.13.0's CUDA wheel pins)")
    parser.add_argument("--list", action="store_true", help="print the compile jobs per kernel; compile nothing")
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)  # for `python -m bench aot`
    args = parser.parse_args(argv)
    if args.pinned_triton:
        return _rerun_pinned([a for a in (argv if argv is not None else sys.argv[1:]) if a != "--pinned-triton"])
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("bench.aot compiles real kernels: unset TRITON_INTERPRET (`python -m bench aot` does)")
    # A fresh Triton cache: a cache hit would skip the compile and fake its time.
    with tempfile.TemporaryDirectory(prefix="idgrpo-aot-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = _check(args)
    if args.rows_out:
        args.rows_out.write_text(json.dumps(rows))
    return 1 if any(r["status"].startswith("FAIL") for r in rows) else 0


def _check(args) -> list[dict]:
    import triton

    from bench.common import format_table, write_results

    print(f"triton {triton.__version__} (torch 2.13.0's CUDA wheel pins {TORCH_2_13_TRITON}"
          f"{'' if triton.__version__ == TORCH_2_13_TRITON else ': use --pinned-triton to check with it'})")
    cases, keep = quick_selection() if args.quick else (all_cases(), None)
    jobs = plan(cases, args.targets, args.dtypes, keep=keep, only=args.only)
    missing = [] if args.quick or args.only else [with_status(r) for r in uncovered_rows(jobs, args.targets)]
    if args.list:
        counts = Counter(f"{job.module}.{job.name}" for job in {job.key(): job for job in jobs}.values())
        print("\n".join(f"{name}: {counts[name]} compiles" for name in sorted(counts)))
        for row in missing[::len(args.targets)]:
            print(f"{row['module']}.{row['kernel']}: {row['status']}")
        return missing
    t0 = time.perf_counter()
    rows = run_jobs(jobs, max(1, args.jobs)) + missing
    elapsed = time.perf_counter() - t0
    table = format_table(rows, COLUMNS)
    lines = summary(rows)
    limits = {t: limit for t, (_, limit) in TARGETS.items()}
    path = write_results("aot-quick" if args.quick else "aot", rows,
                         extra={"quick": args.quick, "wall_s": elapsed, "shared_limit_B": limits, "summary": lines,
                                "triton_pinned_by_torch_2_13": TORCH_2_13_TRITON})
    text = f"== aot (triton {triton.__version__}, {elapsed:.0f} s wall) -> {path}\n{table}\n" + "\n".join(lines) + "\n"
    path.with_suffix(".txt").write_text(text)
    print(text, end="")
    return rows


def _rerun_pinned(argv: list[str]) -> int:
    """Run the check under the side environment with torch 2.13's triton (made on first use)."""
    python = PINNED_VENV / "bin" / "python"
    if not python.exists():
        print(f"making {PINNED_VENV} (triton=={TORCH_2_13_TRITON} over this interpreter's packages)")
        venv.create(PINNED_VENV, system_site_packages=True, with_pip=True)
    found = subprocess.run([str(python), "-c", "import triton; print(triton.__version__)"], capture_output=True,
                           text=True).stdout.strip()
    if found != TORCH_2_13_TRITON:  # new, or an interrupted install that would fall through to the system triton
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"triton=={TORCH_2_13_TRITON}"],
                       check=True)
    return _child([str(python), "-m", "bench.aot", *argv])


def _child(command: list[str]) -> int:
    """Run `command` where Triton compiles (not in interpreter mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(command, cwd=REPO, env=env).returncode


def main(quick: bool = False) -> list[dict]:
    """`python -m bench aot`: the runner may have put Triton in interpreter mode, so the check
    runs in a child process; returns its rows, raises when it fails."""
    with tempfile.TemporaryDirectory(prefix="idgrpo-aot-") as tmp:
        rows_file = Path(tmp) / "rows.json"
        rc = _child([sys.executable, "-m", "bench.aot", *(["--quick"] if quick else []), "--rows-out", str(rows_file)])
        rows = json.loads(rows_file.read_text()) if rows_file.exists() else []
    if rc:
        raise RuntimeError(f"bench.aot failed (exit {rc}): see its FAIL lines above")
    return rows


if __name__ == "__main__":
    sys.exit(run())
