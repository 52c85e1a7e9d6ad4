"""bf16 weights with fp32 math, for CPUs that don't compute bf16 natively (no AVX512-BF16 or AMX).

Decoding reads every weight once per token, so weights in bf16 decode nearly twice as fast as fp32 ones: on
a 2-core AVX2 box SmolLM2-135M went from 9.6 to 16.6 tok/s. But on such CPUs torch's bf16 kernels are fast
only for a single row: a 120-token prefill took 2.3 s in bf16 against 0.47 s in fp32, and bf16 attention
with 6k tokens of cache decoded at 3.9 tok/s against 6.1 in fp32. So only the Linear layers and the
embeddings keep bf16 weights. A decode step and a speculative verify run their rows one by one through
torch's bf16 matrix-vector kernel; more rows (a prefill) run in fp32 on a copy of the weight made for that
call, a block of rows at a time so the copy stays small. Norms, attention, the KV cache and the residual
stream are fp32.

Both paths round a Linear's input and output to bf16, as a bf16 model does, so a prefill computes what
single steps would, up to the order of the fp32 sums inside a dot product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..planner import UPCAST_BLOCK_BYTES as BLOCK_BYTES

#: Up to this many rows (a decode step, a speculative verify of 1 + DRAFT_TOKENS) run one by one through the bf16
#: kernel: upcasting SmolLM2-135M's weights took about 250 ms, a row about 20 ms. Row by row, each Linear of a
#: verify also computes exactly what it would in single steps (attention over several rows still differs a little).
ONE_BY_ONE = 8
#: A speculative verify of 7 tokens costs this many decode steps (speculate.Gate). Measured 3.87 and 3.77 on
#: SmolLM2-135M at 300 and 1,500 tokens of context, 2-core AVX2 (fp32: 1.96 and 2.11).
VERIFY_COST = 3.8


class Bf16Linear(torch.nn.Linear):
    """A Linear whose weight is bf16 and whose input and output are the model's fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.to(torch.bfloat16)
        rows = x.numel() // x.shape[-1]
        if rows <= ONE_BY_ONE:
            flat = low.reshape(rows, x.shape[-1])
            parts = [F.linear(flat[i : i + 1], self.weight, self.bias) for i in range(rows)]
            out = parts[0] if rows == 1 else torch.cat(parts)  # a decode step needs no copy
            return out.reshape(*x.shape[:-1], -1).to(x.dtype)
        return _blocked(low.to(x.dtype), self.weight, self.bias).to(torch.bfloat16).to(x.dtype)


def _blocked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias in x's dtype, upcasting at most BLOCK_BYTES of weight at a time."""
    rows = max(BLOCK_BYTES // (weight.shape[1] * x.element_size()), 1)
    if rows >= weight.shape[0]:
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        out[..., part] = F.linear(x, weight[part].to(x.dtype), None if bias is None else bias[part].to(x.dtype))
    return out


def _to_fp32(_module, _args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def apply(model: torch.nn.Module) -> None:
    """Turn a model loaded in bf16 into bf16 weights with fp32 math, in place."""
    low: set[int] = set()
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = Bf16Linear
        elif isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(_to_fp32)
        else:
            continue
        low.update(id(tensor) for tensor in module.parameters(recurse=False))
    for tensor in model.parameters():
        if id(tensor) not in low and tensor.is_floating_point():
            tensor.data = tensor.data.float()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                setattr(module, name, buffer.float())


def applied(model: torch.nn.Module) -> bool:
    return any(isinstance(module, Bf16Linear) for module in model.modules())
