"""nmt: a PyTorch encoder-decoder Transformer trainer for machine translation."""

import re as _re
import sys as _sys

__version__ = "0.1.0"

TORCH_MINIMUM = (2, 4)
"""torch.get_autocast_dtype, torch.is_autocast_enabled(device), GradScaler on the CPU and fused Adam's
found_inf on the CPU all arrived by 2.4. Kept equal to the pin in pyproject.toml (a test checks)."""


def _torch_too_old(version: str) -> bool:
    found = _re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) < TORCH_MINIMUM


def _check_torch() -> None:
    """Read from the installed package's metadata, not by importing torch: the data pipeline's
    worker processes import this package and never need torch's few hundred MB."""
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return  # the import that needs it names it
    if _torch_too_old(version):
        need = ".".join(map(str, TORCH_MINIMUM))
        print(f"error: nmt needs torch >= {need}, found {version}: pip install 'torch>={need}'",
              file=_sys.stderr)
        raise SystemExit(2)


_check_torch()
