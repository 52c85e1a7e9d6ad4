"""Pages of a mapped checkpoint that the loaded model no longer reads go back to the kernel (engine/mapped.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatapp.engine import loader, mapped

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")

MB = 2**20


def resident_bytes(address: int) -> int:
    """The resident bytes of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds that address")


def test_only_the_pages_no_tensor_reads_are_dropped(tmp_path):
    path = tmp_path / "weights.bin"
    content = torch.arange(4 * MB, dtype=torch.int64).remainder(251).to(torch.uint8)
    path.write_bytes(content.numpy().tobytes())
    whole = torch.from_file(str(path), shared=False, size=4 * MB, dtype=torch.uint8)
    module = torch.nn.Module()
    module.register_buffer("kept", whole[MB + 100 : 2 * MB + 100])  # not on page boundaries
    module.register_buffer("elsewhere", torch.ones(3))  # anonymous memory: never dropped
    assert int(whole.sum()) == int(content.sum())  # every page read in
    module.kept[7] = 0  # a page of the buffer now differs from the file (copy-on-write)
    assert resident_bytes(whole.data_ptr()) >= 2 * MB

    # The page holding the buffer's start is dropped only up to it; the page its end shares stays.
    assert mapped.release_unused(module) == 3 * MB - 4096
    # At most the buffer's pages stay (fewer where the kernel maps the file in huge pages and unmaps them whole).
    assert resident_bytes(whole.data_ptr()) <= MB + 4096
    expected = content[MB + 100 : 2 * MB + 100].clone()
    expected[7] = 0
    assert torch.equal(module.kept, expected)
    assert torch.equal(module.elsewhere, torch.ones(3))
    # A dropped page read again comes back from the file.
    assert torch.equal(whole[:MB], content[:MB])


def test_a_quantized_model_keeps_only_what_it_reads_of_its_checkpoint(starter_folder, settings):
    """nf4 reads every bf16 weight to quantize it; only the embeddings and norms still read the file after."""
    loaded = loader.load_model(str(starter_folder), "nf4", settings=settings)
    model = loaded.model
    embeddings = model.get_input_embeddings().weight
    size = (starter_folder / "model.safetensors").stat().st_size
    with torch.inference_mode():
        reply = model.generate(
            **loaded.tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=3, do_sample=False
        )
    assert "Paris" in loaded.tokenizer.decode(reply[0])
    assert resident_bytes(embeddings.data_ptr()) < embeddings.nbytes + 0.02 * size
