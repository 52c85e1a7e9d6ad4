"""bf16 weights with fp32 math: what the bf16 preset (and auto) means on a CPU without native bf16.

The loader is told the CPU has no native bf16, so these run the same on a CPU that has it.
"""

from __future__ import annotations

import pytest
import torch
from chathelpers import Chat, drafted_and_plain, greedy
from modelhelpers import FAMILIES, build_family_model

from chatapp.engine import bf16_weights, loader
from chatapp.engine.bench import naive_turn
from chatapp.engine.session import Message, common_prefix_len, render_ids
from chatapp.planner import DTYPE_BYTES, UPCAST_BLOCK_BYTES, estimate, kv_cache_bytes


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, starter_folder, tmp_path_factory):
    return request.param, build_family_model(
        starter_folder, tmp_path_factory.mktemp(request.param), request.param, words_only=True
    )


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(loader, "_device_facts", lambda device: (False, None))


def _load(folder, settings, preset="bf16"):
    return loader.load_model(str(folder), preset, settings=settings)


def _rounded_fp32(folder):
    """The model in fp32 with what bf16 weights and bf16 Linear inputs and outputs round away, rounded away."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            for tensor in module.parameters(recurse=False):
                tensor.data = tensor.data.bfloat16().float()
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16().float(),))
            module.register_forward_hook(lambda _m, _args, out: out.bfloat16().float())
    return model


def test_each_family_keeps_bf16_weights_and_computes_in_fp32(family, settings, no_native_bf16):
    _, folder = family
    loaded = _load(folder, settings)
    assert (loaded.preset, loaded.dtype) == ("bf16", "fp32")
    assert "bf16 weights with fp32 math: this CPU has no native bf16" in loaded.reasons
    for name, tensor in loaded.model.named_parameters():
        owner = loaded.model.get_submodule(name.rsplit(".", 1)[0])
        low = isinstance(owner, (torch.nn.Linear, torch.nn.Embedding))
        assert tensor.dtype == (torch.bfloat16 if low else torch.float32), name
    fp32 = _load(folder, settings, "fp32")
    assert loaded.footprint_bytes < 0.55 * fp32.footprint_bytes

    ids = torch.randint(100, 5000, (1, 40), generator=torch.Generator().manual_seed(0))
    reference = _rounded_fp32(folder)
    with torch.inference_mode():
        # A prefill (fp32 on upcast weights), a verify's rows and a decode step (the bf16 kernel, row by row).
        for rows in (ids, ids[:, :7], ids[:, :1]):
            logits = loaded.model(rows).logits
            assert logits.dtype == torch.float32
            off = (logits - reference(rows).logits).abs()
            unrounded = (logits - fp32.model(rows).logits).abs()
            # A sum that lands on a bf16 rounding boundary can round the other way when the kernel adds in
            # another order (a CPU with AVX512-BF16 does, for one of these 21 cases), and a few logits then move
            # by a bf16 step. So: almost all equal to 1e-4, and the rest nearer the rounded model than the
            # unrounded one...
            assert (off > 1e-4).float().mean() < 0.01
            assert off.mean() < 0.2 * unrounded.mean()
            # ... and the rounding is real: the unrounded fp32 model gives other logits.
            assert unrounded.max() > 1e-3


def test_each_family_keeps_the_cache_contract_with_bf16_weights(family, settings, no_native_bf16):
    name, folder = family
    loaded = _load(folder, settings)
    chat = Chat(loaded, system="You are terse.")
    held: list[int] = []
    for i in range(4):
        before = [Message(m.role, m.content) for m in chat.history]
        ask = f"Tell me about the bridge number {i}, and then about the town around it, please."
        turn = chat.send(ask, max_new_tokens=16)
        assert turn.tokens == naive_turn(loaded, [*before, Message("user", ask)], 16)[0], f"{name} turn {i + 1}"
        prompt = render_ids(loaded.tokenizer, [*before, Message("user", ask)])
        assert turn.stats.prefilled_tokens == len(prompt) - common_prefix_len(prompt, held)
        held = prompt + turn.tokens[:-1]
    _, tensors, _ = chat.session.export()
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # the cache is in the math dtype, not the weights'

    ask = "Repeat after me: the bridge, the bridge, the bridge, the mill, the bridge, the mill, the bridge."
    (drafted, held, after), (plain, plain_held, plain_after) = drafted_and_plain(
        loaded, ask, greedy(max_new_tokens=24), speculative="ngram"
    )
    assert drafted.tokens == plain.tokens and held == plain_held
    assert after.prefilled_tokens == plain_after.prefilled_tokens


def test_drafts_must_pay_for_a_dearer_verify_with_bf16_weights(tiny_folder, settings, no_native_bf16):
    from chatapp.engine.session import ChatSession
    from chatapp.engine.speculate import Gate

    mixed = ChatSession(_load(tiny_folder, settings))
    fp32 = ChatSession(_load(tiny_folder, settings, "fp32"))
    assert fp32._gate.threshold == Gate().threshold
    assert mixed._gate.threshold == Gate(bf16_weights.VERIFY_COST).threshold > fp32._gate.threshold


def test_a_prefill_upcasts_a_weight_one_block_at_a_time(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 1000).to(torch.bfloat16)
    x = torch.randn(3, 5, 48)
    whole = bf16_weights._blocked(x, linear.weight, linear.bias)
    monkeypatch.setattr(bf16_weights, "BLOCK_BYTES", 48 * 4 * 128)  # 128 output rows a block: 8 blocks
    blocked = bf16_weights._blocked(x, linear.weight, linear.bias)
    expected = torch.nn.functional.linear(x, linear.weight.float(), linear.bias.float())
    assert torch.equal(blocked, whole) and torch.allclose(blocked, expected, atol=1e-5)


def test_a_verify_computes_each_row_exactly_as_a_decode_step_would():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 300).to(torch.bfloat16)
    linear.__class__ = bf16_weights.Bf16Linear
    x = torch.randn(1, bf16_weights.ONE_BY_ONE, 64)
    verify = linear(x)
    steps = torch.cat([linear(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)
    assert verify.dtype == torch.float32 and torch.equal(verify, steps)


def test_the_planner_counts_bf16_weights_an_fp32_cache_and_the_upcast_block(tiny_fp32):
    from chatapp.facts import facts_from_config

    facts = facts_from_config("tiny", tiny_fp32.model.config.to_dict(), params=1_000_000)
    cpu = estimate(facts, "bf16", 1024, device_type="cpu", bf16_supported=False)
    native = estimate(facts, "bf16", 1024, device_type="cpu", bf16_supported=True)
    assert cpu.weights_bytes == native.weights_bytes == 1_000_000 * DTYPE_BYTES["bf16"]
    assert cpu.kv_cache_bytes == kv_cache_bytes(facts, 1024, "fp32") == 2 * native.kv_cache_bytes
    fp32 = estimate(facts, "fp32", 1024, device_type="cpu", bf16_supported=False)
    assert cpu.activation_bytes == fp32.activation_bytes + UPCAST_BLOCK_BYTES
