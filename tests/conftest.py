"""Shared fixtures: the converted starter model, and tiny random-weight Llama models built from it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from modelhelpers import TEST_DATA, build_tiny_model

_SCRATCH = Path(tempfile.mkdtemp(prefix="chatapp-tests-"))

# Tests never touch the network or the user's own config, data or Hub cache.
os.environ["CHATAPP_DATA_DIR"] = str(TEST_DATA)
os.environ["CHATAPP_CONFIG_DIR"] = str(_SCRATCH / "config")
os.environ["HF_HOME"] = str(_SCRATCH / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _deprecations_are_errors_in_children() -> str:
    """PYTHONWARNINGS for the processes tests start (`python -m chatapp.cli ...`, the worker).

    pyproject's filterwarnings reach only this process. Here the module field is an exact name, not a regex,
    so every module of chatapp and huggingface_hub is named (`python -m chatapp.cli` runs as __main__).
    """
    import importlib.util

    names = ["__main__"]
    for package in ("chatapp", "huggingface_hub"):
        top = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(top.rglob("*.py")):
            parts = path.relative_to(top.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return ",".join(f"error::{kind}:{name}" for name in names for kind in ("DeprecationWarning", "FutureWarning"))


os.environ["PYTHONWARNINGS"] = ",".join(
    filter(None, [_deprecations_are_errors_in_children(), os.environ.get("PYTHONWARNINGS")])
)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def settings():
    from chatapp.config import load_settings

    return load_settings()


@pytest.fixture(scope="session")
def starter_folder(settings) -> Path:
    from chatapp.catalog import load_catalog
    from chatapp.engine.loader import materialize
    from chatapp.refs import parse_ref

    return materialize(parse_ref("smollm2-135m-local", load_catalog()), settings)


@pytest.fixture(scope="session")
def tiny_folder(starter_folder, tmp_path_factory) -> Path:
    return build_tiny_model(starter_folder, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_words_folder(starter_folder, tmp_path_factory) -> Path:
    return build_tiny_model(starter_folder, tmp_path_factory.mktemp("tiny-words"), words_only=True)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_folder, settings):
    from chatapp.engine import load_model

    return load_model(str(tiny_folder), "fp32", settings=settings)


@pytest.fixture(scope="session")
def tiny_words_fp32(tiny_words_folder, settings):
    from chatapp.engine import load_model

    return load_model(str(tiny_words_folder), "fp32", settings=settings)


@pytest.fixture(scope="session")
def starter_fp32(starter_folder, settings):
    from chatapp.engine import load_model

    return load_model("smollm2-135m-local", "fp32", settings=settings)


@pytest.fixture(scope="session")
def hub_server(starter_folder, tiny_folder):
    """A Hub-compatible server on 127.0.0.1 serving the starter model and the tiny model; yields (server, url)."""
    from hubserver import HubServer

    server = HubServer()
    server.add("TestOrg/SmolLM2-135M-Instruct", starter_folder, downloads=100)
    server.add("TestOrg/tiny-llama", tiny_folder, downloads=5)
    server.add("TestOrg/gated-llama", tiny_folder, gated=True)
    server.add("OtherOrg/forbidden", tiny_folder, forbidden=True)
    url = server.start()
    yield server, url
    server.stop()


@pytest.fixture
def hub_env(hub_server, tmp_path):
    """Environment for a chatapp subprocess that talks to the test Hub with its own empty HF cache."""
    _server, url = hub_server
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    return env


@pytest.fixture
def huge_repo(hub_server, tiny_folder, tmp_path_factory):
    """A repo whose headers say a trillion parameters (no machine fits it) but whose weights file is 1 MB: what a
    pull fetches of it shows in the server's requests. Yields the server."""
    from hubserver import HUGE_REPO, write_huge_safetensors

    folder = tmp_path_factory.mktemp("huge-llama")
    for path in tiny_folder.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    write_huge_safetensors(folder / "model.safetensors")
    server, _url = hub_server
    server.add(HUGE_REPO, folder)
    server.requests.clear()
    yield server
    del server.repos[HUGE_REPO]


# -- `chatapp serve` on the tiny words-only model, for the test modules that ask for it (test_serve*.py) --


@pytest.fixture(scope="module")
def engine(tiny_words_fp32):
    """A serve Engine with 2 slots, one per test module: the modules' chats don't share its slots."""
    from chatapp.server.slots import Engine

    engine = Engine(tiny_words_fp32, slots=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def url(engine):
    """The base URL of `engine` served over HTTP on 127.0.0.1."""
    from servehelpers import serving

    with serving(engine) as base:
        yield base


@pytest.fixture
def client(url):
    """The official `openai` client on `url`."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
