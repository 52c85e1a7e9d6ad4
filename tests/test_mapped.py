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


def read_in_order(path: Path) -> None:
    """Put a file in the page cache as a download or a copy leaves it: evicted, then read whole in order, which
    Linux (6.18, ext4) caches in folios of up to 2 MiB rather than pages."""
    import os

    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(descriptor, 2**20):
            pass
    finally:
        os.close(descriptor)


def test_only_the_pages_no_tensor_reads_are_dropped_after_the_small_ones_are_copied_out(tmp_path):
    unit = mapped.SMALL  # the smallest tensor left mapped
    path = tmp_path / "weights.bin"
    content = torch.arange(4 * unit, dtype=torch.int64).remainder(251).to(torch.uint8)
    path.write_bytes(content.numpy().tobytes())
    whole = torch.from_file(str(path), shared=False, size=4 * unit, dtype=torch.uint8)
    module = torch.nn.Module()
    module.register_buffer("kept", whole[unit + 100 : 2 * unit + 100])  # not on page boundaries
    module.register_buffer("norm", whole[3 * unit + 50 : 3 * unit + 50 + 1152])  # small: copied out
    module.register_buffer("elsewhere", torch.ones(3))  # anonymous memory: never dropped
    assert int(whole.sum()) == int(content.sum())  # every page read in
    module.kept[7] = 0  # a page of the buffer now differs from the file (copy-on-write)
    assert resident_bytes(whole.data_ptr()) >= 2 * unit

    # The page holding the big buffer's start is dropped only up to it; the page its end shares stays. The small
    # buffer's pages go too, since it no longer reads them.
    assert mapped.release_unused(module) == 3 * unit - 4096
    # At most the buffer's pages stay (fewer where the kernel maps the file in huge pages and unmaps them whole).
    assert resident_bytes(whole.data_ptr()) <= unit + 4096
    expected = content[unit + 100 : 2 * unit + 100].clone()
    expected[7] = 0
    assert torch.equal(module.kept, expected)
    assert not whole.data_ptr() <= module.norm.data_ptr() < whole.data_ptr() + whole.nbytes
    assert torch.equal(module.norm, content[3 * unit + 50 : 3 * unit + 50 + 1152])
    assert torch.equal(module.elsewhere, torch.ones(3))
    # A dropped page read again comes back from the file.
    assert torch.equal(whole[:unit], content[:unit])


def test_a_quantized_model_keeps_only_what_it_reads_of_its_checkpoint(starter_folder, settings):
    """nf4 reads every bf16 weight to quantize it; only the embeddings still read the file after."""
    read_in_order(starter_folder / "model.safetensors")
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
