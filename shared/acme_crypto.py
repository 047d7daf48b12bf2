"""shared.acme_crypto -- the key-holding half of ACME: keys, JWK, JWS, CSR.

Everything here needs a private key or reads a certificate, so it runs in
the privileged process: account and domain keys (RSA 4096 or ECDSA P-384,
as OpenBSD's acme-client makes them, PEM PKCS#8), the JWK of a public key
and its RFC 7638 thumbprint, flattened JWS objects (RFC 7515, as RFC 8555
section 6.2 wants them), the CSR, and the facts about a certificate file
that renewal and revocation need.

It does no I/O (callers pass bytes in and get bytes out) and knows nothing
of the order flow, which is shared.acme's.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

RSA_BITS = 4096                      # OpenBSD acme-client's KEY_BITS
EC_CURVE = ec.SECP384R1              # acme-client's ECDSA keys (ES384)
# JWS algorithm and hash per EC curve (RFC 7518 section 3.4).
_EC_ALGS = {"secp256r1": ("ES256", hashes.SHA256(), "P-256", 32),
            "secp384r1": ("ES384", hashes.SHA384(), "P-384", 48),
            "secp521r1": ("ES512", hashes.SHA512(), "P-521", 66)}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uint(n: int, size: int | None = None) -> str:
    size = size or max(1, (n.bit_length() + 7) // 8)
    return b64url(n.to_bytes(size, "big"))


# -- keys -----------------------------------------------------------------------

def generate_key(keytype: str) -> PrivateKey:
    """A new key of `keytype` ("rsa" or "ecdsa")."""
    if keytype == "ecdsa":
        return ec.generate_private_key(EC_CURVE())
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def key_from_pem(data: bytes) -> PrivateKey:
    """Load a PEM private key; ValueError for anything but RSA or EC."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("unsupported key type")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in _EC_ALGS:
        raise ValueError(f"unsupported curve {key.curve.name}")
    return key


# -- JWK and JWS ------------------------------------------------------------------

def jwk(key: PrivateKey) -> dict[str, str]:
    """The public JWK of `key` with only the required members (RFC 7638
    section 3.2), so the thumbprint is computed over exactly this."""
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        return {"e": _uint(nums.e), "kty": "RSA", "n": _uint(nums.n)}
    _, _, crv, size = _EC_ALGS[pub.curve.name]
    nums = pub.public_numbers()
    return {"crv": crv, "kty": "EC", "x": _uint(nums.x, size), "y": _uint(nums.y, size)}


def thumbprint(jwk_dict: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the members in lexicographic order, no
    whitespace, base64url."""
    canon = json.dumps(jwk_dict, sort_keys=True, separators=(",", ":"))
    return b64url(hashlib.sha256(canon.encode()).digest())


def jws_alg(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    return _EC_ALGS[key.curve.name][0]


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    _, hash_alg, _, size = _EC_ALGS[key.curve.name]
    # JWS wants r || s, fixed width (RFC 7518 section 3.4), not DER.
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hash_alg)))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def sign_jws(key: PrivateKey, url: str, nonce: str, payload: dict | None,
             kid: str | None = None) -> dict[str, str]:
    """A flattened JWS for an ACME POST (RFC 8555 section 6.2).

    `payload` None is POST-as-GET (an empty payload, section 6.3).  With
    `kid` (the account URL) the header names the account; without it the
    header carries the JWK (newAccount, section 6.2)."""
    protected: dict = {"alg": jws_alg(key), "nonce": nonce, "url": url}
    if kid:
        protected["kid"] = kid
    else:
        protected["jwk"] = jwk(key)
    p64 = b64url(json.dumps(protected, separators=(",", ":")).encode())
    pl64 = "" if payload is None else b64url(json.dumps(payload, separators=(",", ":")).encode())
    sig = _sign(key, f"{p64}.{pl64}".encode())
    return {"protected": p64, "payload": pl64, "signature": b64url(sig)}


# -- CSR and certificates -------------------------------------------------------------

def make_csr(key: PrivateKey, names: tuple[str, ...]) -> bytes:
    """A DER CSR for `names` (the first is also the CN, as acme-client)."""
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                              critical=False))
    hash_alg = hashes.SHA256() if isinstance(key, rsa.RSAPrivateKey) else \
        _EC_ALGS[key.curve.name][1]
    return builder.sign(key, hash_alg).public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class CertInfo:
    """What renewal and revocation need to know about a certificate."""
    not_before: float            # POSIX seconds
    not_after: float
    names: tuple[str, ...]       # DNS SANs, in certificate order
    serial: int
    der: bytes

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


def split_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, leaf first; ValueError if none."""
    return x509.load_pem_x509_certificates(data)


def cert_info(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(),
                    names, cert.serial_number,
                    cert.public_bytes(serialization.Encoding.DER))


def same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


TEMP_CERT_DAYS = 7                   # a stand-in certificate's lifetime


def self_signed(names: tuple[str, ...]) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): a throw-away self-signed ECDSA P-256
    certificate for `names`, so a TLS listener can start before the CA
    has issued the real one."""
    import datetime
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=TEMP_CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert_pem(cert), key_to_pem(key)
