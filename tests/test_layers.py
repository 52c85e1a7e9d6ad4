"""The layers stay apart: the engine never imports textual; the light modules never import torch."""

from __future__ import annotations

import subprocess
import sys


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_engine_does_not_import_textual():
    modules = imported_after("import chatapp.engine, chatapp.engine.bench")
    assert "torch" in modules
    assert not any(m == "textual" or m.startswith("textual.") for m in modules)


def test_light_modules_do_not_import_torch():
    modules = imported_after(
        "import chatapp.cli, chatapp.config, chatapp.catalog, chatapp.refs, chatapp.planner, "
        "chatapp.hardware, chatapp.hub, chatapp.protocol, chatapp.facts, chatapp.report, chatapp.progress, "
        "chatapp.cli_hub, chatapp.sampling, chatapp.units, "
        "chatapp.hub_download, chatapp.store, chatapp.worker_client, chatapp.choices, chatapp.engine.worker"
    )
    assert "torch" not in modules
    assert "transformers" not in modules
    # DESIGN: the engine, hub, planner and store never import textual either.
    assert not any(m == "textual" or m.startswith("textual.") for m in modules)
