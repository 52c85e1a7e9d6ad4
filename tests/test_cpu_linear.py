"""bf16 Linear weights packed once for oneDNN (cpu_linear): the same logits to the bit, on every family in the
catalog, and only where the model computes in bf16 on the CPU.

The loader is told the CPU runs bf16 natively, so these run the same wherever torch's oneDNN has bf16 kernels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from modelhelpers import FAMILIES, build_family_model

from chatapp.engine import cpu_linear, kvcache, loader
from chatapp.engine.generate import forward, prefill

pytestmark = pytest.mark.skipif(not cpu_linear.supported(), reason="torch's oneDNN has no bf16 kernels on this CPU")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_folder(request, starter_folder, tmp_path_factory):
    return build_family_model(starter_folder, tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(loader, "_device_facts", lambda device: (True, None))


def _plain_linears(model) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]


def _logits(model, ids: list[int]) -> torch.Tensor:
    """A prefill, a later turn's rows on top of the cache, a verify's 7 rows and 3 decode steps."""
    cache = kvcache.new_cache(model.config)
    with torch.inference_mode():
        rows = [prefill(model, cache, ids[:40]).reshape(1, -1)]
        rows.append(forward(model, cache, ids[40:60], rows=20))
        rows.append(forward(model, cache, ids[60:67], rows=7))
        rows += [forward(model, cache, [token]) for token in ids[67:70]]
    return torch.cat(rows)


def test_each_family_computes_the_same_bits_with_packed_weights(family_folder, settings, native_bf16, monkeypatch):
    packed = loader.load_model(str(family_folder), "bf16", settings=settings)
    assert (packed.preset, packed.dtype) == ("bf16", "bf16")
    linears = [name for name, module in packed.model.named_modules() if isinstance(module, cpu_linear.PackedLinear)]
    assert linears and not _plain_linears(packed.model)
    assert all(packed.model.get_submodule(name).weight.is_mkldnn for name in linears)
    assert f"{len(linears)} Linear layers' bf16 weights packed once for oneDNN, not on every call" in packed.reasons

    monkeypatch.setattr(cpu_linear, "supported", lambda: False)
    plain = loader.load_model(str(family_folder), "bf16", settings=settings)
    assert sorted(_plain_linears(plain.model)) == sorted(linears)
    assert packed.footprint_bytes == plain.footprint_bytes

    ids = torch.randint(100, 5000, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    ours, theirs = _logits(packed.model, ids), _logits(plain.model, ids)
    assert ours.shape == (1 + 20 + 7 + 3, packed.model.config.vocab_size)
    assert torch.equal(ours, theirs)


def test_a_weight_tied_to_the_embeddings_is_left_shared(starter_folder, settings, native_bf16):
    loaded = loader.load_model(str(starter_folder), "bf16", settings=settings)
    model = loaded.model
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight is model.get_input_embeddings().weight
    assert not head.weight.is_mkldnn
    assert len(_plain_linears(model)) == 1
    with torch.inference_mode():
        reply = model.generate(
            **loaded.tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=3, do_sample=False
        )
    assert "Paris" in loaded.tokenizer.decode(reply[0])


def test_the_pages_of_the_weights_it_packed_leave_memory(starter_folder, settings, native_bf16):
    """The file's pages of a packed weight go back to the kernel (mapped.py); the embeddings' stay in use. The file
    is read in order first, as a download leaves it: in folios of up to 2 MiB, which a norm read from the file kept
    mapped whole (165 MiB resident, against 54 MiB of embeddings)."""
    from test_mapped import read_in_order, resident_bytes

    if not Path("/proc/self/smaps").exists():
        pytest.skip("reads Linux's /proc/self/smaps")
    read_in_order(starter_folder / "model.safetensors")
    loaded = loader.load_model(str(starter_folder), "bf16", settings=settings)
    model = loaded.model
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    embeddings = model.get_input_embeddings().weight
    packed = [m.weight for m in model.modules() if isinstance(m, cpu_linear.PackedLinear)]
    size = (starter_folder / "model.safetensors").stat().st_size
    assert sum(w.nelement() * w.element_size() for w in packed) > 0.75 * size
    assert resident_bytes(embeddings.data_ptr()) < embeddings.nbytes + 0.02 * size


@pytest.mark.parametrize("preset", ["fp32", "bf16"])
def test_models_that_compute_in_fp32_keep_their_weights(family_folder, settings, preset, monkeypatch):
    monkeypatch.setattr(loader, "_device_facts", lambda device: (False, None))
    loaded = loader.load_model(str(family_folder), preset, settings=settings)
    assert loaded.dtype == "fp32"
    assert not any(isinstance(module, cpu_linear.PackedLinear) for module in loaded.model.modules())
    assert not any(tensor.is_mkldnn for tensor in loaded.model.parameters())
