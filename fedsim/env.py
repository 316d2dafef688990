"""What a result was computed with: fedsim's version, Python, the packages that shape the numbers, the torch build
and the device. Recorded in every run's ``summary.json`` and W&B config (``environment``), printed by
``fedsim --version`` and ``fedsim validate``. Package versions are read from their metadata (nothing is imported);
torch's build and devices only where torch is imported already."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "tokenizers", "ray", "datasets", "safetensors", "numpy", "pydantic",
            "bitsandbytes", "hqq", "opacus", "wandb", "accelerate")


def fedsim_version() -> str:
    try:
        return metadata.version("fedsim")
    except metadata.PackageNotFoundError:  # a checkout on the path, not installed
        from fedsim import __version__

        return __version__


def environment() -> dict[str, Any]:
    """``{fedsim, python, platform, packages: {name: version or None}, torch: {build, cuda, devices}}``."""
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    out: dict[str, Any] = {"fedsim": fedsim_version(), "python": platform.python_version(),
                           "platform": f"{platform.system()} {platform.machine()}", "packages": packages}
    torch = sys.modules.get("torch")
    if torch is not None:
        cuda = torch.cuda.is_available()
        out["torch"] = {"build": torch.__version__, "cuda": torch.version.cuda,
                        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                        if cuda else ["cpu"]}
    return out


def version_line() -> str:
    """One line: fedsim's version and what it runs on."""
    env = environment()
    p = env["packages"]
    return (f"fedsim {env['fedsim']} (Python {env['python']}, torch {p['torch']}, transformers {p['transformers']}, "
            f"peft {p['peft']}, ray {p['ray']}, {env['platform']})")
