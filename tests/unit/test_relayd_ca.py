"""relayd.ca in one process: the ca's checks (key id, generation, operation,
length, padding; refusals logged) and the relay side's exchange (cookie,
timeout, lost ca), over a real SOCK_SEQPACKET socketpair."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time

import pytest
import trustme
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from engine import tls
from relayd import ca


@pytest.fixture(scope="module")
def keys():
    k = ca.Keys()
    k.add(1, "r:ec", bytearray(trustme.CA().private_key_pem.bytes()))
    k.add(1, "r:rsa", bytearray(trustme.CA(key_type=trustme.KeyType.RSA).private_key_pem.bytes()))
    return k


def serve(keys: ca.Keys, sock, gen: int, answers: int = 1, stale: bool = False) -> threading.Thread:
    """A ca answering `answers` requests on `sock` (a stale answer first)."""
    def run():
        for _ in range(answers):
            req = sock.recv(ca.MAX_MESSAGE)
            if not req:
                return
            if stale:
                sock.send(ca._ANS.pack(0, ca.DONE) + b"stale")
            sock.send(keys.answer(gen, req))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sign_through_socket(keys):
    mine, theirs = ca.socketpair()
    client = ca.CaClient(theirs)
    t = serve(keys, mine, 1, answers=2, stale=True)
    sig = client.signer("r:ec")(tls.ECDSA_SIGN, b"d" * 32, 0)
    assert sig and sig[0] == 0x30                # DER, not the stale answer
    sig = client.call("r:rsa", tls.RSA_PRIV_ENC, b"x" * 51, tls.RSA_PKCS1_PADDING)
    assert sig and len(sig) == keys.keys[(1, "r:rsa")].size
    t.join(5)
    mine.close()
    theirs.close()


@pytest.mark.parametrize("gen,kid,op,data,pad", [
    (2, "r:ec", tls.ECDSA_SIGN, b"d" * 32, 0),          # another generation's relay
    (1, "r:nope", tls.ECDSA_SIGN, b"d" * 32, 0),        # unknown key id
    (1, "r:ec", tls.ECDSA_SIGN, b"d" * 33, 0),          # not a digest
    (1, "r:ec", tls.RSA_PRIV_ENC, b"d" * 32, 1),        # RSA operation, EC key
    (1, "r:rsa", tls.RSA_PRIV_ENC, b"x" * 100, 4),      # padding
    (1, "r:rsa", tls.RSA_PRIV_DEC, b"x" * 100, 1),      # length
])
def test_refused_and_logged(keys, capsys, gen, kid, op, data, pad):
    mine, theirs = ca.socketpair()
    t = serve(keys, mine, gen)
    assert ca.CaClient(theirs).call(kid, op, data, pad) is None
    t.join(5)
    err = capsys.readouterr().err
    assert f"ca: relay (generation {gen}): key {kid}: " in err     # ca's line
    assert f"ca: key {kid}: " in err and "refused" in err           # the relay's
    mine.close()
    theirs.close()


def test_short_request_refused(keys):
    assert keys.answer(1, b"abc") == ca._ANS.pack(0, ca.REFUSED)


def test_no_answer_times_out(monkeypatch):
    monkeypatch.setattr(ca, "TIMEOUT", 0.05)
    mine, theirs = ca.socketpair()
    assert ca.CaClient(theirs).call("k", tls.ECDSA_SIGN, b"d" * 32, 0) is None
    mine.close()
    assert ca.CaClient(theirs).call("k", tls.ECDSA_SIGN, b"d" * 32, 0) is None   # gone
    assert ca.CaClient(None).call("k", tls.ECDSA_SIGN, b"d" * 32, 0) is None
    theirs.close()


def test_stale_answer_then_silence_times_out_and_timeout_restored(monkeypatch):
    monkeypatch.setattr(ca, "TIMEOUT", 0.2)
    mine, theirs = ca.socketpair()
    client = ca.CaClient(theirs)

    def late():        # a stale answer half-way through the wait, then nothing
        assert mine.recv(ca.MAX_MESSAGE)
        time.sleep(0.1)
        mine.send(ca._ANS.pack(0, ca.DONE) + b"stale")

    def rcvtimeo():
        return struct.unpack("@ll", theirs.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    full = rcvtimeo()
    assert full > (0, 0)
    t = threading.Thread(target=late, daemon=True)
    t.start()
    assert client.call("k", tls.ECDSA_SIGN, b"d" * 32, 0) is None
    t.join(5)
    assert rcvtimeo() == full       # the stale wait's shorter SO_RCVTIMEO is undone
    mine.close()
    theirs.close()


def test_prepared_ecdsa_nonce_used_once_and_signature_valid():
    pem = trustme.CA().private_key_pem.bytes()
    pub = serialization.load_pem_private_key(pem, None).public_key()
    key = tls.PrivateKey(bytearray(pem))
    digest = hashlib.sha256(b"tandem").digest()
    rs = set()
    for prepared in (True, True, False, True):
        if prepared:
            key.prepare()
            assert key._kinv is not None
        sig = key.op(tls.ECDSA_SIGN, digest, 0)
        assert key._kinv is None                         # one signature per nonce
        pub.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        rs.add(utils.decode_dss_signature(sig)[0])
    assert len(rs) == 4                                  # a new nonce every time
    key.prepare()
    key.close()                                          # a ready nonce is freed too
    assert key._kinv is None and key.ec is None


def test_rsa_key_prepares_nothing():
    key = tls.PrivateKey(bytearray(trustme.CA(key_type=trustme.KeyType.RSA).private_key_pem.bytes()))
    key.prepare()
    assert key._kinv is None
    key.close()


def test_ca_readies_the_next_nonce_after_an_answer(keys):
    req = ca._REQ.pack(7, tls.ECDSA_SIGN, 0, 4) + b"r:ec" + b"d" * 32
    key = keys.keys[(1, "r:ec")]
    assert keys.answer(1, req)[:ca._ANS.size] == ca._ANS.pack(7, ca.DONE)
    assert key._kinv is None
    keys.prepare()
    assert key._kinv is not None


def test_forget_generation():
    k = ca.Keys()
    k.add(3, "a", bytearray(trustme.CA().private_key_pem.bytes()))
    k.add(4, "a", bytearray(trustme.CA().private_key_pem.bytes()))
    k.forget(3)
    assert list(k.keys) == [(4, "a")]
