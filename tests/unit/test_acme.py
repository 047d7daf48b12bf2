"""shared.acme_crypto and shared.acme: JWK/thumbprint (RFC 7638's example),
JWS (RFC 7515/8555), the renewal window, Retry-After, and the client's
retry rules against a scripted CA (httpx.MockTransport, no sockets)."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography import x509

from shared import acme, acme_crypto
from shared.acme_crypto import b64url, b64url_decode

# RFC 7638 section 3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_N = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
             "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW"
             "2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQF"
             "h6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
DAY = 86400


class _PublicOnly:
    """Something with public_key(), as jwk() wants, around RFC 7638's key."""

    def __init__(self, pub) -> None:
        self.pub = pub

    def public_key(self):
        return self.pub


def test_rfc7638_thumbprint():
    n = int.from_bytes(b64url_decode(RFC7638_N), "big")
    pub = rsa.RSAPublicNumbers(65537, n).public_key()
    jwk = acme_crypto.jwk(_PublicOnly(pub))
    assert jwk == {"e": "AQAB", "kty": "RSA", "n": RFC7638_N}
    assert acme_crypto.thumbprint(jwk) == RFC7638_THUMBPRINT


def test_ec_jwk_fixed_width():
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = acme_crypto.jwk(key)
    assert jwk["crv"] == "P-384" and jwk["kty"] == "EC"
    assert len(b64url_decode(jwk["x"])) == len(b64url_decode(jwk["y"])) == 48
    assert sorted(jwk) == ["crv", "kty", "x", "y"]         # required members only


def _verify(jws: dict, key) -> None:
    data = f"{jws['protected']}.{jws['payload']}".encode()
    sig = b64url_decode(jws["signature"])
    if isinstance(key, rsa.RSAPrivateKey):
        key.public_key().verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        half = len(sig) // 2
        der = encode_dss_signature(int.from_bytes(sig[:half], "big"),
                                   int.from_bytes(sig[half:], "big"))
        key.public_key().verify(der, data, ec.ECDSA(hashes.SHA384()))


@pytest.mark.parametrize("keytype, alg", [("ecdsa", "ES384"), ("rsa", "RS256")])
def test_jws(keytype, alg):
    key = acme_crypto.generate_key(keytype) if keytype == "ecdsa" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jws = acme_crypto.sign_jws(key, "https://ca.test/new-acct", "n0nce", {"a": 1})
    head = json.loads(b64url_decode(jws["protected"]))
    assert head == {"alg": alg, "nonce": "n0nce", "url": "https://ca.test/new-acct",
                    "jwk": acme_crypto.jwk(key)}
    assert json.loads(b64url_decode(jws["payload"])) == {"a": 1}
    _verify(jws, key)
    # With an account URL: kid instead of jwk; POST-as-GET: empty payload.
    jws = acme_crypto.sign_jws(key, "https://ca.test/order/1", "n2", None, kid="https://ca.test/a/1")
    head = json.loads(b64url_decode(jws["protected"]))
    assert head["kid"] == "https://ca.test/a/1" and "jwk" not in head
    assert jws["payload"] == ""
    _verify(jws, key)
    assert "=" not in jws["signature"] and "+" not in jws["signature"]


def test_key_pem_round_trip_and_csr():
    key = acme_crypto.generate_key("ecdsa")
    pem = acme_crypto.key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = acme_crypto.key_from_pem(pem)
    assert acme_crypto.jwk(again) == acme_crypto.jwk(key)
    csr = x509.load_der_x509_csr(acme_crypto.make_csr(key, ("a.test", "b.test")))
    assert csr.is_signature_valid
    names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["a.test", "b.test"]


@pytest.mark.parametrize("lifetime, left, due", [
    (90 * DAY, 31 * DAY, False),    # the 30-day rule of acme-client
    (90 * DAY, 29 * DAY, True),
    (365 * DAY, 31 * DAY, False),   # long certificates: still 30 days
    (365 * DAY, 29 * DAY, True),
    (45 * DAY, 16 * DAY, False),    # short ones: a third of the lifetime
    (45 * DAY, 14 * DAY, True),
    (6 * DAY, 2.1 * DAY, False),
    (6 * DAY, 1.9 * DAY, True),
    (120, 41, False),
    (120, 39, True),
    (120, -5, True),                # expired
])
def test_renewal_window(lifetime, left, due):
    now = 1_000_000_000.0
    not_after = now + left
    assert acme.renewal_due(not_after - lifetime, not_after, now) is due


def test_retry_after():
    assert acme.parse_retry_after("120") == 120
    assert acme.parse_retry_after(None) is None
    assert acme.parse_retry_after("soon") is None
    assert acme.parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT",
                                  now=784111777 - 30) == 30


# -- the client against a scripted CA ---------------------------------------------------

DIRECTORY = {"newNonce": "https://ca.test/nonce", "newAccount": "https://ca.test/acct",
             "newOrder": "https://ca.test/order", "revokeCert": "https://ca.test/revoke"}


class ScriptedCA:
    """Answers by URL; `errors[url]` is a list of (status, type, headers) to
    answer first, one per request, before the normal answer."""

    def __init__(self) -> None:
        self.errors: dict[str, list] = {}
        self.seen: list[tuple[str, str, str | None]] = []   # method, url, nonce
        self.count = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.count += 1
        nonce = {"Replay-Nonce": f"nonce{self.count}"}
        url = str(request.url)
        used = None
        if request.method == "POST":
            used = json.loads(b64url_decode(json.loads(request.content)["protected"]))["nonce"]
        self.seen.append((request.method, url, used))
        if url == "https://ca.test/dir":
            return httpx.Response(200, json=DIRECTORY)
        if url == DIRECTORY["newNonce"]:
            return httpx.Response(200, headers=nonce)
        queued = self.errors.get(url)
        if queued:
            status, kind, headers = queued.pop(0)
            return httpx.Response(status, headers={**nonce, **headers},
                                  json={"type": acme.ERR + kind, "detail": kind})
        if url == DIRECTORY["newAccount"]:
            return httpx.Response(201, headers={**nonce, "Location": "https://ca.test/acct/7"},
                                  json={"status": "valid"})
        return httpx.Response(200, headers=nonce, json={})


def run_client(ca: ScriptedCA, job):
    key = acme_crypto.generate_key("ecdsa")

    async def sign(url, nonce, payload, kid):
        return acme_crypto.sign_jws(key, url, nonce, payload, kid)

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(ca)) as http:
            client = acme.AcmeClient(http, "https://ca.test/dir", sign)
            await client.get_directory()
            return await job(client)
    return trio.run(main)


def test_bad_nonce_retried_with_the_new_nonce():
    ca = ScriptedCA()
    ca.errors[DIRECTORY["newAccount"]] = [(400, "badNonce", {})] * 3
    kid = run_client(ca, lambda c: c.account("mailto:a@b.test"))
    assert kid == "https://ca.test/acct/7"
    posts = [s for s in ca.seen if s[0] == "POST"]
    assert len(posts) == 4
    # Each retry uses the nonce from the error answer, not a new-nonce fetch.
    assert [s[0] for s in ca.seen].count("HEAD") == 1


def test_bad_nonce_bounded():
    ca = ScriptedCA()
    ca.errors[DIRECTORY["newAccount"]] = [(400, "badNonce", {})] * 100
    with pytest.raises(acme.AcmeError, match="too many retries"):
        run_client(ca, lambda c: c.account(None))


def test_rate_limited_waits_retry_after():
    ca = ScriptedCA()
    ca.errors[DIRECTORY["newAccount"]] = [(429, "rateLimited", {"Retry-After": "1"})]
    assert run_client(ca, lambda c: c.account(None)) == "https://ca.test/acct/7"


def test_rate_limited_too_long_fails():
    ca = ScriptedCA()
    ca.errors[DIRECTORY["newAccount"]] = [(429, "rateLimited", {"Retry-After": "86400"})]
    with pytest.raises(acme.AcmeError) as exc:
        run_client(ca, lambda c: c.account(None))
    assert exc.value.status == 429 and exc.value.retry_after == 86400
    assert str(exc.value) == "429 rateLimited: rateLimited"


def test_other_errors_not_retried():
    ca = ScriptedCA()
    ca.errors[DIRECTORY["newAccount"]] = [(400, "malformed", {})]
    with pytest.raises(acme.AcmeError, match="malformed"):
        run_client(ca, lambda c: c.account(None))
    assert len([s for s in ca.seen if s[0] == "POST"]) == 1
