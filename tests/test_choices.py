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
    assert llama.verdict.startswith("bf16 ✓") and "nf4 ✓" in llama.verdict
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
