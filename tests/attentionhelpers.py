"""Decode steps on a loaded model, with our attention or transformers' own SDPA, for the attention tests."""

from __future__ import annotations

from pathlib import Path

import torch
from modelhelpers import build_family_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from chatapp.engine import cpu_attention, kvcache
from chatapp.engine.generate import forward, prefill


def load_family_in_bf16(starter: Path, out: Path, family: str, settings, width: int = 64):
    """A tiny model of `family` (build_family_model), loaded to compute in bf16 whatever this CPU is."""
    from chatapp.engine import loader

    folder = build_family_model(starter, out, family, width=width)
    real = loader._device_facts
    loader._device_facts = lambda device: (True, None)
    try:
        return loader.load_model(str(folder), "bf16", settings=settings)
    finally:
        loader._device_facts = real


def decode_logits(loaded, ids: list[int], steps: int = 4) -> torch.Tensor:
    """The logits of the last `steps` ids, each decoded as one step after a prefill of the rest."""
    cache = kvcache.new_cache(loaded.model.config)
    with torch.inference_mode():
        prefill(loaded.model, cache, ids[:-steps])
        return torch.cat([forward(loaded.model, cache, [token]) for token in ids[-steps:]])


def their_decode_logits(loaded, ids: list[int], steps: int = 4) -> torch.Tensor:
    """decode_logits with transformers' own SDPA in place of cpu_attention's."""
    AttentionInterface.register("sdpa", sdpa_attention_forward)
    try:
        return decode_logits(loaded, ids, steps)
    finally:
        cpu_attention.install()


def full_attention_layers(loaded) -> int:
    """The layers whose decode steps pass no mask: not sliding ones."""
    return sum(type(layer) is kvcache.GrowingLayer for layer in kvcache.new_cache(loaded.model.config).layers)


def check_decodes_as_sdpa(loaded, seed: int, calls: list[int]) -> None:
    """Decode steps over 300 tokens of a bf16 family model pick what transformers' SDPA picks, with logits close to
    its own; `calls` (a spy's record of rows per call) saw every step of every full-attention layer, the 2 query
    heads of each key/value head as rows. Sliding layers pass a mask (mistral has only those) and gemma2's softcap
    runs eager, so they make no calls."""
    ids = torch.randint(100, 5000, (300,), generator=torch.Generator().manual_seed(seed)).tolist()
    ours = decode_logits(loaded, ids)
    sdpa = loaded.attn_implementation == "sdpa"
    assert calls == [2] * (4 * full_attention_layers(loaded) if sdpa else 0)
    theirs = their_decode_logits(loaded, ids)
    # bf16 scores round where SDPA's kernel keeps them in fp32, as transformers' eager attention does.
    assert (ours - theirs).abs().mean() < 0.02 * theirs.abs().mean()
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()


def last_step_after_detours(loaded, ids: list[int], detours: list[list[int]]) -> list[torch.Tensor]:
    """For each detour: prefill all but the last id, run the detour and drop it, then decode the last id."""
    logits = []
    for detour in detours:
        cache = kvcache.new_cache(loaded.model.config)
        with torch.inference_mode():
            prefill(loaded.model, cache, ids[:-1])
            if detour:
                forward(loaded.model, cache, detour, rows=len(detour))
                kvcache.drop(cache, len(detour))
            logits.append(forward(loaded.model, cache, ids[-1:]))
    return logits
