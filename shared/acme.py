"""shared.acme -- the talking half of an RFC 8555 (ACME) client.

The order flow for http-01 (account, order, authorizations, challenges,
finalize, download), revocation, and the protocol's rules: nonces and the
badNonce retry (section 6.5), problem documents (6.7), Retry-After for
rateLimited and polling (6.6, 7.5.1), and when a certificate is due for
renewal.

It never holds a key.  Every JWS is made by an async `sign` callback
(url, nonce, payload, kid) -> flattened JWS dict, so the key can live in
another process; publishing a token, building the CSR and storing the
certificate are callbacks too.  HTTP goes through an injected
httpx.AsyncClient, so this runs under trio (httpx's anyio backend) in the
unprivileged process.  It writes no file.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from shared.acme_crypto import b64url

# -- protocol rules -----------------------------------------------------------------

RENEW_BEFORE = 30 * 86400     # acme-client renews 30 days before expiry ...
RENEW_FRACTION = 3            # ... or, for short certificates, at 1/3 of the lifetime left
BADNONCE_RETRIES = 20         # a CA may reject any nonce (pebble: 5%, tests: 50%)
RATE_LIMIT_RETRIES = 3        # rateLimited/503 answers waited out per request
MAX_RETRY_AFTER = 60.0        # longer waits fail the run instead (cron runs again)
POLL_TRIES = 60               # authorization and order polls, each bounded
POLL_MAX_DELAY = 5.0
HTTP_TIMEOUT = 30.0           # one HTTP exchange with the CA

ERR = "urn:ietf:params:acme:error:"
Sign = Callable[[str, str, "dict | None", "str | None"], Awaitable[dict]]


def renew_window(lifetime: float) -> float:
    """How long before expiry a certificate of `lifetime` seconds is renewed."""
    return min(RENEW_BEFORE, lifetime / RENEW_FRACTION)


def renewal_due(not_before: float, not_after: float, now: float) -> bool:
    """True when fewer than renew_window(lifetime) seconds are left."""
    return not_after - now < renew_window(not_after - not_before)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date
    (RFC 9110 section 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class AcmeError(Exception):
    """A problem document from the CA, or a protocol violation."""

    def __init__(self, detail: str, type: str = "", status: int = 0,
                 retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.type = type
        self.status = status
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, resp) -> "AcmeError":
        try:
            doc = resp.json()
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        return cls(str(doc.get("detail") or resp.reason_phrase or "error"),
                   str(doc.get("type", "")), resp.status_code,
                   parse_retry_after(resp.headers.get("Retry-After")))

    def short_type(self) -> str:
        return self.type.removeprefix(ERR)

    def __str__(self) -> str:
        kind = f"{self.short_type()}: " if self.type else ""
        code = f"{self.status} " if self.status else ""
        return f"{code}{kind}{self.detail}"


def _retryable_wait(err: AcmeError) -> float | None:
    """How long to wait before repeating the request, None if not at all."""
    if err.status not in (429, 503) and err.short_type() != "rateLimited":
        return None
    if err.retry_after is None or err.retry_after > MAX_RETRY_AFTER:
        return None
    return err.retry_after


@dataclass
class Hooks:
    """What the flow needs from the key-holding side."""
    sign: Sign                                            # JWS for (url, nonce, payload, kid)
    publish: Callable[[str, str], Awaitable[None]]        # token, key authorization
    unpublish: Callable[[str], Awaitable[None]]           # token
    csr: Callable[[], Awaitable[bytes]]                   # DER


class AcmeClient:
    """One account's conversation with one CA directory."""

    def __init__(self, http, directory_url: str, sign: Sign,
                 log: Callable[[str], None] = lambda msg: None) -> None:
        self.http = http
        self.directory_url = directory_url
        self.sign = sign
        self.log = log
        self.directory: dict = {}
        self.kid: str | None = None
        self._nonce: str | None = None

    # -- transport ------------------------------------------------------------
    async def get_directory(self) -> dict:
        self.log(f"{self.directory_url}: directories")
        resp = await self.http.get(self.directory_url)
        if resp.status_code != 200:
            raise AcmeError.from_response(resp)
        doc = resp.json()
        for key in ("newNonce", "newAccount", "newOrder"):
            if not isinstance(doc.get(key), str):
                raise AcmeError(f"{self.directory_url}: directory without {key}")
        self.directory = doc
        return doc

    async def _new_nonce(self) -> str:
        url = self.directory["newNonce"]
        self.log(f"{url}: new-nonce")
        resp = await self.http.head(url)
        nonce = resp.headers.get("Replay-Nonce")
        if not nonce:
            raise AcmeError(f"{url}: no Replay-Nonce", status=resp.status_code)
        return nonce

    async def post(self, url: str, payload: dict | None, *, use_kid: bool = True,
                   accept: str | None = None):
        """Sign and POST; retry badNonce with the nonce of the error
        (section 6.5) and wait out short rateLimited/503 answers."""
        waits = 0
        for _ in range(BADNONCE_RETRIES + RATE_LIMIT_RETRIES + 1):
            nonce = self._nonce or await self._new_nonce()
            self._nonce = None
            body = await self.sign(url, nonce, payload, self.kid if use_kid else None)
            headers = {"Content-Type": "application/jose+json"}
            if accept:
                headers["Accept"] = accept
            resp = await self.http.post(url, content=json.dumps(body).encode(), headers=headers)
            self._nonce = resp.headers.get("Replay-Nonce") or None
            if resp.status_code < 400:
                return resp
            err = AcmeError.from_response(resp)
            if err.short_type() == "badNonce":
                self.log(f"{url}: bad nonce, retrying")
                continue
            wait = _retryable_wait(err)
            if wait is None or waits >= RATE_LIMIT_RETRIES:
                raise err
            waits += 1
            self.log(f"{url}: {err}; retrying after {wait:g} seconds")
            await trio.sleep(wait)
        raise AcmeError(f"{url}: too many retries")

    async def _poll(self, url: str, done: Callable[[dict], bool], what: str) -> dict:
        delay = 0.25
        for _ in range(POLL_TRIES):
            resp = await self.post(url, None)
            doc = resp.json()
            if done(doc):
                return doc
            hint = parse_retry_after(resp.headers.get("Retry-After"))
            await trio.sleep(min(hint if hint is not None else delay, POLL_MAX_DELAY))
            delay = min(delay * 2, POLL_MAX_DELAY)
        raise AcmeError(f"{url}: {what} still pending after {POLL_TRIES} polls")

    # -- account ----------------------------------------------------------------
    async def account(self, contact: str | None) -> str:
        """newAccount (an existing account is found by its key): sets kid."""
        url = self.directory["newAccount"]
        self.log(f"{url}: new-account")
        payload: dict = {"termsOfServiceAgreed": True}
        if contact:
            payload["contact"] = [contact]
        resp = await self.post(url, payload, use_kid=False)
        kid = resp.headers.get("Location")
        if not kid:
            raise AcmeError(f"{url}: no account URL in the answer")
        self.kid = kid
        return kid

    # -- issuance ------------------------------------------------------------------
    async def issue(self, names: tuple[str, ...], thumbprint: str, hooks: Hooks) -> str:
        """Order a certificate for `names` with http-01; returns the PEM chain."""
        url = self.directory["newOrder"]
        self.log(f"{url}: new-order")
        resp = await self.post(url, {"identifiers": [{"type": "dns", "value": n}
                                                     for n in names]})
        order_url = resp.headers.get("Location")
        order = resp.json()
        if not order_url or not isinstance(order.get("authorizations"), list):
            raise AcmeError(f"{url}: malformed order")
        await self._authorize(order["authorizations"], thumbprint, hooks)
        order = await self._poll(order_url, lambda o: o.get("status") != "pending", "order")
        if order.get("status") != "ready":
            raise AcmeError(f"{order_url}: order is {order.get('status')}")
        self.log(f"{order['finalize']}: finalize")
        await self.post(order["finalize"], {"csr": b64url(await hooks.csr())})
        order = await self._poll(order_url, lambda o: o.get("status") not in
                                 ("ready", "processing"), "order")
        if order.get("status") != "valid" or not order.get("certificate"):
            raise AcmeError(f"{order_url}: order is {order.get('status')}")
        self.log(f"{order['certificate']}: certificate")
        resp = await self.post(order["certificate"], None,
                               accept="application/pem-certificate-chain")
        return resp.text

    async def _authorize(self, authz_urls: list[str], thumbprint: str, hooks: Hooks) -> None:
        published: list[str] = []
        try:
            pending = []
            for url in authz_urls:
                self.log(f"{url}: req-auth")
                authz = (await self.post(url, None)).json()
                if authz.get("status") == "valid":
                    continue
                if authz.get("status") != "pending":
                    raise AcmeError(f"{url}: authorization is {authz.get('status')}")
                chal = next((c for c in authz.get("challenges", [])
                             if c.get("type") == "http-01"), None)
                name = authz.get("identifier", {}).get("value", "?")
                if chal is None:
                    raise AcmeError(f"{name}: no http-01 challenge offered")
                token = str(chal.get("token", ""))
                await hooks.publish(token, f"{token}.{thumbprint}")
                published.append(token)
                self.log(f"{chal['url']}: challenge")
                await self.post(chal["url"], {})
                pending.append((url, name))
            for url, name in pending:
                authz = await self._poll(url, lambda a: a.get("status") not in
                                         ("pending", "processing"), "authorization")
                if authz.get("status") != "valid":
                    raise _challenge_error(authz, name)
        finally:
            # Tokens are removed whatever happened, even on cancellation.
            with trio.CancelScope(shield=True):
                for token in published:
                    await hooks.unpublish(token)

    # -- revocation ------------------------------------------------------------------
    async def revoke(self, cert_der: bytes) -> None:
        url = self.directory.get("revokeCert")
        if not url:
            raise AcmeError(f"{self.directory_url}: directory without revokeCert")
        self.log(f"{url}: revocation")
        await self.post(url, {"certificate": b64url(cert_der)})


def _challenge_error(authz: dict, name: str) -> AcmeError:
    for chal in authz.get("challenges", []):
        err = chal.get("error")
        if isinstance(err, dict):
            return AcmeError(f"{name}: {err.get('detail', 'challenge failed')}",
                             str(err.get("type", "")), int(err.get("status", 0) or 0))
    return AcmeError(f"{name}: authorization is {authz.get('status')}")
