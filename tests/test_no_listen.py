"""Nothing listens on a port unless the user ran `chatapp serve`: the app and its worker open no listening socket.

Read from /proc (Linux): a process's sockets are its fds that link to `socket:[INODE]`; /proc/net/tcp, tcp6 and
unix say which inodes are listening.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from uihelpers import loaded, make_app, make_settings, run, say

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")

#: /proc/net/tcp's state column for LISTEN.
TCP_LISTEN = "0A"
#: /proc/net/unix's flags bit for a socket accepting connections (__SO_ACCEPTCON).
UNIX_ACCEPTING = 0x10000


def listening_inodes() -> set[str]:
    inodes = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if path.exists():
            for line in path.read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == TCP_LISTEN:
                    inodes.add(fields[9])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & UNIX_ACCEPTING:
            inodes.add(fields[6])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def test_listening_sockets_are_seen(tmp_path):
    """The check itself: a socket this process listens on is found, and is gone once closed."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        inode = str(os.fstat(server.fileno()).st_ino)
        assert inode in socket_inodes(os.getpid()) & listening_inodes()
    assert inode not in listening_inodes()


def test_the_app_and_its_worker_listen_on_nothing(settings, tiny_words_folder, tmp_path):
    # Other tests' servers (the Hub stand-in) may listen in this process already: only new ones count.
    before = socket_inodes(os.getpid()) & listening_inodes()
    app = make_app(make_settings(settings, tmp_path), str(tiny_words_folder))

    async def scenario(pilot):
        await loaded(pilot)
        await say(pilot, "Hello there")
        worker = app.backend.client.pid
        assert worker is not None
        listening = listening_inodes()
        assert not (socket_inodes(os.getpid()) & listening) - before
        assert not socket_inodes(worker) & listening

    run(app, scenario)
