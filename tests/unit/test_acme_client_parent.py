"""acme_client.parent without a CA: what main decides (plan) and what it
refuses the unprivileged net process (wrong origin, foreign tokens, a
certificate for another key)."""

from __future__ import annotations

import datetime
import os

import pytest
import trio
import trustme

from acme_client import parent
from shared import acme_crypto
from shared import acme_files as files
from shared.acme_conf import AuthorityConfig, DomainConfig
from shared.imsg import Imsg

NOW = datetime.datetime.now(datetime.timezone.utc)


def dom_in(tmp_path, names=("a.test",)) -> DomainConfig:
    (tmp_path / "acme").mkdir(exist_ok=True)
    return DomainConfig(handle=names[0], domain_name=names[0], alternative_names=names[1:],
                        key=str(tmp_path / "d.key"), cert=str(tmp_path / "cert.pem"),
                        fullchain=str(tmp_path / "full.pem"), challengedir=str(tmp_path / "acme"))


def write_cert(dom: DomainConfig, names, days_left: float, lifetime: float = 90, key=None):
    ca = trustme.CA()
    leaf = ca.issue_cert(*names, not_before=NOW - datetime.timedelta(days=lifetime - days_left),
                         not_after=NOW + datetime.timedelta(days=days_left))
    leaf.cert_chain_pems[0].write_to_path(dom.cert)


@pytest.mark.parametrize("names, days_left, force, expect", [
    (("a.test",), 60, False, 2),               # valid, nothing to do
    (("a.test",), 60, True, "issue"),          # -F
    (("a.test",), 10, False, "issue"),         # inside the 30-day window
    (("a.test", "b.test"), 60, False, "issue"),  # domain list changed
])
def test_plan(tmp_path, capsys, names, days_left, force, expect):
    dom = dom_in(tmp_path)
    write_cert(dom, names, days_left)
    got = parent.plan(dom, force, revoke=False)
    assert (got if isinstance(got, int) else got[0]) == expect


def test_plan_revoke(tmp_path, capsys):
    dom = dom_in(tmp_path)
    assert parent.plan(dom, False, revoke=True) == 1           # no certificate
    assert "no certificate found" in capsys.readouterr().err
    assert parent.plan(dom, False, revoke=False)[0] == "issue"
    write_cert(dom, ("a.test", "other.test"), 60)
    assert parent.plan(dom, False, revoke=True) == 1
    write_cert(dom, ("a.test",), 60)
    op, info = parent.plan(dom, False, revoke=True)
    assert op == "revoke" and info.names == ("a.test",)


def make_main(tmp_path, op="issue"):
    dom = dom_in(tmp_path)
    auth = AuthorityConfig("ca", "https://ca.test:14000/dir", str(tmp_path / "a.key"))
    akey = acme_crypto.generate_key("ecdsa")
    dkey = acme_crypto.generate_key("ecdsa")
    return parent.Main(auth, dom, op, None, akey, dkey, 0)


def call(handler, req):
    return trio.run(handler, req)


def test_signs_only_for_the_ca(tmp_path):
    main = make_main(tmp_path)
    mtype, reply = call(main.sign, {"url": "https://ca.test:14000/order", "nonce": "n",
                                    "payload": {}, "kid": None})
    assert mtype == Imsg.ACME_SIGNED and set(reply["jws"]) == {"protected", "payload", "signature"}
    for url in ("https://evil.test/order", "http://ca.test:14000/order",
                "https://ca.test:443/order"):
        mtype, reply = call(main.sign, {"url": url, "nonce": "n", "payload": {}, "kid": None})
        assert mtype == Imsg.ACME_OK and "not on the CA's origin" in reply["error"]


def test_token_files(tmp_path):
    main = make_main(tmp_path)
    good = f"tok_-1.{main.thumbprint}"
    call(main.token_add, {"token": "tok_-1", "keyauth": good})
    path = tmp_path / "acme" / "tok_-1"
    assert path.read_text() == good and oct(path.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(ValueError):
        call(main.token_add, {"token": "tok_-1", "keyauth": "tok_-1.someone-else"})
    with pytest.raises(ValueError):
        call(main.token_add, {"token": "../x", "keyauth": f"../x.{main.thumbprint}"})
    call(main.token_del, {"token": "tok_-1"})
    assert os.listdir(tmp_path / "acme") == []


def test_install_checks_key_and_names(tmp_path):
    main = make_main(tmp_path)
    ca = trustme.CA()
    other = ca.issue_cert("a.test")           # a key main does not hold
    with pytest.raises(ValueError, match="does not match the domain key"):
        call(main.install, {"pem": other.cert_chain_pems[0].bytes().decode()})
    assert not os.path.exists(main.dom.cert)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []


def test_install_writes_atomically(tmp_path):
    files.install({str(tmp_path / "x"): (b"one", 0o444)})
    before = (tmp_path / "x").read_bytes()
    with pytest.raises(OSError):
        files.install({str(tmp_path / "x"): (b"two", 0o444),
                       str(tmp_path / "missing-dir" / "y"): (b"y", 0o444)})
    assert (tmp_path / "x").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["x"]
