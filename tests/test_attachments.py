"""Files and pastes in a message: what can be attached, how `@path` is found and completed, and the text the
model sees."""

from __future__ import annotations

import os

import pytest

from chatapp.attachments import (
    MAX_BYTES,
    PASTE_CHARS,
    PASTE_LINES,
    Attachment,
    AttachmentError,
    complete_path,
    find_references,
    is_large_paste,
    message_text,
    paste_label,
    read_attachment,
)
from chatapp.errors import ChatappError

# -- read_attachment ---------------------------------------------------------------------------


def test_a_text_file_is_read_relative_to_cwd_with_the_name_as_written(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("héllo\n", encoding="utf-8")
    attachment = read_attachment("notes/a.md", tmp_path)
    assert attachment == Attachment("notes/a.md", "héllo\n", "file")
    assert read_attachment(str(tmp_path / "notes" / "a.md"), tmp_path / "notes").content == "héllo\n"


def test_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "todo.txt").write_text("milk")
    assert read_attachment("~/todo.txt", tmp_path / "elsewhere") == Attachment("~/todo.txt", "milk", "file")


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfplain")
    assert read_attachment("bom.txt", tmp_path).content == "plain"


def _refusal(path_text: str, cwd) -> str:
    with pytest.raises(AttachmentError) as caught:
        read_attachment(path_text, cwd)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, ChatappError)
    return message


def test_each_file_that_cant_be_attached_is_one_line_naming_the_path_and_why(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "big.txt").write_text("a" * (MAX_BYTES + 1))
    (tmp_path / "folder").mkdir()
    assert _refusal("missing.txt", tmp_path) == "can't attach 'missing.txt': no such file"
    assert (
        _refusal("image.png", tmp_path)
        == "can't attach 'image.png': it is a binary file; only text files can be attached"
    )
    assert _refusal("latin1.txt", tmp_path) == "can't attach 'latin1.txt': it is not UTF-8 text (byte 3 is not)"
    assert _refusal("big.txt", tmp_path) == (
        f"can't attach 'big.txt': it is {MAX_BYTES + 1:,} bytes, over the {MAX_BYTES:,}-byte limit for an attachment"
    )
    assert _refusal("folder", tmp_path) == "can't attach 'folder': it is a folder; attach the files in it one by one"
    assert _refusal("  ", tmp_path) == "can't attach a file without a path"


def test_a_file_of_exactly_the_limit_is_attached(tmp_path):
    (tmp_path / "edge.txt").write_text("a" * MAX_BYTES)
    assert len(read_attachment("edge.txt", tmp_path).content) == MAX_BYTES


def test_a_nul_after_the_first_8_kb_is_not_taken_for_binary_but_other_files_are_refused(tmp_path):
    (tmp_path / "late.txt").write_bytes(b"a" * 8192 + b"\0")
    assert read_attachment("late.txt", tmp_path).content.endswith("\0")
    assert "not a regular file" in _refusal("/dev/null", tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hidden")
    secret.chmod(0)
    try:
        assert _refusal("secret.txt", tmp_path) == "can't attach 'secret.txt': permission denied"
    finally:
        secret.chmod(0o600)


# -- message_text ------------------------------------------------------------------------------


def test_without_attachments_the_message_is_the_text_itself():
    assert message_text("Hello?", []) == "Hello?"


def test_each_attachment_is_its_name_then_a_fenced_block_then_the_text():
    attachments = [Attachment("a.py", "print(1)\n"), Attachment("pasted text", "no newline", "paste")]
    assert message_text("What do these do?", attachments) == (
        "a.py\n```\nprint(1)\n```\n\npasted text\n```\nno newline\n```\n\nWhat do these do?"
    )
    assert message_text("", attachments[:1]) == "a.py\n```\nprint(1)\n```"


def test_a_file_with_fences_of_its_own_gets_a_longer_fence():
    readme = "# Title\n\n```sh\nmake\n```\n\nand ````four```` too\n"
    text = message_text("Summarise", [Attachment("README.md", readme)])
    assert text == f"README.md\n`````\n{readme}`````\n\nSummarise"


# -- find_references ---------------------------------------------------------------------------


def test_references_start_at_the_start_or_after_whitespace_and_an_email_is_none():
    text = "@a.md compare with\t@src/b.py, mail me at me@example.com or @~/notes.txt?"
    assert find_references(text) == ["a.md", "src/b.py", "~/notes.txt"]
    assert find_references("no refs here, not even foo@bar or a lone @") == []
    assert find_references("@x.md and @x.md again") == ["x.md"]


def test_a_mention_that_isnt_a_path_is_no_reference_unless_the_file_exists(tmp_path):
    assert find_references("thanks @alice, see @notes.md", tmp_path) == ["notes.md"]
    (tmp_path / "Makefile").write_text("")
    assert find_references("what does @Makefile do? ask @bob", tmp_path) == ["Makefile"]


def test_trailing_punctuation_is_kept_only_when_the_file_has_it(tmp_path):
    (tmp_path / "odd.txt,").write_text("")
    (tmp_path / "plain.txt").write_text("")
    assert find_references("see @odd.txt, and @plain.txt.", tmp_path) == ["odd.txt,", "plain.txt"]
    assert find_references("see @odd.txt, and @plain.txt.") == ["odd.txt", "plain.txt"]


# -- complete_path -----------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("")
    (tmp_path / "setup.cfg").write_text("")
    (tmp_path / "README.md").write_text("")
    (tmp_path / ".env").write_text("")
    (tmp_path / ".git").mkdir()
    return tmp_path


def test_completion_lists_matches_sorted_with_folders_marked(tree):
    assert complete_path("s", tree) == ["setup.cfg", "src/"]
    assert complete_path("", tree) == ["README.md", "setup.cfg", "src/"]
    assert complete_path("src/", tree) == ["src/main.py"]
    assert complete_path("src/m", tree) == ["src/main.py"]
    assert complete_path("nothing/", tree) == []
    assert complete_path("", tree, limit=2) == ["README.md", "setup.cfg"]


def test_hidden_entries_only_when_the_typed_part_starts_with_a_dot(tree):
    assert complete_path(".", tree) == [".env", ".git/"]
    assert complete_path(".g", tree) == [".git/"]


def test_completion_from_the_home_folder(tree, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HOME", str(tree))
    elsewhere = tmp_path_factory.mktemp("cwd")
    assert complete_path("~", elsewhere) == ["~/"]
    assert complete_path("~/", elsewhere) == ["~/README.md", "~/setup.cfg", "~/src/"]
    assert complete_path("~/src/ma", elsewhere) == ["~/src/main.py"]
    assert complete_path(str(tree / "R"), elsewhere) == [str(tree / "README.md")]


# -- pastes ------------------------------------------------------------------------------------


def test_a_paste_is_large_over_the_character_or_line_limit():
    assert not is_large_paste("a" * PASTE_CHARS)
    assert is_large_paste("a" * (PASTE_CHARS + 1))
    assert not is_large_paste("line\n" * PASTE_LINES)
    assert is_large_paste("line\n" * (PASTE_LINES + 1))


def test_the_paste_label_counts_characters():
    assert paste_label("x" * 12345) == "pasted 12,345 chars"
    assert paste_label("hi") == "pasted 2 chars"
