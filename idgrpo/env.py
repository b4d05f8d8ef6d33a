"""`idgrpo env`: what this machine has, and what idgrpo would run on it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json as _json
import platform


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def optional_accelerators() -> dict[str, bool]:
    """flash-attn and NVIDIA apex are used when importable and never required."""
    apex = importlib.util.find_spec("apex") is not None
    if apex:  # the registry's unrelated `apex` has no `apex.optimizers`
        try:
            apex = importlib.util.find_spec("apex.optimizers") is not None
        except ModuleNotFoundError:
            apex = False
    return {"flash_attn": importlib.util.find_spec("flash_attn") is not None, "apex": apex}


def collect() -> dict:
    import torch

    from idgrpo.kernels import backend

    cuda = torch.cuda.is_available()
    devices = [
        {"index": i, "name": torch.cuda.get_device_name(i),
         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
        for i in range(torch.cuda.device_count())
    ] if cuda else []
    try:
        default = backend.default_backend()
        ops = {
            op: backend.choose(None, on_cuda=cuda)
            if importlib.util.find_spec(f"idgrpo.kernels.{module}") else "not built"
            for op, module in backend.OPS.items()
        }
    except (ValueError, RuntimeError) as e:  # a bad IDGRPO_KERNELS value is reported, not raised
        default, ops = f"error: {e}", {}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "idgrpo": _version("idgrpo"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cuda_available": cuda,
        "devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "accelerators": optional_accelerators(),
        "kernel_backend_setting": default,
        "triton_interpreter": backend.interpreting(),
        "kernel_backend": ops,
    }


def env(json: bool = False) -> None:
    """Print versions of python/torch/triton, the devices, whether flash-attn / apex are
    importable, and which backend each kernel op would use for tensors on this machine's
    default device.

    Args:
        json: print one JSON object instead of the table.
    """
    info = collect()
    if json:
        print(_json.dumps(info, indent=2))
        return
    rows = [(k, v) for k, v in info.items() if k not in ("devices", "accelerators", "kernel_backend")]
    rows += [(f"device[{d['index']}]", f"{d['name']} ({d['memory_gib']} GiB)") for d in info["devices"]]
    if not info["devices"]:
        rows.append(("devices", "cpu only"))
    rows += [(name, "importable" if ok else "not importable") for name, ok in info["accelerators"].items()]
    rows += [(f"kernel {op}", b) for op, b in info["kernel_backend"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
