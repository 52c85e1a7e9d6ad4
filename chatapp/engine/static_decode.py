"""The decode path for CUDA: a static KV cache and a compiled decode step, as gpt-fast does.

Eager decoding on a GPU is bound by Python overhead: each token launches hundreds of small kernels.
`torch.compile(mode="reduce-overhead")` records the step as a CUDA graph and replays it, which needs the
cache's tensors to keep their address from token to token. transformers' StaticCache does: it writes each
token in place at its position, and a rollback (`crop`) only moves the position back, so the next token
overwrites what was dropped. Attention runs over the whole buffer, with the unused tail masked.

Shapes are bucketed: a cache holds a multiple of BUCKET tokens and moves into a bigger one when a turn
would outgrow it, so a chat compiles the step once per bucket it reaches, not once per turn.

Sliding-window layers (Gemma 2 and 3, Mistral with a window) can't be rolled back once they have wrapped
around in a static cache, so those models keep the dynamic cache.
"""

from __future__ import annotations

import logging

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from ..errors import first_line
from . import kvcache
from .generate import decode_step, forward
from .speculate import DRAFT_TOKENS

log = logging.getLogger(__name__)

#: inductor's options for the decode step: CUDA graphs, which is all mode="reduce-overhead" sets. A dict here
#: rather than the mode, so that bench/gpu_graphs.py can try gpt-fast's tuning on the same path.
COMPILE_OPTIONS: dict = {"triton.cudagraphs": True}

#: Tokens a speculative verify runs through the compiled model at once: a draft is padded to this many, so that a
#: bucket compiles one verify graph rather than one per draft length. On a GPU the padding is all but free: a step
#: at batch size 1 reads every weight once, whatever the tokens.
VERIFY_WIDTH = DRAFT_TOKENS + 1
#: Graphs dynamo may compile for the step: two per bucket (a token, a verify), so a chat of 128 buckets. With its
#: default, 8, the step of a chat past four buckets raised FailOnRecompileLimitHit (fullgraph=True).
RECOMPILE_LIMIT = 256

#: Tokens a static cache grows by. Each size compiles the decode step once; 1,024 tokens of room cost an
#: 8B Llama 128 MiB in bf16.
BUCKET = 1024


def why_not(model, device: str, quantized: bool = False) -> str | None:
    """Why this model on this device decodes on the dynamic cache; None when the static path applies.

    `device` is where all the weights are ("cuda"), or a split across devices ("cpu+cuda:0"), which a
    graph can't span. Quantized weights stay eager until the GPU run (issue 16) shows their kernels compile.
    """
    if device != "cuda":
        return "the static, compiled decode path is for a model wholly on one CUDA GPU"
    if quantized:
        return "8- and 4-bit weights decode eagerly"
    return unsupported(model)


def unsupported(model) -> str | None:
    """Why this model's architecture can't use a static cache that rolls back; None when it can."""
    name = type(model).__name__
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{name} can't be compiled into one graph"
    layers = StaticCache(config=model.config, max_cache_len=BUCKET).layers
    if any(type(layer) is not StaticLayer for layer in layers):
        return f"{name} has sliding-window layers, which a static cache can't roll back"
    return None


def room_for(tokens: int) -> int:
    return max(1, -(-tokens // BUCKET)) * BUCKET


def is_static(cache) -> bool:
    return cache is not None and bool(cache.layers) and all(type(layer) is StaticLayer for layer in cache.layers)


def room(cache) -> int:
    return cache.layers[0].max_cache_len


def new_cache(config, tokens: int) -> StaticCache:
    return StaticCache(config=config, max_cache_len=room_for(tokens))


def holding(cache, config, tokens: int) -> StaticCache:
    """A static cache with room for `tokens`: this one if it has the room, else a bigger one with its contents.

    `cache` may be a dynamic one (restored from a snapshot): its contents move into a static cache.
    """
    if is_static(cache) and room(cache) >= tokens:
        return cache
    held = int(cache.get_seq_length()) if cache is not None else 0
    bigger = new_cache(config, max(tokens, held))
    if held:
        for old, new in zip(cache.layers, bigger.layers, strict=True):
            keys, values = old.keys[..., :held, :], old.values[..., :held, :]
            new.lazy_initialization(keys, values)
            new.keys[..., :held, :] = keys
            new.values[..., :held, :] = values
            new.cumulative_length.fill_(held)
    return bigger


def compiled_step(loaded):
    """The model's forward for one decode token, compiled once per loaded model where it runs on CUDA."""
    if loaded.compiled_step is None:
        loaded.compiled_step = loaded.model
        if loaded.model.device.type == "cuda":
            loaded.compiled_step = compile_model(loaded.model)
    return loaded.compiled_step


def compile_model(model, backend: str = "inductor"):
    """torch.compile for the static path: one graph per shape, so per bucket and per kind of forward (a token, a
    verify), with dynamo allowed RECOMPILE_LIMIT of them. The tests compile with the "eager" backend on a CPU: the
    same graphs and guards, without inductor's minutes of codegen."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * RECOMPILE_LIMIT)
    options = dict(COMPILE_OPTIONS) if backend == "inductor" else None
    return torch.compile(model, fullgraph=True, dynamic=False, backend=backend, options=options)


def step(loaded, cache, token: int | torch.Tensor) -> torch.Tensor:
    """One decode token on a static cache, through the compiled step."""
    return _compiled(loaded, lambda model: decode_step(model, cache, token))


def rows(loaded, cache, ids: list[int]) -> torch.Tensor:
    """A speculative verify on a static cache through the compiled step: ids run as one forward, the logits of
    each position, (len(ids), vocab). Padded to VERIFY_WIDTH with the last id, whose rows come after the real ones
    (causal: they change nothing before them) and leave the cache at once: a position move."""
    pad = max(VERIFY_WIDTH - len(ids), 0)
    logits = _compiled(loaded, lambda model: forward(model, cache, ids + ids[-1:] * pad, rows=len(ids) + pad))
    kvcache.drop(cache, pad)
    return logits[: len(ids)]


def _compiled(loaded, run):
    """run(model) with the compiled step.

    A step that fails to compile (Triton finds no C compiler, inductor lacks an operator, a chat that outgrew
    RECOMPILE_LIMIT graphs) would fail every reply. Instead this model decodes eagerly from then on, on the same
    cache, and its reasons say why. A retry is safe: a static cache writes each token at its position, so a
    capture that ran before failing wrote what the eager step writes again.
    """
    compiled = compiled_step(loaded)
    if compiled is loaded.model:
        return run(loaded.model)
    try:
        # A copy: a CUDA graph's outputs live in its memory pool, which the next replay of any of the model's graphs
        # overwrites, and stream_ahead holds a step's logits while the verify runs. For fp32, .float() copied nothing.
        return run(compiled).clone()
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        failed = f"the chat outgrew its {RECOMPILE_LIMIT} graphs, two per {BUCKET:,} tokens"
    except torch._dynamo.exc.TorchDynamoException as exc:
        failed = first_line(exc)
    loaded.compiled_step = loaded.model
    why = f"decode: the compiled step failed ({failed}), so it runs eagerly on the static cache"
    loaded.reasons.append(why)
    log.warning(why)
    return run(loaded.model)
