"""Chats, logs and exports are private: the folders chatapp makes are 0700, its files 0600."""

from __future__ import annotations

import errno
import os

import pytest

from chatapp.private import private_dir, write_private_text
from chatapp.store import Store


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_data_dir_and_its_chat_database_are_the_users_alone(tmp_path):
    data = tmp_path / "new" / "data"
    with Store.open(data) as store:
        store.add_message(store.new_conversation("Secret").id, "user", "my password is hunter2")
    assert mode(data) == 0o700
    assert mode(data / "chatapp.db") == 0o600
    for extra in ("chatapp.db-wal", "chatapp.db-shm"):
        if (data / extra).exists():
            assert mode(data / extra) == 0o600


def test_a_database_made_world_readable_by_an_older_version_is_tightened(tmp_path):
    with Store.open(tmp_path):
        pass
    os.chmod(tmp_path / "chatapp.db", 0o644)
    with Store.open(tmp_path):
        pass
    assert mode(tmp_path / "chatapp.db") == 0o600


def test_an_existing_folder_keeps_the_mode_its_owner_gave_it(tmp_path):
    os.chmod(tmp_path, 0o755)
    assert private_dir(tmp_path) == tmp_path and mode(tmp_path) == 0o755


def test_the_library_log_is_private(tmp_path):
    import subprocess
    import sys

    code = (
        "import logging, sys; from chatapp.logs import route_library_logs; route_library_logs(sys.argv[1]); "
        "logging.getLogger('accelerate.utils').warning('a library record')"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], check=True)  # it changes global logging
    log = tmp_path / "data" / "chatapp.log"
    assert "a library record" in log.read_text() and mode(log) == 0o600 and mode(tmp_path / "data") == 0o700


def test_an_export_is_private_and_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "chat.md"
    write_private_text(target, "# Secret chat\n")
    assert target.read_text() == "# Secret chat\n" and mode(target) == 0o600

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # the disk fills as the file is put in place
    with pytest.raises(OSError):
        write_private_text(tmp_path / "other.md", "x" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.md"]
