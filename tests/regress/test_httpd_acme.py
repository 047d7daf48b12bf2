"""httpd's built-in ACME (`tls acme "HANDLE"`) against pebble on loopback.

Checked from the outside: the certificate a TLS port presents (serial,
issuer, chain against pebble's root), the log lines (`issued`, `renewed`,
`next attempt in N seconds`), the files, and a client loop that must
never see a failed connection while certificates change.  Short lifetimes
come from pebble's certificateValidityPeriod, short back-offs from
HTTPD_ACME_BASE.  No waits are asserted: every wait is a bounded poll.
"""

from __future__ import annotations

import fcntl
import os
import re
import ssl
import threading
import time

import pytest
from cryptography import x509

from tests.conftest import free_port
from tests.regress.acme_helpers import (AcmeHttpd, ChallengeForwarder, Domain,
                                        RateLimitProxy, needs_pebble, net_facts, start_pebble)
from tests.regress.httpd_helpers import wait_for

pytestmark = [needs_pebble]

ISSUED = re.compile(r"certificate (\S+) (issued|renewed), serial ([0-9a-f]+), expires \S+Z")
NEXT = re.compile(r"failed \((.*)\), keeping the current files; next attempt in ([0-9.]+) seconds")


def new_domain(tmp_path, api: str, handle: str = "example.test", **kw) -> Domain:
    dom = Domain(tmp_path / "d", handle, api, tmp_path / "acme", keytype="ecdsa", **kw)
    dom.write_conf()
    return dom


def issued(out: str) -> list[tuple[str, str, int]]:
    return [(m[1], m[2], int(m[3], 16)) for m in ISSUED.finditer(out)]


def is_pebble(cert) -> bool:
    return "Pebble" in cert.issuer.rfc4514_string()


def pebble_served(h: AcmeHttpd, what: str = "a pebble certificate") -> x509.Certificate:
    """Poll until `h` serves a certificate pebble issued (bounded)."""
    def get():
        cert = h.served()
        return cert if is_pebble(cert) else None
    return wait_for(get, 60, what)


def output_when(h: AcmeHttpd, cond, what: str, timeout: float = 60) -> str:
    """Poll until cond(output) holds; returns that output (bounded)."""
    def get():
        out = h.output()
        return out if cond(out) else None
    return wait_for(get, timeout, what)


def test_first_start_then_restart(tmp_path):
    """No files: the TLS port serves a self-signed stand-in at once, then
    pebble's certificate (logged as issued); the challenges were answered
    by httpd itself.  A restart with the files does not order again."""
    pebble = start_pebble(tmp_path / "pebble")
    try:
        dom = new_domain(tmp_path, pebble.url, alt=("www.example.test",))
        h = AcmeHttpd(tmp_path / "site", dom, pebble.ca, pebble.http_port).start()
        try:
            first = h.served()
            assert not is_pebble(first) or dom.cert.exists()
            cert = pebble_served(h)
            h.settled()         # from here on no server has the stand-in
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert sorted(san.value.get_values_for_type(x509.DNSName)) == \
                ["example.test", "www.example.test"]
            assert h.served("www.example.test").serial_number == cert.serial_number
            out = output_when(h, issued, "issued line")
            assert issued(out) == [("example.test", "issued", cert.serial_number)]
            assert dom.leaf().serial_number == cert.serial_number
            assert "serving a temporary self-signed one" in out
            log = h.site.log_lines()
            hits = [ln for ln in log if "/.well-known/acme-challenge/" in ln]
            assert hits and all('" 200 ' in ln for ln in hits), log
            # the chain served verifies against pebble's root
            ctx = ssl.create_default_context(cadata=pebble.mgmt_get("/roots/0")[1].decode())
            ctx.check_hostname = False
            import socket
            with socket.create_connection(("127.0.0.1", h.tls), timeout=10) as s, \
                    ctx.wrap_socket(s, server_hostname="example.test"):
                pass
        finally:
            h.stop()
        h2 = AcmeHttpd(tmp_path / "site2", dom, pebble.ca, pebble.http_port).start()
        try:
            assert h2.served().serial_number == cert.serial_number
            time.sleep(1)           # a few renewer rounds (base 0.3 s): none may order
            out = h2.output()
            assert "issuance" not in out and "renewal" not in out and not issued(out), out
            assert dom.leaf().serial_number == cert.serial_number
        finally:
            h2.stop()
    finally:
        pebble.stop()


class ClientLoop:
    """TLS connections with one GET each, back to back, in a thread;
    records every serial seen and every failure."""

    def __init__(self, port: int, name: str) -> None:
        self.port, self.name = port, name
        self.serials: list[int] = []
        self.failures: list[str] = []
        self.requests = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        import socket
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        while not self.done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s, \
                        ctx.wrap_socket(s, server_hostname=self.name) as t:
                    serial = x509.load_der_x509_certificate(t.getpeercert(True)).serial_number
                    t.sendall(f"GET / HTTP/1.1\r\nHost: {self.name}\r\n"
                              "Connection: close\r\n\r\n".encode())
                    data = b""
                    while chunk := t.recv(65536):
                        data += chunk
                if not data.startswith(b"HTTP/1.1 200 ") or not data.endswith(b"hello\n"):
                    self.failures.append(repr(data[:100]))
                if not self.serials or self.serials[-1] != serial:
                    self.serials.append(serial)
                self.requests += 1
            except (OSError, ssl.SSLError) as e:
                self.failures.append(repr(e))
            time.sleep(0.02)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)


def test_renewal_without_signal(tmp_path):
    """30-second certificates: renewed when a third of the lifetime is
    left, each served through a reload, with no signal, while a client
    loop sees no failed connection."""
    pebble = start_pebble(tmp_path / "pebble", validity=30)
    try:
        dom = new_domain(tmp_path, pebble.url)
        h = AcmeHttpd(tmp_path / "site", dom, pebble.ca, pebble.http_port).start()
        loop = ClientLoop(h.tls, dom.handle)
        try:
            wait_for(lambda: len([e for e in issued(h.output()) if e[1] == "renewed"]) >= 1,
                     120, "a renewal")
            # the renewed certificate reaches the client loop
            renewed = [e[2] for e in issued(h.output())]
            wait_for(lambda: renewed[1] in loop.serials, 30, "the renewed serial served")
        finally:
            loop.stop()
            h.stop()
        out = h.output()
        assert loop.failures == [], (loop.failures, out)
        assert loop.requests > 10
        kinds = [e[1] for e in issued(out)]
        assert kinds[0] == "issued" and "renewed" in kinds
        # In the order issued (by first sight: while an old generation of
        # servers drains, a connection may still get the previous one).
        first_seen = list(dict.fromkeys(s for s in loop.serials if s in renewed))
        assert first_seen[:2] == renewed[:2]
        assert "parent_reload: certificates reloaded" in out
    finally:
        pebble.stop()


def test_ca_down_keeps_certificate_and_backs_off(tmp_path):
    """The CA goes away after issuance: the certificate stays served and
    on disk, and each failed attempt is logged with a longer wait."""
    pebble = start_pebble(tmp_path / "pebble", validity=12)
    try:
        dom = new_domain(tmp_path, pebble.url)
        h = AcmeHttpd(tmp_path / "site", dom, pebble.ca, pebble.http_port, base=0.2).start()
        try:
            wait_for(lambda: issued(h.output()), 60, "issued")
            h.settled()
        finally:
            pebble.stop()
        try:
            serial = issued(h.output())[0][2]
            before = dom.snapshot()
            out = output_when(h, lambda o: len(NEXT.findall(o)) >= 3, "three failed attempts")
            waits = [float(w) for _, w in NEXT.findall(out)]
            assert waits[0] < waits[1] < waits[2], out
            assert out.count("renewal, attempt ") >= 3
            assert "renewal, attempt 3" in out
            assert h.served().serial_number == serial
            assert dom.snapshot() == before
            assert [p for p in os.listdir(dom.cert.parent)
                    if p.startswith(".") and not p.endswith(".lock")] == []
        finally:
            h.stop()
    finally:
        pebble.stop()


def test_rate_limited(tmp_path):
    """429 with a short Retry-After is waited out by the net process; a
    long one becomes the scheduler's next wait (beyond the back-off)."""
    pebble = start_pebble(tmp_path / "pebble")
    try:
        proxy = RateLimitProxy(pebble)
        try:
            dom = new_domain(tmp_path, proxy.url)
            h = AcmeHttpd(tmp_path / "site", dom, pebble.ca, pebble.http_port).start()
            try:
                wait_for(lambda: issued(h.output()), 60, "issued")
                out = h.output()
                assert "429 rateLimited: too many new orders; retrying after 1 seconds" in out
                assert proxy.limited == 1
            finally:
                h.stop()
        finally:
            proxy.stop()
        proxy = RateLimitProxy(pebble, retry_after="3600")
        try:
            dom = new_domain(tmp_path / "long", proxy.url)
            h = AcmeHttpd(tmp_path / "site2", dom, pebble.ca, pebble.http_port).start()
            try:
                out = output_when(h, NEXT.search, "a failed attempt")
                why, wait = NEXT.search(out).groups()
                assert "rateLimited" in why and float(wait) >= 3600, out
                time.sleep(1)         # several base intervals: no second order
                assert proxy.limited == 1 and not dom.cert.exists()
                assert not is_pebble(h.served())
            finally:
                h.stop()
        finally:
            proxy.stop()
    finally:
        pebble.stop()


def test_two_instances_share_directory(tmp_path):
    """Two instances, one certificate directory: each certificate is
    ordered once (the lock), the other instance serves the new files
    without contacting the CA."""
    pebble = start_pebble(tmp_path / "pebble", validity=20)
    ports = [free_port(), free_port()]
    fwd = ChallengeForwarder(pebble.http_port, ports)
    try:
        dom = new_domain(tmp_path, pebble.url)
        a = AcmeHttpd(tmp_path / "a", dom, pebble.ca, ports[0]).start()
        b = AcmeHttpd(tmp_path / "b", dom, pebble.ca, ports[1]).start()
        try:
            def both_renewed():
                got = issued(a.output()) + issued(b.output())
                return len(got) >= 2 and got
            wait_for(both_renewed, 120, "issued and renewed")
            ordered = sorted(issued(a.output()) + issued(b.output()), key=lambda e: e[1])
            newest = dom.leaf().serial_number
            wait_for(lambda: a.served().serial_number == b.served().serial_number == newest,
                     30, "both instances serving the newest files")
            out = a.output() + b.output()
            # every order produced a distinct certificate: never two at once
            assert len({e[2] for e in ordered}) == len(ordered), out
            attempts = re.findall(r"certificate example\.test: (issuance|renewal), attempt", out)
            assert len(attempts) == len(issued(a.output()) + issued(b.output())), out
            assert "new files, serial" in out
        finally:
            a.stop()
            b.stop()
    finally:
        fwd.stop()
        pebble.stop()


def test_lock_held_elsewhere(tmp_path):
    """While someone else holds `<certdir>/.<handle>.lock`, httpd does not
    order (it serves the stand-in); once the lock is free it does."""
    pebble = start_pebble(tmp_path / "pebble")
    try:
        dom = new_domain(tmp_path, pebble.url)
        lock = os.open(dom.cert.parent / f".{dom.handle}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            h = AcmeHttpd(tmp_path / "site", dom, pebble.ca, pebble.http_port).start()
            try:
                wait_for(lambda: "another instance is renewing" in h.output(), 30,
                         "the lock seen")
                time.sleep(1)        # several base intervals (0.3 s): still no order
                assert "issuance, attempt" not in h.output()
                assert not is_pebble(h.served())
            except BaseException:
                h.stop()
                raise
        finally:
            os.close(lock)           # closing the only descriptor releases the flock
        try:
            cert = pebble_served(h, "a pebble certificate once the lock is free")
            assert cert.serial_number == dom.leaf().serial_number
        finally:
            h.stop()
    finally:
        pebble.stop()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, setuid)")
def test_net_process_sandboxed(tmp_path):
    """While it talks to the CA (one that never answers), httpd's acme
    process runs as nobody chrooted to /var/empty, without the keys; the
    parent alone holds them."""
    import pwd
    import socket

    import psutil
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1)
    stalled.settimeout(60)
    import trustme
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    try:
        dom = new_domain(tmp_path, f"https://127.0.0.1:{stalled.getsockname()[1]}/dir")
        h = AcmeHttpd(tmp_path / "site", dom, tmp_path / "ca.pem", free_port()).start()
        try:
            conn, _ = stalled.accept()       # the acme process connected: sandboxed by now
            procs = [p for p in psutil.Process(h.daemon.pid).children()
                     if "acme" in " ".join(p.cmdline())]
            assert len(procs) == 1
            nobody = pwd.getpwnam("nobody").pw_uid
            assert net_facts(procs[0], dom) == (nobody, nobody, "/var/empty", False)
            assert dom.key.exists() and dom.account_key.exists()
            conn.close()
        finally:
            h.stop()
    finally:
        stalled.close()
