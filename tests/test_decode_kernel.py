"""The C decode-attention kernel (decode_kernel): it attends as fp64 attention does, to bf16's precision, over
the tokens in use and nothing past them; decode steps of every family take it where it is built; and where it
can't be built, the load says why in one line and decode keeps torch's products."""

from __future__ import annotations

import subprocess

import pytest
import torch
from attentionhelpers import (
    check_decodes_as_sdpa,
    decode_logits,
    full_attention_layers,
    last_step_after_detours,
    load_family_in_bf16,
)
from modelhelpers import FAMILIES, build_family_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from chatapp.engine import cpu_attention, decode_kernel


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The kernel, built once for this module; skips where this CPU or compiler can't run it."""
    problem = decode_kernel.prepare(tmp_path_factory.mktemp("kernels"))
    if problem:
        pytest.skip(f"the decode kernel isn't built here: {problem}")
    return decode_kernel


def _exact(packed, keys, values, length, scale):
    scores = packed.double() @ keys[:, :, :length].double().transpose(-1, -2) * scale
    return scores.softmax(-1) @ values[:, :, :length].double()


def _case(batch, kv_heads, rows, dim, length, room, seed, spread=1.0):
    generator = torch.Generator().manual_seed(seed)
    packed = (torch.randn(batch, kv_heads, rows, dim, generator=generator) * spread).bfloat16()
    keys = torch.randn(batch, kv_heads, room, dim, generator=generator).bfloat16()
    values = torch.randn(batch, kv_heads, room, dim, generator=generator).bfloat16()
    # The room past the tokens in use holds what a rollback left, or anything: it must not count.
    keys[:, :, length:] = float("nan")
    values[:, :, length:] = float("nan")
    return packed, keys, values


@pytest.mark.parametrize(
    ("batch", "kv_heads", "rows", "dim", "length", "room"),
    [
        (1, 3, 3, 64, 1, 256),
        (1, 3, 3, 64, 15, 256),
        (1, 3, 3, 64, 16, 256),
        (1, 3, 3, 64, 17, 17),
        (1, 3, 3, 64, 6000, 6144),
        (1, 2, 7, 64, 1000, 1024),
        (2, 2, 4, 128, 4097, 4352),
        (1, 4, 2, 256, 777, 1024),
        (1, 8, 1, 32, 300, 512),
        (1, 1, 16, 96, 2049, 2304),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_attends_as_exact_attention_does(kernel, batch, kv_heads, rows, dim, length, room, threads):
    packed, keys, values = _case(batch, kv_heads, rows, dim, length, room, seed=length + dim)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = kernel.attend(packed, keys, values, length, dim**-0.5)
    finally:
        torch.set_num_threads(before)
    exact = _exact(packed, keys, values, length, dim**-0.5)
    assert ours is not None and ours.dtype == torch.bfloat16 and ours.shape == packed.shape
    # bf16's own rounding of the result is 2**-9 of it; the products' bf16 scores and weights add more.
    torch.testing.assert_close(ours.double(), exact, rtol=2**-7, atol=2e-3)
    products = cpu_attention._products(packed, keys.nan_to_num(), values.nan_to_num(), length, dim**-0.5)
    products = products.view(packed.shape)
    assert (ours.double() - exact).abs().mean() <= (products.double() - exact).abs().mean()


def test_a_softmax_whose_maximum_keeps_rising_stays_exact(kernel):
    """Scores that grow along the cache move the running maximum in every run of 16 keys, and peak at the end."""
    packed, keys, values = _case(1, 2, 3, 64, 3000, 3072, seed=5, spread=4.0)
    ramp = torch.linspace(0.0, 3.0, 3000).view(1, 1, 3000, 1)
    keys[:, :, :3000] = (keys[:, :, :3000].float() * ramp).bfloat16()
    ours = kernel.attend(packed, keys, values, 3000, 0.125)
    exact = _exact(packed, keys, values, 3000, 0.125)
    torch.testing.assert_close(ours.double(), exact, rtol=2**-7, atol=2e-3)


@pytest.mark.parametrize(
    "change",
    ["rows", "dim", "dtype", "strided keys", "heads"],
)
def test_shapes_the_kernel_does_not_take_fall_to_none(kernel, change):
    packed, keys, values = _case(1, 2, 3, 64, 100, 256, seed=1)
    if change == "rows":
        packed = torch.zeros(1, 2, decode_kernel.MOST_ROWS + 1, 64, dtype=torch.bfloat16)
    elif change == "dim":
        packed, keys, values = _case(1, 2, 3, 48, 100, 256, seed=1)
    elif change == "dtype":
        packed, keys, values = packed.float(), keys.float(), values.float()
    elif change == "strided keys":
        keys = keys[:, :, :200]
    else:
        packed = torch.zeros(1, 4, 3, 64, dtype=torch.bfloat16)
    assert kernel.attend(packed, keys, values, 100, 0.125) is None


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def wide_family_bf16(request, kernel, starter_folder, tmp_path_factory, settings):
    """A tiny model of each family in bf16 with heads of 32, which the kernel takes (the usual tiny ones have 16)."""
    out = tmp_path_factory.mktemp(request.param)
    return load_family_in_bf16(starter_folder, out, request.param, settings, width=128)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every decode step from the first cached token attends by the kernel; the row counts of those calls."""
    calls: list[int] = []
    real = decode_kernel.attend

    def spy(packed, keys, values, length, scale):
        output = real(packed, keys, values, length, scale)
        if output is not None:
            calls.append(packed.shape[2])
        return output

    monkeypatch.setattr(decode_kernel, "attend", spy)
    monkeypatch.setattr(cpu_attention, "LONG", 1)
    return calls


def test_every_family_decodes_through_the_kernel_as_transformers_sdpa_does(wide_family_bf16, kernel_calls):
    check_decodes_as_sdpa(wide_family_bf16, 3, kernel_calls)


def test_a_kernel_step_after_a_rollback_reads_nothing_of_the_tokens_dropped(wide_family_bf16, kernel_calls):
    ids = torch.randint(100, 5000, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    assert torch.equal(*last_step_after_detours(wide_family_bf16, ids, [[], [7, 8, 9]]))
    sdpa = wide_family_bf16.attn_implementation == "sdpa"
    assert bool(kernel_calls) == (sdpa and full_attention_layers(wide_family_bf16) > 0)


def test_heads_that_share_nothing_decode_through_the_kernel(kernel, kernel_calls):
    """One query head to each key/value head (SmolLM2-1.7B, Phi): a row each, not transformers' SDPA."""
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    module.is_causal = True
    packed, keys, values = _case(1, 4, 1, 64, 500, 512, seed=9)
    keys, values = keys.nan_to_num(), values.nan_to_num()
    query = packed.view(1, 4, 1, 64)
    with torch.inference_mode():
        ours, _ = cpu_attention.sdpa_forward(module, query, keys, values, None)
        theirs, _ = sdpa_attention_forward(module, query, keys, values, None)
    assert kernel_calls == [1]
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2**-6, atol=4e-3)
    with torch.inference_mode():  # in fp32, packing one head a row changes nothing
        ours, _ = cpu_attention.sdpa_forward(module, query.float(), keys.float(), values.float(), None)
        theirs, _ = sdpa_attention_forward(module, query.float(), keys.float(), values.float(), None)
    assert torch.equal(ours, theirs) and kernel_calls == [1]


# What happens where it can't be built: these run on any machine.


@pytest.fixture
def unprepared(monkeypatch):
    monkeypatch.setattr(decode_kernel, "_function", None)


def test_a_cpu_without_avx512_bf16_gets_no_kernel(unprepared, tmp_path):
    flags = decode_kernel.CPU_FLAGS - {"avx512_bf16"}
    assert decode_kernel.prepare(tmp_path, cpu_flags=flags) == "this CPU lacks avx512_bf16"
    assert not decode_kernel.ready() and not list(tmp_path.iterdir())


def test_no_compiler_is_one_line(unprepared, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc-here")
    problem = decode_kernel.prepare(tmp_path, cpu_flags=decode_kernel.CPU_FLAGS)
    assert problem == "no C compiler ('no-such-cc-here' not found; set CC)"
    assert not decode_kernel.ready()


def test_a_failing_compiler_leaves_no_file_behind(unprepared, tmp_path, monkeypatch):
    script = tmp_path / "badcc"
    script.write_text("#!/bin/sh\necho 'fatal error: no room on the device' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    folder = tmp_path / "kernels"
    problem = decode_kernel.prepare(folder, cpu_flags=decode_kernel.CPU_FLAGS)
    assert problem == f"'{script}' failed: fatal error: no room on the device"
    assert not decode_kernel.ready() and list(folder.iterdir()) == []


def test_a_build_is_kept_and_reused(unprepared, tmp_path, monkeypatch):
    if subprocess.run(["sh", "-c", "command -v cc"], capture_output=True).returncode:
        pytest.skip("no cc here")
    assert decode_kernel.prepare(tmp_path, cpu_flags=decode_kernel.CPU_FLAGS) is None
    (built,) = tmp_path.iterdir()
    assert built.name.startswith("decode_attention-") and built.suffix == ".so"
    monkeypatch.setattr(decode_kernel, "_function", None)

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert decode_kernel.prepare(tmp_path, cpu_flags=decode_kernel.CPU_FLAGS) is None
    assert list(tmp_path.iterdir()) == [built]


def test_a_bf16_load_says_why_there_is_no_kernel(unprepared, monkeypatch, starter_folder, tmp_path, settings):
    from chatapp.engine import cpu_linear, loader

    if not cpu_linear.supported():
        pytest.skip("bf16 loads on this CPU upcast; the kernel is only for native bf16")
    monkeypatch.setenv("CC", "no-such-cc-here")
    folder = build_family_model(starter_folder, tmp_path / "llama", "llama", width=128)
    loaded = loader.load_model(str(folder), "bf16", settings=settings)
    assert (
        "long-context decode attends by torch's bf16 products, not chatapp's kernel: no C compiler "
        "('no-such-cc-here' not found; set CC)"
    ) in loaded.reasons
    ids = torch.randint(100, 5000, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    assert decode_logits(loaded, ids).isfinite().all()
    assert not decode_kernel.ready()
