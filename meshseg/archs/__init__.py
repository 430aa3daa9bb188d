"""The networks of the ARC benchmark (Fedorov et al. 2025, Table 1), selectable by name.

Every network is built for 1 input channel (a conformed T2 volume) and 2 classes. MeshNet is
meshseg's own; the baselines come from MONAI where it has them and from this package where it
does not (MedNeXt v1, U-Mamba, a 3-D U-KAN). See docs/architectures.md for every configuration
and how its parameter count compares with the paper's.

Importing this module imports neither torch nor MONAI, so the command line can check names and
sizes cheaply; `build` imports what the chosen network needs and says what to install when it
is missing.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshseg.errors import InputError

if TYPE_CHECKING:
    from torch import nn

MESHNET = "meshnet"
INSTALL_HINT = "pip install 'meshseg[benchmark]'"


@dataclass(frozen=True)
class Architecture:
    """A trainable network: how to build it and what input sizes it takes.

    `downsampling` is the network's total down-sampling factor: every input side must be a
    multiple of it, and at least twice it, so the deepest feature map keeps more than one voxel
    per side (instance and batch norms cannot normalise a single value).
    `options` names the keyword options `build` passes on (channels, activation, size), so a
    checkpoint can record exactly what rebuilds the network.
    """

    name: str
    title: str
    source: str
    builder: str  # "module:function" inside meshseg.archs, imported only when building
    downsampling: int = 1
    options: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # importable modules, checked before building

    def check_size(self, size: int, what: str) -> None:
        """Refuse an input side this network cannot take.

        Raises:
            InputError: `size` is not a multiple of the down-sampling, or too small.
        """
        step = self.downsampling
        if step > 1 and (size % step or size < 2 * step):
            raise InputError(f"{what} {size}: architecture {self.name} needs a multiple of "
                             f"{step} that is at least {2 * step}")


_MONAI = ("monai",)
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(MESHNET, "MeshNet", "meshseg (meshseg.models.meshnet.MeshNet)", "meshnet:meshnet",
                 options=("channels", "activation", "batchnorm")),
    Architecture("segresnet", "SegResNet", "MONAI SegResNet (defaults)",
                 "monai_nets:segresnet", 8, needs=_MONAI),
    Architecture("swinunetr", "Swin-UNETR", "MONAI SwinUNETR (feature_size 24, use_v2)",
                 "monai_nets:swinunetr", 32, needs=_MONAI),
    Architecture("unetr", "UNETR", "MONAI UNETR (unused cross-attention norms removed)",
                 "monai_nets:unetr", 16, options=("size",), needs=_MONAI),
    Architecture("vnet", "V-Net", "MONAI VNet (defaults)", "monai_nets:vnet", 16,
                 needs=_MONAI),
    Architecture("resunet", "Residual U-Net",
                 "MONAI UNet (channels 16-256, strides 2, num_res_units 0)",
                 "monai_nets:resunet", 16, needs=_MONAI),
    Architecture("mednext-s", "MedNeXt-S", "meshseg (MedNeXt v1, Roy et al. 2023)",
                 "mednext:mednext_s", 16),
    Architecture("mednext-b", "MedNeXt-B", "meshseg (MedNeXt v1, Roy et al. 2023)",
                 "mednext:mednext_b", 16),
    Architecture("mednext-m", "MedNeXt-M", "meshseg (MedNeXt v1, Roy et al. 2023)",
                 "mednext:mednext_m", 16),
    Architecture("umamba-bot", "U-Mamba-Bot", "meshseg (U-Mamba, Ma et al. 2024)",
                 "umamba:umamba_bot", 16, needs=("mambapy",)),
    Architecture("umamba-enc", "U-Mamba-Enc", "meshseg (U-Mamba, Ma et al. 2024)",
                 "umamba:umamba_enc", 16, options=("size",), needs=("mambapy",)),
    Architecture("ukan", "U-KAN", "meshseg (3-D U-KAN after Li et al. 2024)", "ukan:ukan", 32),
)}

# The MeshNet widths of the paper, listed by `meshseg arch`. Any width N is named
# meshnet-N (`meshnet_width`) and trained as `--architecture meshnet --channels N`.
MESHNET_PRESETS: dict[str, int] = {"meshnet-5": 5, "meshnet-16": 16, "meshnet-26": 26}
_MESHNET_N = re.compile(r"meshnet-([1-9][0-9]*)")

# The paper's Table 1 in its order, with its parameter counts.
PAPER_PARAMETERS: dict[str, int] = {
    "meshnet-5": 5_682, "meshnet-16": 56_194, "meshnet-26": 147_474,
    "segresnet": 1_176_186, "swinunetr": 18_346_844, "unetr": 95_763_682,
    "vnet": 45_597_898, "resunet": 1_979_610, "mednext-s": 5_201_315,
    "mednext-b": 10_526_307, "mednext-m": 17_548_963, "umamba-bot": 7_351_400,
    "umamba-enc": 7_514_280, "ukan": 44_070_082,
}

COUNT_SIZE = 256  # the paper counts parameters for whole conformed volumes


def names() -> list[str]:
    """Every trainable architecture name (the values of `--architecture`)."""
    return list(ARCHITECTURES)


def get(name: str) -> Architecture:
    """The architecture called `name`.

    Raises:
        InputError: no such architecture (the message lists the known ones).
    """
    if isinstance(name, str) and name in ARCHITECTURES:
        return ARCHITECTURES[name]
    width = meshnet_width(name)
    hint = f"; MeshNet-{width} is --architecture meshnet --channels {width}" if width else ""
    raise InputError(f"unknown architecture {name!r} (known: {', '.join(names())}){hint}")


def meshnet_width(name: Any) -> int | None:
    """N for a name meshnet-N (N channels, N >= 1), else None."""
    found = _MESHNET_N.fullmatch(name) if isinstance(name, str) else None
    return int(found.group(1)) if found else None


def settings(name: str) -> dict[str, Any]:
    """Training settings (TrainConfig fields) that select `name`: an architecture, or
    meshnet-N for MeshNet with N channels (the paper's 5, 16, 26 or any other width)."""
    width = meshnet_width(name)
    if width is not None:
        return {"architecture": MESHNET, "channels": width}
    return {"architecture": get(name).name}


def options_for(name: str, channels: int, activation: str, size: int,
                batchnorm: bool = True) -> dict[str, Any]:
    """The build options of `name` taken from training settings (others do not apply)."""
    given = {"channels": channels, "activation": activation, "size": size,
             "batchnorm": batchnorm}
    return {key: given[key] for key in get(name).options}


def build(name: str, **options: Any) -> nn.Module:
    """A freshly initialised network for 1 input channel and 2 classes.

    `name` is an architecture or meshnet-N; `options` are those the architecture lists
    (channels and activation for MeshNet, the input side `size` for UNETR and U-Mamba-Enc).

    Raises:
        InputError: unknown name or option, or a package the network needs is missing.
    """
    width = meshnet_width(name)
    if width is not None:
        name, options = MESHNET, {"channels": width, **options}
    arch = get(name)
    unknown = sorted(set(options) - set(arch.options))
    if unknown:
        raise InputError(f"architecture {name} takes no option {', '.join(unknown)}")
    if "size" in options:
        arch.check_size(options["size"], "size")
    require(name)
    module_name, function = arch.builder.split(":")
    builder: Callable[..., nn.Module] = getattr(
        importlib.import_module(f"meshseg.archs.{module_name}"), function)
    return builder(**options)


def require(name: str) -> None:
    """Refuse at once an architecture whose packages are missing (before a run folder is
    made for it).

    Raises:
        InputError: unknown name, or a package it needs is not installed.
    """
    arch = get(MESHNET if meshnet_width(name) is not None else name)
    for module in arch.needs:
        _require(module, name)


def _require(module: str, name: str) -> None:
    """Import `module` or refuse, naming what to install.

    Raises:
        InputError: the module is not installed.
    """
    try:
        importlib.import_module(module)
    except ImportError as err:
        label = "MONAI" if module == "monai" else module
        raise InputError(f"architecture {name} needs {label}: {INSTALL_HINT}") from err


def info() -> list[dict[str, Any]]:
    """The paper's 14 networks as {name, parameters, source, unavailable}, counted for in=1,
    out=2 at 256^3; a network whose packages are missing has parameters None and says why."""
    rows = []
    for name in PAPER_PARAMETERS:
        arch = ARCHITECTURES[MESHNET if name in MESHNET_PRESETS else name]
        options = {"size": COUNT_SIZE} if "size" in arch.options else {}
        try:
            require(name)
        except InputError as err:  # a package it needs is missing: listed, not counted
            parameters, missing = None, str(err)
        else:
            parameters, missing = count_parameters(name, options), ""
        rows.append({"name": name, "parameters": parameters, "source": arch.source,
                     "unavailable": missing})
    return rows


def count_parameters(name: str, options: dict[str, Any]) -> int:
    """Learnable values of `name`: the network is built (one at a time, freed after), never run.

    PyTorch's meta device would skip the memory but not the time (MONAI's truncated-normal
    initialisation is slower there) and Swin-UNETR's constructor reads tensor values.
    """
    from meshseg.models.meshnet import count_parameters as learnable

    return learnable(build(name, **options))
