"""Whether this project's own CPU paths may run: plain eager execution, nothing watching.

``vit.cpu_attention`` and ``vit.cpu_linear`` call code torch cannot see into (a C++ extension,
a private oneDNN operator). While torch compiles, traces, scripts or exports the model, or a
tensor dispatch mode such as ``FlopCounterMode`` watches, the model must run torch's own
operators instead, which those tools understand; ``vit.cpu_attention`` registers its kernel as
torch operators and so also runs inside ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def runs_eagerly() -> bool:
    """True outside compiling, tracing, scripting, ONNX export and tensor dispatch modes."""
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
        and _get_current_dispatch_mode() is None
    )
