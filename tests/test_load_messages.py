"""Load errors that used to stop short (issue 12, weak item "messages that stop short"): a missing tokenizer says
which files it needs, and a model or tokenizer that needs its own code names --trust-remote-code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatapp.cli import main
from chatapp.errors import first_line


def linked_copy(tiny_folder: Path, out: Path, *, drop: tuple[str, ...] = (), edit: tuple[str, ...] = ()) -> Path:
    """tiny_folder with some files left out, and the files in `edit` copied (not linked) so a test can change them."""
    out.mkdir(parents=True)
    for path in tiny_folder.iterdir():
        if path.name in edit:
            (out / path.name).write_bytes(path.read_bytes())
        elif path.name not in drop:
            (out / path.name).symlink_to(path)
    return out


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err
    errors = [line for line in err.splitlines() if line.startswith("chatapp: error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert "Do you wish to run the custom code" not in captured.out + err  # nothing asks on stdin
    return errors[0]


#: kind -> (files left out, what the error must say)
NO_TOKENIZER = {
    "no tokenizer files at all": (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer: "),
    "only tokenizer_config.json": (("tokenizer.json",), "has no tokenizer: "),
}


@pytest.mark.parametrize("kind", list(NO_TOKENIZER))
def test_a_missing_tokenizer_says_which_files_it_needs(kind, tiny_folder, tmp_path, capsys):
    drop, words = NO_TOKENIZER[kind]
    folder = linked_copy(tiny_folder, tmp_path / "model", drop=drop)
    assert main(["ask", "Hello", "--model", str(folder), "--preset", "fp32"]) == 1
    line = one_error_line(capsys)
    assert words in line and str(folder) in line
    assert "none of tokenizer.json, tokenizer.model, vocab.json" in line and "download the model again" in line


def test_a_broken_tokenizer_names_its_file_and_the_whole_reason(tiny_folder, tmp_path, capsys):
    folder = linked_copy(tiny_folder, tmp_path / "model", drop=("tokenizer.json",))
    (folder / "tokenizer.json").write_text("{not json")
    assert main(["ask", "Hello", "--model", str(folder), "--preset", "fp32"]) == 1
    line = one_error_line(capsys)
    assert f"can't load the tokenizer of '{folder}' from tokenizer.json in {folder}: " in line
    assert not line.endswith(":") and not line.endswith("one of:")


@pytest.mark.parametrize(
    "message, line",
    [
        (
            "Couldn't build the tokenizer from one of: \n(1) a file, \n(2) an instance or \n\nYou need x.",
            "Couldn't build the tokenizer from one of: (1) a file, (2) an instance or You need x.",
        ),
        ("Expected one of:\n  a\n  b", "Expected one of: a b"),
        ("the first line says it all\nand this is detail", "the first line says it all"),
        ("\n\n  leading blank lines\nmore", "leading blank lines"),
    ],
)
def test_first_line_never_stops_at_a_colon(message, line):
    assert first_line(ValueError(message)) == line


def model_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="xllama",
        auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_x.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n    model_type = 'xllama'\n"
    )
    (folder / "modeling_x.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import XConfig\n\n\n"
        "class XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n"
    )


def tokenizer_code(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_x.XTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_x.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass XTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )


REMOTE_CODE = {
    "the model's code": (model_code, "config.json", "auto_map in config.json names configuration_x.XConfig"),
    "the tokenizer's code": (tokenizer_code, "tokenizer_config.json", "its tokenizer's code"),
}


@pytest.mark.parametrize("kind", list(REMOTE_CODE))
def test_remote_code_is_refused_naming_the_flag_and_runs_with_it(kind, tiny_folder, tmp_path, capsys):
    add_code, edited, words = REMOTE_CODE[kind]
    folder = linked_copy(tiny_folder, tmp_path / "model", edit=(edited,))
    add_code(folder)
    args = ["ask", "Hello", "--model", str(folder), "--preset", "fp32", "--max-new-tokens", "2"]
    assert main(args) == 1
    line = one_error_line(capsys)
    assert words in line and "pass --trust-remote-code if you trust it" in line and "models.toml" in line
    assert main([*args, "--trust-remote-code"]) == 0
    assert "trust_remote_code is on" in capsys.readouterr().err
