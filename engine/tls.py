"""engine.tls -- TLS for both daemons: contexts built from bytes, and the
TLS data path.

Contexts are built from the PEM/DER *bytes* the privileged parent read
(workers are chrooted: they never open a key file).  The server side takes
one context per keypair and picks one by SNI; the client side (relayd
towards backends, TLS health checks) verifies against a CA bundle or not.
A server context can also be keyless: it holds the certificate only, and
a Signer does its private operations (relayd's ca process; PrivateKey is
the key holder's side).  forge_certificate() makes the certificates of
TLS inspection, signed through a Signer.

Data path.  OpenSSL reads and writes the connection's socket itself: the
ssl module's C object (`SSLContext._wrap_socket`) is driven non-blocking
on the accepted fd, and a task waits for readiness with
trio.lowlevel.wait_readable/wait_writable only when OpenSSL asks.  One C call
per receive and per send, no memory-BIO copies, no Python pump.  Contexts
turn on OpenSSL's read-ahead: one read() per request instead of a record
header and then its body (a connection with one request: 4-5 reads
instead of 10-11).  As SocketTransport, a receive right after a send
yields to the other tasks and then reads, waiting for the socket only if
OpenSSL found nothing: under load the next request is there by then, so
a keep-alive request costs a read(), a write() and no epoll_ctl().
Measured on this (busy, shared) machine, server CPU per request, wrk
-c50, 1 KiB:
- bare servers, keep-alive: trio.SSLStream 39-41 µs, stdlib SSLObject +
  MemoryBIO pump 26-30, pyOpenSSL on the fd 24-30, this path 22-27; full
  ECDSA P-256 handshakes: SSLStream 650-750 µs, this path 485-525,
  pyOpenSSL (OpenSSL 3.5 inside the cryptography wheel) 445-500;
- httpd itself, 3 interleaved rounds: keep-alive plain 61-67 µs, this
  path 73-88, SSLStream 90-130; handshakes: this path 620-894 µs,
  SSLStream 784-1019.
- later, bench.py tls-ec-ka (httpd with its small-file cache, nginx at
  16 µs): waiting for the socket after each response and reading
  without read-ahead 46-54 µs per request, as now 34-35; tls-ec-close:
  491 µs per handshake (nginx 338).
pyOpenSSL is not used although its handshakes are a little cheaper: its
bindings cannot set a groups list (its OpenSSL then offers X448 and P-521,
which Mozilla's intermediate profile rejects), the TLS 1.3 ticket count or
session-ticket keys (no resumption across prefork workers).

The ssl module lacks some libtls features.  A ctypes shim calls the very
libssl the ssl module is linked with (found in /proc/self/maps), on the
SSL_CTX of an ssl.SSLContext: keypairs from memory, OCSP stapling, ECDHE
groups lists, TLS 1.3 cipher suites, DHE parameters, CRLs, the client CA
list, session-ticket keys shared by all workers (set_ticket_keys()).

This module knows no HTTP and no daemon configuration syntax.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import itertools
import os
import socket
import ssl
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import trio

from engine.conn import RECV_SIZE, Transport, _sockname, close_socket

# libtls protocol names, oldest first.
PROTOCOLS = ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3")
# libtls' default protocols (TLS_PROTOCOLS_DEFAULT).
DEFAULT_PROTOCOLS = frozenset({"tlsv1.2", "tlsv1.3"})
# libtls cipher keywords → OpenSSL cipher strings (TLS <= 1.2).  "secure"
# is libtls' TLS_CIPHERS_DEFAULT (AEAD with forward secrecy) without CCM, so
# the default passes Mozilla's "intermediate" profile.
CIPHER_KEYWORDS = {
    "secure": "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL",
    "default": "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL",
    "compat": "HIGH:!aNULL",
    "legacy": "HIGH:MEDIUM:!aNULL",
    "insecure": "ALL:!aNULL:!eNULL",
    "all": "ALL:!aNULL:!eNULL",
}
# libtls' default ECDHE groups (TLS_ECDHE_CURVES).
DEFAULT_GROUPS = "X25519:P-256:P-384"
# Session-ticket key: 16 bytes name, 32 HMAC-SHA256 key, 32 AES-256 key.
TICKET_KEY_SIZE = 80
# Old ticket keys still accepted after a rotation (libtls keeps 4 in all).
TICKET_KEYS_KEPT = 4
# describe_error() of a connection closed before it sent anything.
NO_HANDSHAKE = "closed before the handshake"
# Seconds a TLS handshake may take when the caller gives no timeout.
HANDSHAKE_TIMEOUT = 60.0
# Bytes per write when a file goes out over TLS (no sendfile through TLS).
FILE_CHUNK = 262144
# A long write loop yields to other tasks after this many chunks.
SEND_ROUNDS = 16

_VERSIONS = {
    "tlsv1.0": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
_NO_VERSION = {
    "tlsv1.0": "OP_NO_TLSv1",
    "tlsv1.1": "OP_NO_TLSv1_1",
    "tlsv1.2": "OP_NO_TLSv1_2",
    "tlsv1.3": "OP_NO_TLSv1_3",
}


class TlsError(Exception):
    """A TLS configuration that OpenSSL refuses (bad file, key mismatch,
    unknown curve or cipher); the message says which part."""


@dataclass(frozen=True)
class Keypair:
    """A certificate chain (PEM, leaf first), its private key (PEM) and an
    optional DER OCSP response to staple.  Contexts never wipe the key:
    one key may serve several sockets' contexts, so whoever holds it
    wipes it (wipe()) once every context that needs it is built.  No key
    (None): a keyless context, whose private operations a Signer does."""
    cert: bytes
    key: bytes | bytearray | None
    ocsp: bytes | None = None


@dataclass(frozen=True)
class TlsOptions:
    """Everything but the keypair: what servers sharing a socket agree on."""
    protocols: frozenset[str] = DEFAULT_PROTOCOLS
    ciphers: str = "secure"              # libtls keyword or OpenSSL string
    ecdhe: str = "default"               # "default" | "auto" | "X25519,P-256"...
    dhe: str = "none"                    # none | auto | legacy
    client_ca: bytes | None = None       # PEM bundle: verify client certificates
    crl: bytes | None = None             # PEM CRLs checked with client_ca
    client_optional: bool = False        # request, do not require, a client cert
    ticket_lifetime: int | None = None   # None: no session tickets, no resumption
    cipher_server_preference: bool = False
    client_renegotiation: bool = False
    # ALPN protocols offered, in preference order (e.g. ("h2", "http/1.1"));
    # empty: no ALPN extension in the answer.
    alpn: tuple[str, ...] = ()


# -- the libssl shim ----------------------------------------------------------

# ssl.h / tls1.h / core.h values (the same in OpenSSL 1.1.1 and 3.x).
SSL_CTRL_SET_READ_AHEAD = 41
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB = 63
SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB_ARG = 64
SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP = 71
SSL_CTRL_CHAIN_CERT = 89
SSL_CTRL_SET_GROUPS_LIST = 92
SSL_CTRL_SET_DH_AUTO = 118
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_NOACK = 3
OSSL_PARAM_UTF8_STRING = 4
OSSL_PARAM_OCTET_STRING = 5
_SIZE_MAX = ctypes.c_size_t(-1).value

_P = ctypes.c_void_p
_STATUS_CB = ctypes.CFUNCTYPE(ctypes.c_int, _P, _P)
_TICKET_CB = ctypes.CFUNCTYPE(ctypes.c_int, _P, _P, _P, _P, _P, ctypes.c_int)


class _OsslParam(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint),
                ("data", _P), ("data_size", ctypes.c_size_t),
                ("return_size", ctypes.c_size_t)]


def _loaded(name: str) -> str | None:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if name in line and "/" in line:
                    return line[line.index("/"):].strip()
    except OSError:
        pass
    return None


def _bind(lib, name: str, res, *args):
    fn = getattr(lib, name, None)
    if fn is None:
        return None
    fn.restype = res
    fn.argtypes = list(args)
    return fn


class _Lib:
    """The libssl/libcrypto functions the ssl module does not offer."""

    def __init__(self) -> None:
        ssl_path = _loaded("libssl.so") or "libssl.so.3"
        crypto_path = _loaded("libcrypto.so") or "libcrypto.so.3"
        s = ctypes.CDLL(ssl_path)
        c = ctypes.CDLL(crypto_path)
        I, L, UL = ctypes.c_int, ctypes.c_long, ctypes.c_ulong
        self.SSL_CTX_get_options = _bind(s, "SSL_CTX_get_options", ctypes.c_uint64, _P)
        self.SSL_CTX_ctrl = _bind(s, "SSL_CTX_ctrl", L, _P, I, L, _P)
        self.SSL_CTX_callback_ctrl = _bind(s, "SSL_CTX_callback_ctrl", L, _P, I, _P)
        self.SSL_ctrl = _bind(s, "SSL_ctrl", L, _P, I, L, _P)
        self.SSL_CTX_use_certificate = _bind(s, "SSL_CTX_use_certificate", I, _P, _P)
        self.SSL_CTX_use_PrivateKey = _bind(s, "SSL_CTX_use_PrivateKey", I, _P, _P)
        self.SSL_CTX_check_private_key = _bind(s, "SSL_CTX_check_private_key", I, _P)
        self.SSL_CTX_get_cert_store = _bind(s, "SSL_CTX_get_cert_store", _P, _P)
        self.SSL_CTX_add_client_CA = _bind(s, "SSL_CTX_add_client_CA", I, _P, _P)
        self.SSL_CTX_set_timeout = _bind(s, "SSL_CTX_set_timeout", L, _P, L)
        self.SSL_CTX_set_ciphersuites = _bind(s, "SSL_CTX_set_ciphersuites", I, _P, ctypes.c_char_p)
        self.SSL_CTX_set_tlsext_ticket_key_evp_cb = _bind(
            s, "SSL_CTX_set_tlsext_ticket_key_evp_cb", I, _P, _P)
        self.BIO_new_mem_buf = _bind(c, "BIO_new_mem_buf", _P, _P, I)
        self.BIO_free = _bind(c, "BIO_free", I, _P)
        self.PEM_read_bio_X509 = _bind(c, "PEM_read_bio_X509", _P, _P, _P, _P, _P)
        self.PEM_read_bio_X509_CRL = _bind(c, "PEM_read_bio_X509_CRL", _P, _P, _P, _P, _P)
        self.PEM_read_bio_PrivateKey = _bind(c, "PEM_read_bio_PrivateKey", _P, _P, _P, _P,
                                             ctypes.c_char_p)
        self.X509_free = _bind(c, "X509_free", None, _P)
        self.X509_CRL_free = _bind(c, "X509_CRL_free", None, _P)
        self.EVP_PKEY_free = _bind(c, "EVP_PKEY_free", None, _P)
        self.X509_STORE_add_crl = _bind(c, "X509_STORE_add_crl", I, _P, _P)
        self.ERR_get_error = _bind(c, "ERR_get_error", UL)
        self.ERR_error_string_n = _bind(c, "ERR_error_string_n", None, UL, ctypes.c_char_p,
                                        ctypes.c_size_t)
        self.ERR_clear_error = _bind(c, "ERR_clear_error", None)
        self.CRYPTO_malloc = _bind(c, "CRYPTO_malloc", _P, ctypes.c_size_t, ctypes.c_char_p, I)
        self.CRYPTO_free = _bind(c, "CRYPTO_free", None, _P, ctypes.c_char_p, I)
        self.EVP_aes_256_cbc = _bind(c, "EVP_aes_256_cbc", _P)
        self.EVP_EncryptInit_ex = _bind(c, "EVP_EncryptInit_ex", I, _P, _P, _P, _P, _P)
        self.EVP_DecryptInit_ex = _bind(c, "EVP_DecryptInit_ex", I, _P, _P, _P, _P, _P)
        self.EVP_MAC_CTX_set_params = _bind(c, "EVP_MAC_CTX_set_params", I, _P, _P)
        # Keyless contexts (RSA and EC method hooks) and the key holder's
        # side of them (PrivateKey); deprecated in OpenSSL 3, still exported.
        self.X509_get_pubkey = _bind(c, "X509_get_pubkey", _P, _P)
        self.EVP_PKEY_new = _bind(c, "EVP_PKEY_new", _P)
        self.EVP_PKEY_assign = _bind(c, "EVP_PKEY_assign", I, _P, I, _P)
        self.EVP_PKEY_get_base_id = (_bind(c, "EVP_PKEY_get_base_id", I, _P)
                                     or _bind(c, "EVP_PKEY_base_id", I, _P))
        self.EVP_PKEY_get1_RSA = _bind(c, "EVP_PKEY_get1_RSA", _P, _P)
        self.EVP_PKEY_get1_EC_KEY = _bind(c, "EVP_PKEY_get1_EC_KEY", _P, _P)
        self.RSA_get_default_method = _bind(c, "RSA_get_default_method", _P)
        self.RSA_meth_dup = _bind(c, "RSA_meth_dup", _P, _P)
        self.RSA_meth_set_priv_enc = _bind(c, "RSA_meth_set_priv_enc", I, _P, _P)
        self.RSA_meth_set_priv_dec = _bind(c, "RSA_meth_set_priv_dec", I, _P, _P)
        self.RSA_set_method = _bind(c, "RSA_set_method", I, _P, _P)
        self.RSA_size = _bind(c, "RSA_size", I, _P)
        self.RSA_free = _bind(c, "RSA_free", None, _P)
        self.RSA_private_encrypt = _bind(c, "RSA_private_encrypt", I, I, _P, _P, _P, I)
        self.RSA_private_decrypt = _bind(c, "RSA_private_decrypt", I, I, _P, _P, _P, I)
        self.EC_KEY_OpenSSL = _bind(c, "EC_KEY_OpenSSL", _P)
        self.EC_KEY_METHOD_new = _bind(c, "EC_KEY_METHOD_new", _P, _P)
        self.EC_KEY_METHOD_get_sign = _bind(c, "EC_KEY_METHOD_get_sign", None, _P,
                                            ctypes.POINTER(_P), ctypes.POINTER(_P),
                                            ctypes.POINTER(_P))
        self.EC_KEY_METHOD_set_sign = _bind(c, "EC_KEY_METHOD_set_sign", None, _P, _P, _P, _P)
        self.EC_KEY_set_method = _bind(c, "EC_KEY_set_method", I, _P, _P)
        self.EC_KEY_free = _bind(c, "EC_KEY_free", None, _P)
        self.ECDSA_size = _bind(c, "ECDSA_size", I, _P)
        self.ECDSA_sign = _bind(c, "ECDSA_sign", I, I, _P, I, _P,
                                ctypes.POINTER(ctypes.c_uint), _P)
        self.ECDSA_sign_setup = _bind(c, "ECDSA_sign_setup", I, _P, _P,
                                      ctypes.POINTER(_P), ctypes.POINTER(_P))
        self.ECDSA_sign_ex = _bind(c, "ECDSA_sign_ex", I, I, _P, I, _P,
                                   ctypes.POINTER(ctypes.c_uint), _P, _P, _P)
        self.BN_clear_free = _bind(c, "BN_clear_free", None, _P)
        self.tickets = None not in (self.SSL_CTX_set_tlsext_ticket_key_evp_cb,
                                    self.EVP_MAC_CTX_set_params, self.EVP_aes_256_cbc)

    def error(self) -> str:
        """OpenSSL's last error as text (and the queue emptied)."""
        e, last = self.ERR_get_error(), 0
        while e:
            last, e = e, self.ERR_get_error()
        if not last:
            return "unknown error"
        buf = ctypes.create_string_buffer(256)
        self.ERR_error_string_n(last, buf, 256)
        text = buf.value.decode(errors="replace")
        return text.rsplit(":", 1)[-1] or text


def _ctx_ptr(ctx: ssl.SSLContext) -> int:
    # PySSLContext starts with its SSL_CTX pointer right after the object
    # head (CPython 3.8-3.13); _load() checks this once against the options.
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value


def _load() -> _Lib | None:
    try:
        lib = _Lib()
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if lib.SSL_CTX_get_options(_ctx_ptr(probe)) != probe.options:
            return None
        return lib
    except (OSError, AttributeError, ValueError):
        return None


# Loaded at import: workers import this module before they chroot.
_lib = _load()


def _need() -> _Lib:
    if _lib is None:
        raise TlsError("the TLS library does not offer this feature")
    return _lib


class _Bio:
    """A read-only memory BIO over `data` (a bytearray is not copied)."""

    def __init__(self, data: bytes | bytearray) -> None:
        lib = _need()
        self.lib = lib
        if isinstance(data, bytearray):
            self.buf = (ctypes.c_char * len(data)).from_buffer(data) if data else None
            ptr = ctypes.addressof(self.buf) if data else None
        else:
            self.buf = data
            ptr = ctypes.cast(ctypes.c_char_p(data), _P)
        self.bio = lib.BIO_new_mem_buf(ptr, len(data))
        if not self.bio:
            raise TlsError("out of memory")

    def __enter__(self) -> int:
        return self.bio

    def __exit__(self, *exc) -> None:
        self.lib.BIO_free(self.bio)
        self.buf = None


def _each_pem(lib: _Lib, data: bytes, read) -> list[int]:
    out = []
    with _Bio(data) as bio:
        while True:
            obj = read(bio, None, None, None)
            if not obj:
                break
            out.append(obj)
    lib.ERR_clear_error()    # the end of the data is a "no start line" error
    return out


def _use_keypair(ctx: ssl.SSLContext, kp: Keypair, signer: Signer | None = None) -> None:
    lib = _need()
    p = _ctx_ptr(ctx)
    certs = _each_pem(lib, kp.cert, lib.PEM_read_bio_X509)
    pkey = None
    try:
        if not certs or lib.SSL_CTX_use_certificate(p, certs[0]) != 1:
            raise TlsError("failed to load certificate")
        for x in certs[1:]:
            if lib.SSL_CTX_ctrl(p, SSL_CTRL_CHAIN_CERT, 1, x) != 1:
                raise TlsError("failed to load certificate chain")
        if signer is not None:
            pkey, key = _keyless_pkey(lib, certs[0], signer)
            weakref.finalize(ctx, _signers.pop, key, None)
    finally:
        for x in certs:
            lib.X509_free(x)
    if pkey is None:
        pkey = _read_private_key(lib, kp.key or b"")
    try:
        if lib.SSL_CTX_use_PrivateKey(p, pkey) != 1 or lib.SSL_CTX_check_private_key(p) != 1:
            lib.ERR_clear_error()
            raise TlsError("private key does not match the certificate")
    finally:
        lib.EVP_PKEY_free(pkey)


def _read_private_key(lib: _Lib, pem: bytes | bytearray) -> int:
    with _Bio(pem) as bio:
        # An empty passphrase: an encrypted key fails instead of prompting.
        pkey = lib.PEM_read_bio_PrivateKey(bio, None, None, b"")
    if not pkey:
        lib.ERR_clear_error()
        raise TlsError("failed to load private key")
    return pkey


# -- keyless contexts: private key operations done elsewhere ----------------
#
# relayd's ca.c on Linux: the public key of the certificate gets an RSA or
# EC method whose private operations call a Signer (relayd: a blocking
# exchange with the process that holds the key).  OpenSSL 3 sees such a key
# as "foreign" and takes the legacy path, which calls the hook: TLS 1.2 and
# 1.3, RSA (PKCS#1 and PSS, the latter as a raw private "encrypt") and
# ECDSA.  The event loop waits during the operation, as it does for a local
# key.  PrivateKey is the other end: what the key holder runs.

# Operations a Signer is asked for: (op, data, padding) -> result, None to fail.
RSA_PRIV_ENC = 1     # RSA signature primitive: data is padded by `padding`
RSA_PRIV_DEC = 2     # RSA decryption (TLS 1.2 RSA key exchange)
ECDSA_SIGN = 3       # ECDSA signature of a digest; the answer is DER
OPS = {RSA_PRIV_ENC: "rsa-sign", RSA_PRIV_DEC: "rsa-decrypt", ECDSA_SIGN: "ecdsa-sign"}
RSA_PKCS1_PADDING = 1
RSA_NO_PADDING = 3
_RSA_PADDINGS = (RSA_PKCS1_PADDING, RSA_NO_PADDING)
# Digest lengths ECDSA signs: SHA-1, SHA-224, -256, -384, -512.
_DIGEST_SIZES = (20, 28, 32, 48, 64)
_EVP_PKEY_RSA = 6
_EVP_PKEY_EC = 408

Signer = Callable[[int, bytes, int], "bytes | None"]

_RSA_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _P, _P, _P, ctypes.c_int)
_EC_SIGN_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, _P,
                               ctypes.POINTER(ctypes.c_uint), _P, _P, _P)
# RSA* / EC_KEY* of a keyless key -> its Signer (dropped with the context).
_signers: dict[int, Signer] = {}
_methods: dict[str, int] = {}


def _ask(key: int, op: int, src: int, n: int, padding: int) -> bytes | None:
    signer = _signers.get(key)
    if signer is None or n < 0:
        return None
    return signer(op, ctypes.string_at(src, n), padding)


def _rsa_op(op: int):
    def cb(flen, src, to, rsa, padding):
        try:
            out = _ask(rsa, op, src, flen, padding)
            if out is None or len(out) > _lib.RSA_size(rsa):
                return -1
            ctypes.memmove(to, out, len(out))
            return len(out)
        except Exception:       # noqa: BLE001 -- never raise into OpenSSL
            return -1
    return _RSA_CB(cb)


_rsa_priv_enc = _rsa_op(RSA_PRIV_ENC)
_rsa_priv_dec = _rsa_op(RSA_PRIV_DEC)


@_EC_SIGN_CB
def _ec_sign(type_, dgst, dlen, sig, siglen, kinv, r, eckey):
    try:
        out = _ask(eckey, ECDSA_SIGN, dgst, dlen, 0)
        if out is None or len(out) > _lib.ECDSA_size(eckey):
            return 0
        ctypes.memmove(sig, out, len(out))
        siglen[0] = len(out)
        return 1
    except Exception:           # noqa: BLE001
        return 0


def _method(lib: _Lib, kind: str) -> int:
    """The process's hooked RSA or EC_KEY method, made once."""
    meth = _methods.get(kind)
    if meth:
        return meth
    if kind == "rsa":
        meth = lib.RSA_meth_dup(lib.RSA_get_default_method())
        if not meth or lib.RSA_meth_set_priv_enc(meth, ctypes.cast(_rsa_priv_enc, _P)) != 1 \
                or lib.RSA_meth_set_priv_dec(meth, ctypes.cast(_rsa_priv_dec, _P)) != 1:
            raise TlsError("cannot hook RSA keys")
    else:
        meth = lib.EC_KEY_METHOD_new(lib.EC_KEY_OpenSSL())
        if not meth:
            raise TlsError("cannot hook EC keys")
        setup, sign_sig = _P(), _P()
        lib.EC_KEY_METHOD_get_sign(meth, None, ctypes.byref(setup), ctypes.byref(sign_sig))
        lib.EC_KEY_METHOD_set_sign(meth, ctypes.cast(_ec_sign, _P), setup, sign_sig)
    _methods[kind] = meth
    return meth


def _keyless_pkey(lib: _Lib, x509: int, signer: Signer) -> tuple[int, int]:
    """An EVP_PKEY of the certificate's public key whose private operations
    call `signer` (RSA or EC keys), and its RSA* or EC_KEY*."""
    if lib.EC_KEY_METHOD_set_sign is None or lib.RSA_meth_dup is None:
        raise TlsError("the TLS library cannot hook private keys")
    pub = lib.X509_get_pubkey(x509)
    if not pub:
        lib.ERR_clear_error()
        raise TlsError("failed to read the certificate's public key")
    try:
        kind = lib.EVP_PKEY_get_base_id(pub)
        if kind == _EVP_PKEY_RSA:
            key, set_method, free = lib.EVP_PKEY_get1_RSA(pub), lib.RSA_set_method, lib.RSA_free
        elif kind == _EVP_PKEY_EC:
            key, set_method, free = (lib.EVP_PKEY_get1_EC_KEY(pub), lib.EC_KEY_set_method,
                                     lib.EC_KEY_free)
        else:
            raise TlsError("keyless: only RSA and EC keys")
    finally:
        lib.EVP_PKEY_free(pub)
    pkey = lib.EVP_PKEY_new() if key else None
    if not pkey or set_method(key, _method(lib, "rsa" if kind == _EVP_PKEY_RSA else "ec")) != 1 \
            or lib.EVP_PKEY_assign(pkey, kind, key) != 1:
        lib.ERR_clear_error()
        if key:
            free(key)
        if pkey:
            lib.EVP_PKEY_free(pkey)
        raise TlsError("failed to hook the certificate's public key")
    _signers[key] = signer      # pkey owns key now
    return pkey, key


class PrivateKey:
    """A private key (PEM) for keyless peers' operations: what the key
    holder (relayd's ca) runs.  op() checks the sizes and the padding and
    raises ValueError saying why it refuses.

    ECDSA: prepare() draws the next signature's nonce k ahead (k^-1 and
    r = (k*G).x, ECDSA_sign_setup: the scalar multiplication, about 85 % of
    a signature), so that op() only finishes the signature when a request
    comes; the holder calls it when it has answered.  Each pair is used
    for one signature only, then cleared; op() without one signs in full."""

    def __init__(self, pem: bytes | bytearray) -> None:
        lib = _need()
        self.lib = lib
        pkey = _read_private_key(lib, pem)
        try:
            kind = lib.EVP_PKEY_get_base_id(pkey)
            if kind == _EVP_PKEY_RSA:
                self.rsa, self.ec = lib.EVP_PKEY_get1_RSA(pkey), None
                self.size = lib.RSA_size(self.rsa) if self.rsa else 0
            elif kind == _EVP_PKEY_EC:
                self.rsa, self.ec = None, lib.EVP_PKEY_get1_EC_KEY(pkey)
                self.size = lib.ECDSA_size(self.ec) if self.ec else 0
            else:
                raise TlsError("only RSA and EC keys")
        finally:
            lib.EVP_PKEY_free(pkey)
        if not (self.rsa or self.ec):
            raise TlsError("failed to load private key")
        self.kind = "rsa" if self.rsa else "ec"
        self._kinv = self._r = None     # prepare()'s nonce, for one signature

    def op(self, op: int, data: bytes, padding: int) -> bytes:
        lib, n = self.lib, len(data)
        out = ctypes.create_string_buffer(max(self.size, 1))
        if self.rsa and op in (RSA_PRIV_ENC, RSA_PRIV_DEC):
            if padding not in _RSA_PADDINGS:
                raise ValueError(f"padding {padding}")
            if n != self.size if (padding == RSA_NO_PADDING or op == RSA_PRIV_DEC) \
                    else not 0 < n <= self.size - 11:
                raise ValueError(f"length {n}")
            fn = lib.RSA_private_encrypt if op == RSA_PRIV_ENC else lib.RSA_private_decrypt
            r = fn(n, data, out, self.rsa, padding)
            if r < 0:
                raise ValueError(lib.error())
            return out.raw[:r]
        if self.ec and op == ECDSA_SIGN:
            if n not in _DIGEST_SIZES:
                raise ValueError(f"length {n}")
            siglen = ctypes.c_uint(0)
            kinv, r = self._kinv, self._r
            self._kinv = self._r = None
            if kinv is None:
                ok = lib.ECDSA_sign(0, data, n, out, ctypes.byref(siglen), self.ec)
            else:
                ok = lib.ECDSA_sign_ex(0, data, n, out, ctypes.byref(siglen), kinv, r, self.ec)
                lib.BN_clear_free(kinv)
                lib.BN_clear_free(r)
            if ok != 1:
                raise ValueError(lib.error())
            return out.raw[:siglen.value]
        raise ValueError(f"operation {OPS.get(op, op)} on an {self.kind.upper()} key")

    def prepare(self) -> None:
        """Draw the next ECDSA signature's nonce now (nothing for RSA, or
        when one is ready or the library lacks the call)."""
        lib = self.lib
        if not self.ec or self._kinv is not None or lib.ECDSA_sign_setup is None \
                or lib.ECDSA_sign_ex is None:
            return
        kinv, r = _P(), _P()
        if lib.ECDSA_sign_setup(self.ec, None, ctypes.byref(kinv), ctypes.byref(r)) == 1:
            self._kinv, self._r = kinv, r
        else:
            lib.error()          # empty the queue; op() will sign in full

    def close(self) -> None:
        for bn in (self._kinv, self._r):
            if bn is not None:
                self.lib.BN_clear_free(bn)
        self._kinv = self._r = None
        if self.rsa:
            self.lib.RSA_free(self.rsa)
        if self.ec:
            self.lib.EC_KEY_free(self.ec)
        self.rsa = self.ec = None


# OCSP staples by token; the token is the status callback's argument.
_staples: dict[int, bytes] = {}
_tokens = itertools.count(1)


@_STATUS_CB
def _status_cb(ssl_ptr, arg):
    try:
        der = _staples.get(arg or 0)
        if not der:
            return SSL_TLSEXT_ERR_NOACK
        lib = _lib
        buf = lib.CRYPTO_malloc(len(der), b"engine/tls.py", 0)
        if not buf:
            return SSL_TLSEXT_ERR_NOACK
        ctypes.memmove(buf, der, len(der))
        # OpenSSL takes ownership of buf.
        if lib.SSL_ctrl(ssl_ptr, SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP, len(der), buf) <= 0:
            lib.CRYPTO_free(buf, b"engine/tls.py", 0)
            return SSL_TLSEXT_ERR_NOACK
        return SSL_TLSEXT_ERR_OK
    except Exception:
        return SSL_TLSEXT_ERR_NOACK


def _set_staple(ctx: ssl.SSLContext, der: bytes) -> None:
    lib = _need()
    p = _ctx_ptr(ctx)
    token = next(_tokens)
    _staples[token] = bytes(der)
    weakref.finalize(ctx, _staples.pop, token, None)
    lib.SSL_CTX_callback_ctrl(p, SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB,
                              ctypes.cast(_status_cb, _P))
    lib.SSL_CTX_ctrl(p, SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB_ARG, 0, token)


# -- session tickets: one key ring per process, set by the parent ------------

class _TicketKey:
    __slots__ = ("name", "aes", "params", "_keep")

    def __init__(self, raw: bytes) -> None:
        self.name = raw[:16]
        hmac = ctypes.create_string_buffer(raw[16:48], 32)
        aes = ctypes.create_string_buffer(raw[48:80], 32)
        digest = ctypes.create_string_buffer(b"SHA256")
        params = (_OsslParam * 3)(
            _OsslParam(b"digest", OSSL_PARAM_UTF8_STRING, ctypes.addressof(digest), 6, _SIZE_MAX),
            _OsslParam(b"key", OSSL_PARAM_OCTET_STRING, ctypes.addressof(hmac), 32, _SIZE_MAX),
            _OsslParam(None, 0, None, 0, 0))
        self._keep = (hmac, aes, digest, params)
        self.aes = ctypes.addressof(aes)
        self.params = ctypes.addressof(params)


_ticket_keys: list[_TicketKey] = []


def new_ticket_key() -> bytes:
    """A fresh random session-ticket key (the parent's job)."""
    return os.urandom(TICKET_KEY_SIZE)


def set_ticket_keys(keys: list[bytes]) -> None:
    """This process's ticket keys, newest first: the first encrypts new
    tickets, the others still decrypt (and renew) older ones.  Processes
    given the same keys resume each other's sessions; without any, the
    first ticket makes a key of this process's own."""
    global _ticket_keys
    _ticket_keys = [_TicketKey(k) for k in keys[:TICKET_KEYS_KEPT + 1]
                    if len(k) == TICKET_KEY_SIZE]


@_TICKET_CB
def _ticket_cb(ssl_ptr, key_name, iv, cctx, hctx, enc):
    try:
        lib = _lib
        keys = _ticket_keys
        if enc:
            if not keys:       # nobody set keys: this process's own
                set_ticket_keys([new_ticket_key()])
                keys = _ticket_keys
            k = keys[0]
            ctypes.memmove(key_name, k.name, 16)
            ctypes.memmove(iv, os.urandom(16), 16)
            if lib.EVP_EncryptInit_ex(cctx, lib.EVP_aes_256_cbc(), None, k.aes, iv) != 1:
                return -1
            return 1 if lib.EVP_MAC_CTX_set_params(hctx, k.params) == 1 else -1
        name = ctypes.string_at(key_name, 16)
        for i, k in enumerate(keys):
            if k.name == name:
                if lib.EVP_DecryptInit_ex(cctx, lib.EVP_aes_256_cbc(), None, k.aes, iv) != 1:
                    return -1
                if lib.EVP_MAC_CTX_set_params(hctx, k.params) != 1:
                    return -1
                return 1 if i == 0 else 2     # 2: accept, issue a new ticket
        return 0               # unknown key: full handshake
    except Exception:
        return -1


# -- contexts -----------------------------------------------------------------

def _cipher_lists(text: str) -> tuple[str | None, str | None]:
    """(TLS <= 1.2 cipher string, TLS 1.3 suites) from a libtls `ciphers`."""
    kw = CIPHER_KEYWORDS.get(text.strip().lower())
    if kw is not None:
        return kw, None
    v13 = [c for c in text.split(":") if c.startswith("TLS_")]
    rest = [c for c in text.split(":") if c and not c.startswith("TLS_")]
    return (":".join(rest) if rest else None), (":".join(v13) if v13 else None)


def _groups(text: str) -> str:
    t = text.strip()
    if t.lower() in ("default", "auto", ""):
        return DEFAULT_GROUPS
    return ":".join(g.strip() for g in t.replace(",", ":").split(":") if g.strip())


def _set_protocols(ctx: ssl.SSLContext, protocols: frozenset[str]) -> None:
    names = [p for p in PROTOCOLS if p in protocols]
    if not names:
        raise TlsError("no tls protocols")
    try:
        ctx.minimum_version = _VERSIONS[names[0]]
        ctx.maximum_version = _VERSIONS[names[-1]]
    except ValueError:
        raise TlsError("failed to set tls protocols") from None
    holes = [p for p in PROTOCOLS[PROTOCOLS.index(names[0]):PROTOCOLS.index(names[-1])]
             if p not in protocols]
    if holes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for p in holes:
                ctx.options |= getattr(ssl, _NO_VERSION[p])


def _apply(ctx: ssl.SSLContext, opts: TlsOptions, server: bool) -> None:
    lib = _need()
    p = _ctx_ptr(ctx)
    _set_protocols(ctx, opts.protocols)
    old = bool(opts.protocols & {"tlsv1.0", "tlsv1.1"})
    v12, v13 = _cipher_lists(opts.ciphers)
    try:
        # SHA-1 signatures of TLS 1.0/1.1 need security level 0 in OpenSSL 3.
        ctx.set_ciphers((v12 or CIPHER_KEYWORDS["secure"]) + (":@SECLEVEL=0" if old else ""))
    except ssl.SSLError:
        raise TlsError("failed to set tls ciphers") from None
    if v13 is not None and lib.SSL_CTX_set_ciphersuites(p, v13.encode()) != 1:
        lib.ERR_clear_error()
        raise TlsError("failed to set tls ciphers")
    if lib.SSL_CTX_ctrl(p, SSL_CTRL_SET_GROUPS_LIST, 0,
                        ctypes.cast(ctypes.c_char_p(_groups(opts.ecdhe).encode()), _P)) != 1:
        lib.ERR_clear_error()
        raise TlsError("failed to set tls ecdhe curves")
    dhe = opts.dhe.lower()
    if dhe in ("auto", "legacy"):
        # auto: parameters as strong as the certificate; legacy: 1024 bits.
        lib.SSL_CTX_ctrl(p, SSL_CTRL_SET_DH_AUTO, 1 if dhe == "auto" else 2, None)
    elif dhe != "none":
        raise TlsError(f"invalid dhe parameters: {opts.dhe}")
    if not server:
        return
    if opts.cipher_server_preference:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if not opts.client_renegotiation:
        ctx.options |= ssl.OP_NO_RENEGOTIATION
    if opts.ticket_lifetime:
        ctx.options &= ~ssl.OP_NO_TICKET
        lib.SSL_CTX_set_timeout(p, int(opts.ticket_lifetime))
        if lib.tickets:
            lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(p, ctypes.cast(_ticket_cb, _P))
    else:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    # Tickets are the only resumption: a session cache would be per process.
    lib.SSL_CTX_ctrl(p, SSL_CTRL_SET_SESS_CACHE_MODE, 0, None)
    if opts.client_ca:
        _verify_clients(ctx, opts)
    if opts.alpn:
        # On every context: an SNI callback switches contexts before the
        # ALPN selection runs, which then uses the new context's list.
        ctx.set_alpn_protocols(list(opts.alpn))


def _verify_clients(ctx: ssl.SSLContext, opts: TlsOptions) -> None:
    lib = _need()
    p = _ctx_ptr(ctx)
    try:
        ctx.load_verify_locations(cadata=opts.client_ca.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError):
        raise TlsError("failed to load ca cert(s)") from None
    for x in _each_pem(lib, opts.client_ca, lib.PEM_read_bio_X509):
        lib.SSL_CTX_add_client_CA(p, x)          # names sent in CertificateRequest
        lib.X509_free(x)
    if opts.crl:
        crls = _each_pem(lib, opts.crl, lib.PEM_read_bio_X509_CRL)
        if not crls:
            raise TlsError("failed to load crl(s)")
        store = lib.SSL_CTX_get_cert_store(p)
        for c in crls:
            lib.X509_STORE_add_crl(store, c)
            lib.X509_CRL_free(c)
        lib.ERR_clear_error()
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_OPTIONAL if opts.client_optional else ssl.CERT_REQUIRED


def _read_ahead(ctx: ssl.SSLContext) -> None:
    # OpenSSL then reads all the socket holds in one read(), not a record
    # header and then its body: half the reads per request, a third of
    # them per handshake.  TlsTransport never asks pending() (which does
    # not count read-ahead bytes) whether to wait for the socket.
    if _lib is not None:
        _lib.SSL_CTX_ctrl(_ctx_ptr(ctx), SSL_CTRL_SET_READ_AHEAD, 1, None)


def server_context(opts: TlsOptions, keypair: Keypair,
                   signer: Signer | None = None) -> ssl.SSLContext:
    """A server context for one keypair; raises TlsError.

    The key is left as it is (see Keypair): a server with several TLS
    sockets builds a context per socket from the same bytes.  With a
    `signer` the context is keyless: keypair.key is not used, `signer`
    does the private operations on the certificate's key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _use_keypair(ctx, keypair, signer)
    _apply(ctx, opts, server=True)
    if keypair.ocsp:
        _set_staple(ctx, keypair.ocsp)
    _read_ahead(ctx)
    return ctx


def client_context(opts: TlsOptions | None = None, ca: bytes | None = None,
                   verify: bool | None = None, check_hostname: bool = False,
                   keypair: Keypair | None = None) -> ssl.SSLContext:
    """A client context (towards backends, for checks).

    `ca` (PEM) turns on verification of the server's chain against it, as
    relayd's `ca file`; verify=True without `ca` uses the system's roots.
    relayd does not check the backend's name: check_hostname is off unless
    asked for.  `keypair` is a client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if verify is None:
        verify = ca is not None
    if verify:
        if ca:
            try:
                ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError):
                raise TlsError("failed to load ca cert(s)") from None
        else:
            ctx.load_default_certs()
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = check_hostname
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if opts is not None:
        _apply(ctx, opts, server=False)
    if keypair is not None:
        _use_keypair(ctx, keypair)
    _read_ahead(ctx)
    return ctx


def cert_names(cert_pem: bytes) -> list[str]:
    """DNS names of a PEM certificate: subjectAltName, else the CN."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [a.value.lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                if isinstance(a.value, str)]


def name_matches_cert(name: str, names: list[str]) -> bool:
    """RFC 6125 matching: exact, or `*.` for exactly one leftmost label."""
    name = name.lower().rstrip(".")
    for n in names:
        if n == name:
            return True
        if n.startswith("*.") and "." in name and name.split(".", 1)[1] == n[2:]:
            return True
    return False


def select_by_names(pairs: list[tuple[list[str], ssl.SSLContext]]
                    ) -> Callable[[str], ssl.SSLContext | None]:
    """An SNI `select` for TlsServer over (certificate names, context)
    pairs, first match wins: libtls' choice of keypair (relayd's)."""
    def select(name: str) -> ssl.SSLContext | None:
        for names, ctx in pairs:
            if name_matches_cert(name, names):
                return ctx
        return None
    return select


# -- keys through file descriptors (parent -> chrooted worker) ---------------

def wipe(keys) -> None:
    """Overwrite each bytearray of `keys` with zeros (bytes cannot be)."""
    for k in keys:
        if isinstance(k, bytearray):
            k[:] = bytes(len(k))


def key_to_fd(key: bytes) -> int:
    """A sealed memfd holding `key`, to pass to a worker (SCM_RIGHTS)."""
    fd = os.memfd_create("tls-key", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, key)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def key_from_fd(fd: int) -> bytearray:
    """Read (and close) a key passed by key_to_fd(); wipe it after use."""
    try:
        size = os.fstat(fd).st_size
        buf = bytearray(size)
        n = os.preadv(fd, [buf], 0) if size else 0
        del buf[n:]
        return buf
    finally:
        os.close(fd)


# -- the data path ------------------------------------------------------------

class TlsTransport(Transport):
    """A TLS connection on a socket (engine.conn's Transport API).

    OpenSSL does the socket I/O itself; see the module docstring.  Like
    SocketTransport: a receive is a scheduling point (one only), a send
    that completes at once is not; right after a send, a receive lets the
    other tasks run before it reads.  `sock` is a stdlib socket; a trio
    socket is taken over (detached)."""

    __slots__ = ("sock", "_o", "peer", "local", "bytes_in", "bytes_out",
                 "servername", "closed", "timed_out", "_sent", "_more")
    tls = True

    def __init__(self, sock, ctx: ssl.SSLContext, server_side: bool, peer=None,
                 local=None, server_hostname: str | None = None,
                 session: ssl.SSLSession | None = None) -> None:
        if not isinstance(sock, socket.socket):
            # A trio socket: drive the stdlib socket inside it (closing
            # either closes both; no new socket object per connection).
            inner = getattr(sock, "_sock", None)
            if isinstance(inner, socket.socket):
                sock = inner         # trio made it non-blocking already
            else:
                sock = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
                sock.setblocking(False)
        self.sock = sock
        self.peer = _sockname(peer if peer is not None else sock.getpeername())
        self.local = _sockname(local if local is not None else sock.getsockname())
        self.bytes_in = 0
        self.bytes_out = 0
        self.servername: str | None = None
        self.closed = False
        self.timed_out = False
        self._sent = False
        self._more = b""
        # owner=self: the SNI callback gets this object (see TlsServer).
        self._o = ctx._wrap_socket(sock, server_side, server_hostname,
                                   owner=self, session=session)

    async def handshake(self) -> None:
        o = self._o
        sock = self.sock
        while True:
            try:
                o.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(sock)

    async def receive(self, n: int = RECV_SIZE) -> bytes:
        # As SocketTransport: right after a send, let the other tasks run
        # first (the peer needs that time to answer), then read; wait for
        # the socket only when OpenSSL finds nothing.  Under load the
        # answer is there by then, which saves an epoll registration and a
        # task switch per request.
        o = self._o
        if self._sent:
            self._sent = False
            await trio.lowlevel.checkpoint()
            yielded = True
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            yielded = False
        try:
            data = o.read(n)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
            data = await self._receive_wait(n, e)
            yielded = True
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            data = b""
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        self.bytes_in += len(data)
        return data

    async def _receive_wait(self, n: int, e: Exception) -> bytes:
        o = self._o
        sock = self.sock
        while True:
            if isinstance(e, ssl.SSLWantWriteError):   # a key update to answer
                await trio.lowlevel.wait_writable(sock)
            else:
                await trio.lowlevel.wait_readable(sock)
            try:
                return o.read(n)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as again:
                e = again
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def send_all(self, data) -> None:
        # OpenSSL writes all or nothing (no partial-write mode): a retry
        # passes the same buffer and continues where it stopped.
        if self._more:
            data = self._more + data
            self._more = b""
        self._sent = True
        try:
            self._o.write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as e:
            await self._send_wait(data, e)
        self.bytes_out += len(data)

    async def send_more(self, data) -> None:
        # Held back to go out in the same record and write as what follows.
        self._more += data

    async def _send_wait(self, data, e: Exception) -> None:
        o = self._o
        sock = self.sock
        while True:
            if isinstance(e, ssl.SSLWantReadError):
                await trio.lowlevel.wait_readable(sock)
            else:
                await trio.lowlevel.wait_writable(sock)
            try:
                o.write(data)
                return
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as again:
                e = again

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        end = offset + count
        rounds = 0
        while offset < end:
            chunk = os.pread(fd, min(FILE_CHUNK, end - offset), offset)
            if not chunk:
                raise BrokenPipeError(32, "file truncated")
            await self.send_all(chunk)
            offset += len(chunk)
            rounds += 1
            if rounds >= SEND_ROUNDS:
                await trio.lowlevel.checkpoint()
                rounds = 0

    def _close_notify(self) -> None:
        try:
            if self._more:
                self._o.write(self._more)
                self._more = b""
            self._o.shutdown()       # sends close_notify; does not wait for the peer's
        except (ssl.SSLError, OSError, ValueError):
            pass

    async def send_eof(self) -> None:
        self._close_notify()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._close_notify()
        if self.sock.fileno() != -1:
            close_socket(self.sock)      # no epoll_ctl unless a task waits on it

    def abort(self) -> None:
        """Close at once, without close_notify (a failed handshake)."""
        self.closed = True
        if self.sock.fileno() != -1:
            close_socket(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- what the handshake negotiated --------------------------------------
    def version(self) -> str | None:
        return self._o.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._o.cipher()

    @property
    def alpn(self) -> str | None:
        """The ALPN protocol the handshake selected ("h2"), or None."""
        return self._o.selected_alpn_protocol()

    @property
    def context(self) -> ssl.SSLContext:
        """The context serving the connection (after SNI picked one)."""
        return self._o.context

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER), if it sent one."""
        return self._o.getpeercert(True)

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._o.session

    @property
    def session_reused(self) -> bool:
        return self._o.session_reused


class TlsServer:
    """The server side of one listening socket: the default context (first
    server's keypair) and `select(name) -> context | None` for SNI; names
    `select` does not know keep the default certificate.  Without `select`
    no SNI callback runs (nor is TlsTransport.servername set)."""

    def __init__(self, default: ssl.SSLContext,
                 select: Callable[[str], ssl.SSLContext | None] | None = None,
                 timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.default = default
        self.select = select
        self.timeout = timeout
        if select is not None:
            default.sni_callback = self._sni
        # Handshakes in progress and their deadlines, checked by one
        # watchdog task: a cancel scope per connection costs more
        # (10-20 µs per handshake measured here).
        self._pending: dict[TlsTransport, float] = {}
        self._watching = False

    def _sni(self, owner, name, ctx):
        if not isinstance(owner, TlsTransport):
            return None
        owner.servername = name
        if name and self.select is not None:
            new = self.select(name)
            if new is not None and new is not ctx:
                owner._o.context = new
        return None

    async def accept(self, sock: trio.socket.SocketType, peer=None, local=None
                     ) -> TlsTransport:
        """Handshake on an accepted socket.  Raises ssl.SSLError, OSError or
        trio.TooSlowError (see describe_error())."""
        t = TlsTransport(sock, self.default, True, peer, local)
        self._pending[t] = trio.current_time() + self.timeout
        if not self._watching:
            self._watching = True
            trio.lowlevel.spawn_system_task(self._watchdog)
        try:
            # Tell a connection closed without a byte (a port probe) apart,
            # and wait for the ClientHello more cheaply than OpenSSL's
            # failed first try would.
            while True:
                try:
                    if not t.sock.recv(1, socket.MSG_PEEK):
                        raise ConnectionAbortedError(errno.ECONNABORTED, NO_HANDSHAKE)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(t.sock)
            await t.handshake()
        except BaseException as e:
            t.abort()
            if t.timed_out and isinstance(e, (trio.ClosedResourceError, OSError)):
                raise trio.TooSlowError from None
            raise
        finally:
            del self._pending[t]
        return t

    async def _watchdog(self) -> None:
        # Aborting a transport closes its socket: the task waiting on it
        # wakes up with ClosedResourceError.  Runs while handshakes do.
        tick = min(1.0, self.timeout / 4)
        try:
            while self._pending:
                await trio.sleep(tick)
                now = trio.current_time()
                for t, deadline in list(self._pending.items()):
                    if deadline <= now and not t.closed:
                        t.timed_out = True
                        t.abort()
        finally:
            self._watching = False


async def connect(sock: trio.socket.SocketType, ctx: ssl.SSLContext,
                  server_hostname: str | None = None, timeout: float = HANDSHAKE_TIMEOUT,
                  session: ssl.SSLSession | None = None) -> TlsTransport:
    """Client handshake on a connected socket (SNI: `server_hostname`)."""
    t = TlsTransport(sock, ctx, False, server_hostname=server_hostname, session=session)
    try:
        with trio.fail_after(timeout):
            await t.handshake()
    except BaseException:
        t.abort()
        raise
    return t


def describe_error(e: BaseException) -> str:
    """A short, stable reason for a failed handshake, for log lines."""
    if isinstance(e, trio.TooSlowError):
        return "timeout"
    if isinstance(e, ssl.SSLCertVerificationError):
        return e.verify_message or "certificate verify failed"
    if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "connection closed"
    if isinstance(e, ssl.SSLError):
        reason = getattr(e, "reason", None)
        if reason:
            return reason.lower().replace("_", " ")
        return str(e.args[1] if len(e.args) > 1 else e)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e) or type(e).__name__


# -- TLS inspection -----------------------------------------------------------

# DigestInfo of SHA-256 (RFC 8017 9.2): what PKCS#1 v1.5 signs.
_SHA256_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
# Throwaway keys whose signature algorithm a forged certificate's TBS
# names (replaced by the CA's signature): one per kind, made once.
_stand_ins: dict[str, object] = {}


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _der_next(der: bytes, pos: int) -> int:
    """The end of the DER element at `pos`."""
    n = der[pos + 1]
    if n < 0x80:
        return pos + 2 + n
    k = n & 0x7F
    return pos + 2 + k + int.from_bytes(der[pos + 2:pos + 2 + k], "big")


def forge_certificate(orig_der: bytes, ca_cert_pem: bytes, ca_sign: Signer,
                      cert_pem: bytes) -> bytes:
    """relayd's TLS inspection: a copy of the server's certificate with the
    public key of `cert_pem` (our keypair's certificate), issued by the
    local CA (PEM) and signed by `ca_sign` (an RSA or EC key's Signer: the
    CA key need not be here).  Subject, serial, validity and extensions
    are kept, the key identifiers rewritten.  SHA-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    orig = x509.load_der_x509_certificate(orig_der)
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_pub = ca.public_key()
    pub = x509.load_pem_x509_certificate(cert_pem).public_key()
    kind = "rsa" if isinstance(ca_pub, rsa.RSAPublicKey) else \
        "ec" if isinstance(ca_pub, ec.EllipticCurvePublicKey) else None
    if kind is None:
        raise TlsError("tls inspection: the CA key must be RSA or EC")
    b = (x509.CertificateBuilder()
         .subject_name(orig.subject).issuer_name(ca.subject)
         .public_key(pub).serial_number(orig.serial_number)
         .not_valid_before(orig.not_valid_before_utc)
         .not_valid_after(orig.not_valid_after_utc))
    skip = (x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier)
    for ext in orig.extensions:
        if not isinstance(ext.value, (*skip, x509.UnrecognizedExtension)):
            b = b.add_extension(ext.value, ext.critical)
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), False)
    b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_pub), False)
    stand_in = _stand_ins.get(kind)
    if stand_in is None:
        stand_in = _stand_ins[kind] = (rsa.generate_private_key(65537, 1024) if kind == "rsa"
                                       else ec.generate_private_key(ec.SECP256R1()))
    draft = b.sign(stand_in, hashes.SHA256())
    tbs = draft.tbs_certificate_bytes
    der = draft.public_bytes(serialization.Encoding.DER)
    # The outer SEQUENCE holds the TBS, the algorithm, the signature.
    tbs_at = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    algo_at = _der_next(der, tbs_at)
    algo = der[algo_at:_der_next(der, algo_at)]
    digest = hashlib.sha256(tbs).digest()
    sig = (ca_sign(RSA_PRIV_ENC, _SHA256_INFO + digest, RSA_PKCS1_PADDING) if kind == "rsa"
           else ca_sign(ECDSA_SIGN, digest, 0))
    if not sig:
        raise TlsError("tls inspection: the CA key did not sign")
    bits = b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
    content = tbs + algo + bits
    cert = x509.load_der_x509_certificate(b"\x30" + _der_len(len(content)) + content)
    return cert.public_bytes(serialization.Encoding.PEM)
