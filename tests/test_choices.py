"""The picker's rows and verdicts, planned for simulated hardware (no screen, no GPU needed)."""

from __future__ import annotations

from chatapp.catalog import load_catalog
from chatapp.choices import catalog_rows, preset_options, recommended
from chatapp.facts import facts_from_spec
from chatapp.hardware import CpuInfo, Hardware, describe_by_hand

GIB = 1024**3
CPU16 = Hardware(cpu=CpuInfo(ram_total_bytes=16 * GIB, ram_available_bytes=16 * GIB, flags=frozenset()))


def gpu(size: str) -> Hardware:
    return describe_by_hand(CPU16, gpus=[size])


def test_each_catalog_row_carries_the_planners_verdict_per_preset():
    rows = {r.ref: r for r in catalog_rows(load_catalog(), gpu("24GiB"), {})}
    llama = rows["llama-3.1-8b"]
    assert llama.verdict.startswith("bf16 ✓") and "nf4" not in llama.verdict  # auto's first choice fits
    assert llama.gated and llama.download_bytes > 15e9 and not llama.ready
    assert rows["llama-3.1-70b"].verdict.startswith("bf16 ✗") and not rows["llama-3.1-70b"].fits
    assert rows["smollm2-135m-local"].ready and rows["smollm2-135m-local"].download_bytes is None
    details = llama.details()
    assert "weights" in details and "KV cache" in details and "reasons:" in details and "gated" in details


def test_a_small_gpu_recommends_what_fits_ready_models_first():
    rows = catalog_rows(load_catalog(), gpu("8GiB"), {})
    best = recommended(rows)
    assert best[0].ref == "smollm2-135m-local"  # ready now, nothing to download
    assert all(r.fits for r in best)
    assert "llama-3.1-70b" not in [r.ref for r in best]
    sizes = [r.params for r in best[1:]]
    assert sizes == sorted(sizes, reverse=True)
    assert next(r for r in best if r.ref == "llama-3.1-8b").preset == "nf4"


def test_preset_options_say_which_presets_fit():
    facts = facts_from_spec(load_catalog()["llama-3.1-8b"])
    options = dict(preset_options(facts, gpu("12GiB")))
    assert options["nf4"].choice is not None
    assert options["fp32"].choice is None or options["fp32"].choice.slow
    assert options["auto"].choice.preset == "nf4"


CPU24 = Hardware(cpu=CpuInfo(ram_total_bytes=24 * GIB, ram_available_bytes=24 * GIB, flags=frozenset()))


def test_verdicts_are_at_the_practical_context_and_say_how_far_it_goes():
    rows = {r.ref: r for r in catalog_rows(load_catalog(), CPU24, {})}
    # Not its full 131k context, lowered to what fits: 8,192 tokens, and how far it could go. This CPU has no
    # native bf16: bf16 weights with an fp32 KV cache.
    assert rows["llama-3.2-1b"].verdict == "bf16 ✓ 5.9 GB · up to 64k"
    assert rows["llama-3.2-1b"].speed == "~2.0 tok/s"
    assert rows["qwen3-0.6b"].verdict == "bf16 ✓ 4.7 GB · up to 40k"
    details = rows["llama-3.2-1b"].details()
    assert "context: 8,192 tokens" in details
    assert "longest context that fits (bf16): 64,512 tokens" in details
    assert "decode speed: ~2.0 tok/s (estimate: 6.0 GB/s ÷ 3.0 GB read per token" in details
    # On a GPU the same model is small and fast.
    on_gpu = {r.ref: r for r in catalog_rows(load_catalog(), gpu("24GiB"), {})}["llama-3.2-1b"]
    assert (on_gpu.verdict, on_gpu.speed) == ("bf16 ✓ 3.4 GB · up to 131k", "~38 tok/s")


def test_a_context_cap_is_the_context_verdicts_are_given_at():
    rows = {r.ref: r for r in catalog_rows(load_catalog(), CPU24, {}, context_cap=32768)}
    assert rows["llama-3.2-1b"].verdict == "bf16 ✓ 13.9 GB · up to 64k"
    assert rows["llama-3.2-1b"].plan.choice.context_tokens == 32768
    assert rows["smollm2-135m-local"].plan.choice.context_tokens == 8192  # never past the model's own maximum


def test_a_cpu_only_box_recommends_what_it_can_run_at_a_usable_speed():
    cpu32 = Hardware(cpu=CpuInfo(ram_total_bytes=32 * GIB, ram_available_bytes=32 * GIB, flags=frozenset()))
    rows = catalog_rows(load_catalog(), cpu32, {})
    best = recommended(rows)
    refs = [r.ref for r in best]
    gemma = next(r for r in best if r.ref == "gemma-3-27b")
    assert gemma.verdict.startswith("bf16 ✗") and "nf4 ✓" in gemma.verdict  # it fits...
    assert gemma.speed == "~0.3 tok/s" and not gemma.usable  # ...but would crawl
    usable = [r.ref for r in best if r.usable]
    assert usable == ["smollm2-135m-local", "gemma-3-1b", "qwen2.5-0.5b", "smollm2-360m", "smollm2-135m"]
    assert refs[: len(usable)] == usable  # usable first: ready, then the biggest
    assert refs.index("gemma-3-27b") > refs.index("llama-3.2-1b")  # then the rest, fastest first
    speeds = [r.tokens_per_s for r in best[len(usable) :]]
    assert speeds == sorted(speeds, reverse=True)


def test_f4_says_what_the_preset_itself_needs():
    from chatapp.ui.screens.presets import option_text

    t4 = describe_by_hand(CPU16, gpus=["T4:16GiB:7.5"])
    facts = facts_from_spec(load_catalog()["llama-3.1-8b"])
    options = dict(preset_options(facts, t4))
    # fp32's own 8,192-token need, not nf4's 7.5 GB (the smallest of all presets).
    assert option_text("fp32", options["fp32"], "auto") == "fp32  ✗ needs 35.2 GB at 8,192 tokens: won't fit"
    assert option_text("nf4", options["nf4"], "nf4") == "nf4   ✓ 16.2 GB on cuda:0 (loaded)"
    nothing = Hardware(cpu=CpuInfo(ram_total_bytes=4 * GIB, ram_available_bytes=4 * GIB, flags=frozenset()))
    auto = dict(preset_options(facts, nothing))["auto"]
    # auto on a CPU tries bf16 then nf4: the least of those is nf4's need.
    assert option_text("auto", auto, "auto") == "auto  ✗ needs 12.9 GB at 8,192 tokens: won't fit (loaded)"
