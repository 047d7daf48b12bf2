"""shared.acme_conf -- the acme-client.conf(5) grammar.

Turns an acme-client.conf into frozen values: `authority` blocks (api url,
account key and its type, contact) and `domain` blocks (names, key, the
certificate files, the authority to sign with, the challenge directory),
with OpenBSD parse.y's checks and messages, each as `file:line: message`.
Lexing, macros and `include` are shared.lexer's and shared.parser's.

Both the acme-client command and, later, httpd's built-in ACME read their
domains through this module.  It reads no file but the configuration and
its includes; the only file-system look is OpenBSD's check that an
existing domain key is absolute and not group/world accessible.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from shared.parser import Parser, StmtError

ACME_CONF = "/etc/acme-client.conf"      # default -f
CHALLENGEDIR = "/var/www/acme"           # default challengedir (WWW_DIR)
KEYTYPES = ("rsa", "ecdsa")
DEFAULT_KEYTYPE = "rsa"                  # parse.y: an omitted key type is rsa

KEYWORDS = frozenset("""
    account alternative api authority certificate chain challengedir contact
    domain ecdsa full include key name names rsa sign url with
""".split())

# allowed_in_string() of acme-client's parse.y: `/`, `<>` and `;` are word
# characters there (httpd's lexer makes them tokens).
PUNCT_CHARS = frozenset("(){}!=,")

# domain_valid(): not RFC 1035, just no bogus characters in names and handles.
_DOMAIN_OK = re.compile(r"[A-Za-z0-9._-]*\Z")


@dataclass(frozen=True)
class AuthorityConfig:
    """One `authority NAME { ... }` block."""
    name: str
    api_url: str
    account_key: str
    account_keytype: str = DEFAULT_KEYTYPE
    contact: str | None = None
    where: str = ""


@dataclass(frozen=True)
class DomainConfig:
    """One `domain HANDLE { ... }` block."""
    handle: str
    domain_name: str
    key: str
    keytype: str = DEFAULT_KEYTYPE
    alternative_names: tuple[str, ...] = ()
    cert: str | None = None
    chain: str | None = None
    fullchain: str | None = None
    sign_with: str | None = None
    challengedir: str = CHALLENGEDIR
    where: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """The names the certificate is for, `domain name` first."""
        return (self.domain_name, *self.alternative_names)

    @property
    def certfile(self) -> str:
        """The file whose certificate decides renewal and is revoked
        (the certificate, else the full chain, as acme-client)."""
        return self.cert or self.fullchain or ""


@dataclass(frozen=True)
class AcmeConfig:
    path: str
    authorities: tuple[AuthorityConfig, ...] = ()
    domains: tuple[DomainConfig, ...] = ()

    def domain(self, handle: str) -> DomainConfig | None:
        return next((d for d in self.domains if d.handle == handle), None)

    def authority_for(self, dom: DomainConfig) -> AuthorityConfig | None:
        """`sign with`, or the first authority in the file (acme-client)."""
        if dom.sign_with is None:
            return self.authorities[0] if self.authorities else None
        return next((a for a in self.authorities if a.name == dom.sign_with), None)


def load(path: str, macros: dict[str, str] | None = None, verbose: int = 0,
         text: str | None = None) -> AcmeConfig:
    """Parse an acme-client.conf; raises shared.lexer.ConfigError with every
    `file:line: message`.  `text`, when given, is parsed instead of `path`."""
    return AcmeParser.load_config(path, macros, verbose, text)


def format_config(conf: AcmeConfig) -> str:
    """The configuration as `acme-client -nv` prints it (print_config())."""
    out = []
    for a in conf.authorities:
        out.append(f"authority {a.name} {{")
        out.append(f'\tapi url "{a.api_url}"')
        out.append(f'\taccount key "{a.account_key}" {a.account_keytype}')
        if a.contact:
            out.append(f'\tcontact "{a.contact}"')
        out += ["}", ""]
    for d in conf.domains:
        out.append(f"domain {d.handle} {{")
        out.append(f'\tdomain name "{d.domain_name}"')
        if d.alternative_names:
            out.append("\talternative names { " + ", ".join(d.alternative_names) + " }")
        out.append(f'\tdomain key "{d.key}" {d.keytype}')
        for label, value in (("domain certificate", d.cert),
                             ("domain chain certificate", d.chain),
                             ("domain full chain certificate", d.fullchain),
                             ("sign with", d.sign_with)):
            if value is not None:
                out.append(f'\t{label} "{value}"')
        out.append(f'\tchallengedir "{d.challengedir}"')
        out += ["}", ""]
    return "\n".join(out)


def check_key_file(path: str) -> str | None:
    """conf_check_file(): an error message, or None when the key file is
    fine (absolute; missing, or accessible to its owner only)."""
    if not path.startswith("/"):
        return f"{path}: not an absolute path"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path}: group read/writable or world read/writable"
    return None


class AcmeParser(Parser):
    """Recursive descent over acme-client.conf; parse() returns AcmeConfig."""

    KEYWORDS = KEYWORDS
    PUNCT_CHARS = PUNCT_CHARS

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.authorities: list[AuthorityConfig] = []
        self.domains: list[DomainConfig] = []
        self.files_used: set[str] = set()   # conf_new_keyfile(): one use per file

    def parse(self) -> AcmeConfig:
        self.top_level(self.statement)
        return AcmeConfig(self.path, tuple(self.authorities), tuple(self.domains))

    def statement(self) -> None:
        if self.accept("authority"):
            self.authority()
        elif self.accept("domain"):
            self.domain()
        else:
            raise self.syntax_error()

    def keytype(self) -> str:
        for kt in KEYTYPES:
            if self.accept(kt):
                return kt
        return DEFAULT_KEYTYPE

    def once(self, fields: dict, key: str, value, msg: str, tok) -> None:
        if key in fields:
            raise self.error(msg, tok)
        fields[key] = value

    def checked_block(self, item) -> None:
        """A block whose closing checks only run when its lines were fine
        (in parse.y an error abandons the whole block)."""
        before = len(self.errors.lines)
        self.block(item, seps="")
        if len(self.errors.lines) > before:
            raise StmtError("block")

    def use_file(self, path: str, what: str, tok) -> None:
        if path in self.files_used:
            raise self.error(f"domain {what} file already used", tok)
        self.files_used.add(path)

    # -- authority -----------------------------------------------------------
    def authority(self) -> None:
        name_tok = self.tok
        name = self.string("authority name")
        if any(a.name == name for a in self.authorities):
            raise self.error("authority already defined", name_tok)
        fields: dict = {}
        self.checked_block(lambda: self.authority_option(fields))
        end = self.where()
        if "api_url" not in fields:
            raise self.error(f"authority {name}: no api URL specified", self.tok)
        if "account_key" not in fields:
            raise self.error(f"authority {name}: no account key file specified", self.tok)
        self.authorities.append(AuthorityConfig(name=name, where=end, **fields))

    def authority_option(self, fields: dict) -> None:
        t = self.tok
        if self.accept("api"):
            self.expect("url")
            self.once(fields, "api_url", self.string("url"), "duplicate api", t)
        elif self.accept("account"):
            self.expect("key")
            path = self.string("file name")
            kt = self.keytype()
            self.once(fields, "account_key", path, "duplicate account", t)
            fields["account_keytype"] = kt
        elif self.accept("contact"):
            self.once(fields, "contact", self.string("contact"), "duplicate contact", t)
        else:
            raise self.syntax_error()

    # -- domain --------------------------------------------------------------
    def domain(self) -> None:
        handle_tok = self.tok
        handle = self.string("domain handle")
        if not _DOMAIN_OK.match(handle):
            raise self.error(f"{handle}: bad domain syntax", handle_tok)
        if any(d.handle == handle for d in self.domains):
            raise self.error("domain already defined", handle_tok)
        fields: dict = {}
        altnames: list[str] = []
        self.checked_block(lambda: self.domain_option(fields, altnames))
        name = fields.setdefault("domain_name", handle)
        if "key" not in fields:
            raise self.error(f"no domain key file specified for domain {name}", self.tok)
        if "cert" not in fields and "fullchain" not in fields:
            raise self.error("at least certificate file or full certificate chain file "
                             f"must be specified for domain {name}", self.tok)
        self.domains.append(DomainConfig(handle=handle, alternative_names=tuple(altnames),
                                         where=handle_tok.where(), **fields))

    def domain_option(self, fields: dict, altnames: list[str]) -> None:
        t = self.tok
        if self.accept("alternative"):
            self.expect("names")
            self.block(lambda: self.altname(altnames))
        elif self.accept("domain"):
            self.domain_file_option(fields, t)
        elif self.accept("sign"):
            self.expect("with")
            name = self.string("authority name")
            self.once(fields, "sign_with", name, "duplicate sign with", t)
            if not any(a.name == name for a in self.authorities):
                raise self.error("sign with: unknown authority", t)
        elif self.accept("challengedir"):
            self.once(fields, "challengedir", self.string("directory"),
                      "duplicate challengedir", t)
        else:
            raise self.syntax_error()

    def domain_file_option(self, fields: dict, t) -> None:
        if self.accept("name"):
            self.once(fields, "domain_name", self.string("domain name"),
                      "duplicate domain name", t)
        elif self.accept("key"):
            path = self.string("file name")
            kt = self.keytype()
            self.once(fields, "key", path, "duplicate key", t)
            fields["keytype"] = kt
            msg = check_key_file(path)
            if msg:
                raise self.error(msg, t)
            self.use_file(path, "key", t)
        elif self.accept("certificate"):
            path = self.string("file name")
            self.once(fields, "cert", path, "duplicate cert", t)
            if not path.startswith("/"):
                raise self.error("not an absolute path", t)
            self.use_file(path, "cert", t)
        elif self.accept("chain"):
            self.expect("certificate")
            path = self.string("file name")
            self.once(fields, "chain", path, "duplicate chain", t)
            self.use_file(path, "chain", t)
        elif self.accept("full"):
            self.expect("chain")
            self.expect("certificate")
            path = self.string("file name")
            self.once(fields, "fullchain", path, "duplicate full chain", t)
            self.use_file(path, "full chain", t)
        else:
            raise self.syntax_error("name, key, certificate, chain or full")

    def altname(self, altnames: list[str]) -> None:
        # `{ a, b c }`: the comma is optional (parse.y's `comma`).
        while True:
            t = self.tok
            name = self.string("domain name")
            if not _DOMAIN_OK.match(name):
                raise self.error("bad domain syntax", t)
            altnames.append(name)
            if not self.is_string():
                return
