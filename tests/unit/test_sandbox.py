"""shared.seccomp and shared.landlock, each in a fresh interpreter (a filter
or a Landlock domain cannot be taken back): what a promise set lets
through, what ends the process, what Landlock refuses.  No root needed."""

from __future__ import annotations

import signal
import subprocess
import textwrap

import pytest

from shared import landlock, seccomp
from tests.conftest import PYTHON, REPO

pytestmark = pytest.mark.skipif(not seccomp.available(), reason="no libseccomp.so.2")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_allowed_calls_of_stdio_rpath_inet():
    r = run("""
        import os, socket, trio
        from shared import seccomp
        seccomp.install(("stdio", "rpath", "inet"))
        s = socket.socket(); s.setblocking(False); s.close()
        a, b = socket.socketpair(); a.send(b"x"); assert b.recv(1) == b"x"
        with open("/etc/hostname", "rb") as f: f.read()
        async def main():
            assert await trio.to_thread.run_sync(lambda: 42) == 42
            await trio.sleep(0)
        trio.run(main)
        print("alive")
    """)
    assert r.returncode == 0 and r.stdout == "alive\n", r.stderr


@pytest.mark.parametrize("promises,call", [
    (("stdio", "rpath"), 'open("/tmp/tandem-seccomp-probe", "w")'),
    (("stdio", "rpath"), 'os.open("/etc/hostname", os.O_RDONLY | os.O_TRUNC)'),
    (("stdio", "rpath", "inet", "unix"), "os.execv('/bin/true', ['true'])"),
    (("stdio", "inet", "unix"), "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)"),
    (("stdio",), "socket.socket()"),
    (("stdio", "inet"), "os.fork()"),
    (("stdio", "inet"), "subprocess.run(['true'])"),
    (("stdio", "inet"), "socket.socket().bind(('127.0.0.1', 0))"),
])
def test_forbidden_call_ends_the_process(promises, call):
    r = run(f"""
        import os, socket, subprocess
        from shared import seccomp
        seccomp.install({promises!r})
        {call}
        print("alive")
    """)
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stderr)
    assert "alive" not in r.stdout


def test_read_only_open_without_rpath_fails_softly():
    r = run("""
        from shared import seccomp
        seccomp.install(("stdio",))
        try:
            open("/etc/hostname")
        except PermissionError:
            print("EACCES")
    """)
    assert r.returncode == 0 and r.stdout == "EACCES\n", r.stderr


@pytest.mark.skipif(landlock.abi() < 1, reason="no Landlock in this kernel")
def test_landlock_read_only_beneath(tmp_path):
    (tmp_path / "f").write_text("x")
    r = run(f"""
        from shared import landlock
        print(landlock.restrict(read=({str(tmp_path)!r},), connect=None))
        assert open({str(tmp_path / "f")!r}).read() == "x"
        for path, mode in (({str(tmp_path / "f")!r}, "a"), ({str(tmp_path / "g")!r}, "w"),
                           ("/etc/hostname", "r")):
            try:
                open(path, mode)
            except PermissionError:
                print("EACCES", mode)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == ["EACCES a", "EACCES w", "EACCES r"]


@pytest.mark.skipif(landlock.abi() < 4, reason="Landlock ABI < 4: no port rules")
def test_landlock_connect_only_to_allowed_ports():
    r = run("""
        import socket
        from shared import landlock
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0)); a.listen(); b.bind(("127.0.0.1", 0)); b.listen()
            ok, no = a.getsockname()[1], b.getsockname()[1]
            assert landlock.restrict(connect=(ok,)) == []
            # connect(), not create_connection(): getaddrinfo would import
            # encodings.idna, which the sandbox no longer lets it read.
            socket.socket().connect(("127.0.0.1", ok))
            try:
                socket.socket().connect(("127.0.0.1", no))
            except PermissionError:
                print("EACCES")
    """)
    assert r.returncode == 0 and r.stdout == "EACCES\n", r.stderr
