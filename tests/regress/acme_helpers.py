"""Helpers for the acme-client black-box tests: a real ACME server on loopback.

Pebble (Debian's `pebble`) with `pebble-challtestsrv` as its DNS (every name
is 127.0.0.1), its HTTPS certificate from a trustme CA the client trusts
through SSL_CERT_FILE; a Tandem httpd serving the challenge directory on
pebble's httpPort; `python -m acme_client` run to completion; a stub HTTPS
proxy in front of pebble that can answer 429 rateLimited; for httpd's
built-in ACME, an httpd with `tls acme` (AcmeHttpd), the certificate a TLS
port serves, and a forwarder that sends pebble's challenge requests to
whichever of several httpd instances answers them.

Nothing here asserts: the tests do.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import PYTHON, REPO, free_port, stop_process, wait_port
from tests.regress.httpd_helpers import make_site, start_site

# Outside CI a developer without pebble may skip these; in CI a missing
# pebble is a missing install step and the tests fail instead.
needs_pebble = pytest.mark.skipif(not os.environ.get("CI") and (
    shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None),
    reason="pebble not installed (.ci/install-deps)")

CHALLENGE_SERVER = """
server "acme" {
	listen on 127.0.0.1 port {port}
	location "/.well-known/acme-challenge/*" {
		root "/acme"
		request strip 2
	}
}
"""


@dataclass
class Pebble:
    """One pebble + pebble-challtestsrv; stop() ends both by PID."""
    dir: Path
    port: int
    mgmt: int
    http_port: int
    env: dict
    procs: list = field(default_factory=list)

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self, validity: int | None = None) -> "Pebble":
        import trustme
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(self.ca))
        leaf.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        dns, chall_mgmt = free_port(), free_port()
        conf = {"listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.mgmt}",
                "certificate": "cert.pem", "privateKey": "key.pem",
                "httpPort": self.http_port, "tlsPort": free_port(),
                "ocspResponderURL": "", "externalAccountBindingRequired": False}
        if validity is not None:
            conf["certificateValidityPeriod"] = validity
        (self.dir / "pebble.json").write_text(json.dumps({"pebble": conf}))
        log = open(self.dir / "pebble.log", "wb")
        self.procs.append(subprocess.Popen(
            ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
             "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{chall_mgmt}"],
            cwd=self.dir, stdout=log, stderr=subprocess.STDOUT))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
               "PEBBLE_AUTHZREUSE": "0", **self.env}
        self.procs.append(subprocess.Popen(
            ["pebble", "-config", "pebble.json", "-strict=false",
             "-dnsserver", f"127.0.0.1:{dns}"],
            cwd=self.dir, env=env, stdout=log, stderr=subprocess.STDOUT))
        wait_port(self.port, proc=self.procs[-1])
        wait_port(self.mgmt, proc=self.procs[-1])
        return self

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p)

    def mgmt_get(self, path: str) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        conn = http.client.HTTPSConnection("127.0.0.1", self.mgmt, context=ctx, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.mgmt_get("/roots/0")[1])

    def cert_status(self, serial: int) -> dict:
        status, body = self.mgmt_get(f"/cert-status-by-serial/{serial:x}")
        return json.loads(body) if status == 200 else {"status": status}


def start_pebble(tmp: Path, env: dict | None = None, validity: int | None = None) -> Pebble:
    tmp.mkdir(parents=True, exist_ok=True)
    return Pebble(tmp, free_port(), free_port(), free_port(), env or {}).start(validity)


def start_challenge_httpd(tmp: Path, port: int):
    """A Tandem httpd whose challenge location serves `<site>/acme`."""
    site = make_site(tmp, port)
    (site.dir / "acme").mkdir(mode=0o755)
    os.chmod(site.dir, 0o755)
    return start_site(site, CHALLENGE_SERVER)


@dataclass
class Domain:
    """A domain block's files under `dir`, and the acme-client.conf for it."""
    dir: Path
    handle: str
    api: str
    challengedir: Path
    keytype: str = "rsa"
    account_keytype: str = "ecdsa"
    alt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        certs = self.dir / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        self.cert, self.chain, self.fullchain = (
            certs / n for n in ("cert.pem", "chain.pem", "fullchain.pem"))
        self.key, self.account_key, self.conf = (
            self.dir / n for n in ("domain.key", "account.key", "acme-client.conf"))

    def files(self) -> list[Path]:
        return [self.cert, self.chain, self.fullchain, self.key, self.account_key]

    def snapshot(self) -> dict[str, bytes | None]:
        return {p.name: p.read_bytes() if p.exists() else None for p in self.files()}

    def write_conf(self) -> Path:
        alt = f"\talternative names {{ {', '.join(self.alt)} }}\n" if self.alt else ""
        self.conf.write_text(
            f'ca_url = "{self.api}"\n'
            f"authority pebble {{\n\tapi url $ca_url\n"
            f'\taccount key "{self.account_key}" {self.account_keytype}\n'
            f'\tcontact "mailto:ops@{self.handle}"\n}}\n'
            f"domain {self.handle} {{\n{alt}"
            f'\tdomain key "{self.key}" {self.keytype}\n'
            f'\tdomain certificate "{self.cert}"\n'
            f'\tdomain chain certificate "{self.chain}"\n'
            f'\tdomain full chain certificate "{self.fullchain}"\n'
            f'\tchallengedir "{self.challengedir}"\n'
            f"\tsign with pebble\n}}\n")
        return self.conf

    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())


def acme_client(dom: Domain, *flags: str, ca: Path | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m acme_client -v FLAGS -f CONF HANDLE` from the repo root."""
    env = dict(os.environ)
    env.pop("SSL_CERT_FILE", None)       # None: the system trust store
    if ca is not None:
        env["SSL_CERT_FILE"] = str(ca)
    return subprocess.run([PYTHON, "-m", "acme_client", "-v", *flags, "-f", str(dom.conf),
                           dom.handle], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


class RateLimitProxy:
    """An HTTPS proxy in front of pebble that answers the first `times`
    newOrders with 429 rateLimited and `Retry-After: retry_after`, and
    passes all else on (Host unchanged, so pebble's URLs point at the
    proxy)."""

    def __init__(self, pebble: Pebble, retry_after: str = "1", times: int = 1) -> None:
        self.pebble = pebble
        self.hits: list[str] = []
        self.limited = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.forward()

            do_HEAD = do_POST = do_GET

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.hits.append(f"{self.command} {self.path}")
                if self.command == "POST" and self.path.endswith("/order-plz") \
                        and proxy.limited < times:
                    proxy.limited += 1
                    doc = json.dumps({"type": "urn:ietf:params:acme:error:rateLimited",
                                      "detail": "too many new orders", "status": 429}).encode()
                    self.send_response(429)
                    self.send_header("Content-Type", "application/problem+json")
                    self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Length", str(len(doc)))
                    self.end_headers()
                    self.wfile.write(doc)
                    return
                ctx = ssl.create_default_context(cafile=str(proxy.pebble.ca))
                conn = http.client.HTTPSConnection("127.0.0.1", proxy.pebble.port,
                                                   context=ctx, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "content-length")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "content-length",
                                         "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(pebble.dir / "cert.pem"), str(pebble.dir / "key.pem"))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- httpd's built-in ACME ------------------------------------------------------------

ACME_PREFORK = 2
ACME_HTTPD = f"""
prefork {ACME_PREFORK}
acme config "{{acmeconf}}"
server "{{name}}" {{
{{aliases}}	listen on 127.0.0.1 port {{http}}
	listen on 127.0.0.1 tls port {{tls}}
	tls acme "{{handle}}"
}}
"""


@dataclass
class AcmeHttpd:
    """An httpd whose server `tls acme`s `dom`, plain on `http` (pebble's
    httpPort, or a port the ChallengeForwarder knows), TLS on `tls`.
    `base`: HTTPD_ACME_BASE (back-off base and file-check interval)."""
    dir: Path
    dom: Domain
    ca: Path
    http: int
    base: float = 0.3
    tls: int = field(default_factory=free_port)
    daemon: object = None

    def start(self) -> "AcmeHttpd":
        from tests.conftest import Daemon
        site = make_site(self.dir)
        (site.htdocs / "index.html").write_text("hello\n")
        aliases = "".join(f'\talias "{a}"\n' for a in self.dom.alt)
        site.write_conf(ACME_HTTPD.replace("{aliases}", aliases), acmeconf=self.dom.conf,
                        name=self.dom.handle, handle=self.dom.handle, http=self.http,
                        tls=self.tls)
        self.site = site
        env = {**os.environ, "SSL_CERT_FILE": str(self.ca), "HTTPD_ACME_BASE": str(self.base)}
        self.daemon = Daemon("httpd", site.conf, ["-v"], env)
        wait_port(self.tls, proc=self.daemon.proc)
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    def output(self) -> str:
        """stderr so far (also after stop())."""
        if not self.daemon.errfile.closed:
            self.daemon.errfile.flush()
        return self.daemon.errpath.read_text(errors="replace")

    def served(self, name: str | None = None) -> x509.Certificate:
        return served_cert(self.tls, name or self.dom.handle)

    def settled(self, reloads: int = 1) -> None:
        """Wait (bounded) until `reloads` certificate reloads are logged:
        the old generation stopped accepting before that line, so from
        here on every new connection gets the files of the last one."""
        from tests.conftest import wait_for
        wait_for(lambda: self.output().count("parent_reload: certificates reloaded") >= reloads,
                 30, f"{reloads} certificate reloads", detail=lambda: self.output()[-2000:])


def served_cert(port: int, name: str) -> x509.Certificate:
    """The leaf certificate 127.0.0.1:port presents for SNI `name`."""
    import socket
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, \
            ctx.wrap_socket(s, server_hostname=name) as t:
        return x509.load_der_x509_certificate(t.getpeercert(True))


class ChallengeForwarder:
    """Plain HTTP on `port` (pebble's httpPort): each request is asked of
    every backend port in turn, the first 200 is the answer (else 404) --
    what a relayd rule forwarding /.well-known/acme-challenge/ does for
    instances that share certificates."""

    def __init__(self, port: int, backends: list[int]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                for b in backends:
                    conn = http.client.HTTPConnection("127.0.0.1", b, timeout=10)
                    try:
                        conn.request("GET", self.path, headers={"Host": self.headers["Host"]})
                        resp = conn.getresponse()
                        body = resp.read()
                    except OSError:
                        continue
                    finally:
                        conn.close()
                    if resp.status == 200:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                self.send_error(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def net_facts(net, dom: Domain) -> tuple[int, int, str, bool]:
    """(real uid, effective uid, root directory, holds the domain key
    open) of a net process (a psutil.Process): what its sandbox is."""
    uids = net.uids()
    return (uids.real, uids.effective, os.readlink(f"/proc/{net.pid}/root"),
            any(str(dom.key) in f.path for f in net.open_files()))
