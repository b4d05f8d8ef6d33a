"""idgrpo: Identity-GRPO on custom Triton kernels and a hand-rolled FSDP engine.

    pip install -e ".[dev]"
"""

from setuptools import find_packages, setup

setup(
    name="idgrpo",
    version="0.1.0",
    description=(
        "Identity-GRPO (arXiv 2510.14256): identity reward model + GRPO for multi-human "
        "video diffusion, on custom Triton kernels and a hand-rolled FSDP engine"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # bench/ runs from a checkout (`python -m bench`): a top-level package named `bench` would shadow any other.
    packages=find_packages(include=["idgrpo", "idgrpo.*"]),
    install_requires=[
        # 2.13.0 is the CPU build these machines install locally; keep the range admitting it.
        "torch>=2.4,<2.15",
        "triton>=3.0",
        "numpy",
        "safetensors>=0.4",
        "tyro>=0.8",
        "tqdm",
        # Video and image I/O (media.py) is part of every command a user runs first: `idgrpo demo` writes PNG/GIF,
        # `score` and `synth-pairs` read videos, GRPO runs save sample videos. PyAV's wheels bundle FFmpeg, so this
        # needs no system library; a pure-Python PNG/GIF writer would still leave video reading behind an extra.
        "av>=12",
        # The training curves (`idgrpo.rl.plots`): `idgrpo demo` and every GRPO run write reward_curve.png.
        "matplotlib>=3.5",
    ],
    extras_require={
        # diffusers / transformers are test oracles for weight-format parity only: the
        # package never imports them at run time.
        "dev": ["pytest", "pytest-xdist", "ruff", "diffusers", "transformers", "tokenizers", "peft"],
        "vlm": ["tokenizers"],
        # GPU machines only. NVIDIA apex is also picked up when importable, but it is built
        # from NVIDIA's sources: the registry package named `apex` is an unrelated project.
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["idgrpo = idgrpo.cli:main"]},
)
