"""bf16 Linear layers on the CPU with their weights packed once, in oneDNN's own layout, at load.

torch's bf16 `F.linear` on the CPU hands oneDNN a plain row-major weight, and oneDNN reorders it into the
blocked layout its bf16 kernels read on every call. For a decode step, which reads each weight once, that
reorder is most of the work: on a 2-core AVX512-BF16 EPYC, SmolLM2-135M's Linear layers ran at about
10 GB/s against 25-34 GB/s for a plain read of the same bytes. Packed once with
`torch.ops.mkldnn._reorder_linear_weight`, the same call takes 0.55-0.65 of the time, for one row and for a
prefill's thousands, and computes the same bits (oneDNN runs the same kernel on the same layout). This is
what torch.compile's freezing pass does for CPU inference; here it is done without compiling.

Only for models that compute in bf16 on a CPU whose oneDNN has native bf16 kernels. A weight shared with
another module (tied embeddings) stays as it is: packing it would need a second copy. The pages the
original weights leave in the mapped checkpoint go back to the kernel after loading (mapped.py).
"""

from __future__ import annotations

import torch


class PackedLinear(torch.nn.Linear):
    """A Linear whose weight is oneDNN's packed tensor (`weight.is_mkldnn`); `weight.to_dense()` gives it back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def supported() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels of its own (AVX512-BF16 or AMX), not emulated ones."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def apply(model: torch.nn.Module) -> int:
    """Pack the weight of every plain bf16 Linear of a CPU model in place; how many were packed."""
    shared = _shared_weights(model)
    packed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is not torch.nn.Linear
            or weight.dtype != torch.bfloat16
            or weight.device.type != "cpu"
            or id(weight) in shared
        ):
            continue
        with torch.no_grad():
            module.weight = torch.nn.Parameter(
                torch.ops.mkldnn._reorder_linear_weight(weight.detach()), requires_grad=False
            )
        module.__class__ = PackedLinear
        packed += 1
    return packed


def _shared_weights(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for tensor in module.parameters(recurse=False):
            seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    return {key for key, count in seen.items() if count > 1}
