"""shared.acme_conf: acme-client.conf(5) text -> AcmeConfig, or `file:line: message`."""

from __future__ import annotations

import os

import pytest

from shared import acme_conf
from shared.acme_conf import AcmeConfig, AuthorityConfig, DomainConfig
from shared.lexer import ConfigError

NAME = "t.conf"
AUTH = 'authority le {\n\tapi url "https://ca.test/dir"\n\taccount key "/etc/acme/a.key"\n}\n'


def load(text: str, **kw) -> AcmeConfig:
    return acme_conf.load(NAME, text=text, **kw)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(text)
    return exc.value.lines


def error_at(text: str, line: int, message: str) -> None:
    """Exactly this one error, at `line`."""
    assert errors(text) == [f"{NAME}:{line}: {message}"]


def domain(body: str, pre: str = AUTH) -> DomainConfig:
    conf = load(f"{pre}domain example.com {{\n{body}\n}}\n")
    assert len(conf.domains) == 1
    return conf.domains[0]


KEY = 'domain key "/etc/ssl/private/example.com.key"'
CERT = 'domain certificate "/etc/ssl/example.com.crt"'


def test_every_keyword():
    conf = load("""
authority letsencrypt {
	api url "https://acme-v02.api.letsencrypt.org/directory"
	account key "/etc/acme/letsencrypt-privkey.pem" ecdsa
	contact "mailto:ops@example.com"
}
authority staging {
	api url "https://acme-staging-v02.api.letsencrypt.org/directory"
	account key "/etc/acme/staging-privkey.pem" rsa
}
domain example.com {
	domain name "www.example.com"
	alternative names { example.com, secure.example.com
		mail.example.com }
	domain key "/etc/ssl/private/example.com.key" ecdsa
	domain certificate "/etc/ssl/example.com.crt"
	domain chain certificate "/etc/ssl/example.com.chain.pem"
	domain full chain certificate "/etc/ssl/example.com.fullchain.pem"
	sign with staging
	challengedir "/var/www/acme-other"
}
""")
    le, staging = conf.authorities
    assert le == AuthorityConfig("letsencrypt", "https://acme-v02.api.letsencrypt.org/directory",
                                 "/etc/acme/letsencrypt-privkey.pem", "ecdsa",
                                 "mailto:ops@example.com", where=le.where)
    assert (staging.account_keytype, staging.contact) == ("rsa", None)
    d = conf.domains[0]
    assert d.handle == "example.com" and d.domain_name == "www.example.com"
    assert d.names == ("www.example.com", "example.com", "secure.example.com",
                       "mail.example.com")
    assert (d.key, d.keytype) == ("/etc/ssl/private/example.com.key", "ecdsa")
    assert d.cert == "/etc/ssl/example.com.crt" and d.certfile == d.cert
    assert d.chain == "/etc/ssl/example.com.chain.pem"
    assert d.fullchain == "/etc/ssl/example.com.fullchain.pem"
    assert d.sign_with == "staging" and conf.authority_for(d) is staging
    assert d.challengedir == "/var/www/acme-other"
    assert conf.domain("example.com") is d and conf.domain("other") is None


def test_defaults():
    d = domain(f'{KEY}\ndomain full chain certificate "/etc/ssl/fc.pem"')
    assert d.domain_name == "example.com"                  # the handle
    assert d.keytype == "rsa"                              # parse.y: rsa unless said
    assert d.challengedir == acme_conf.CHALLENGEDIR == "/var/www/acme"
    assert d.cert is None and d.certfile == "/etc/ssl/fc.pem"
    assert d.sign_with is None
    conf = load(AUTH + f"domain x {{\n{KEY}\n{CERT}\n}}\n")
    assert conf.authority_for(conf.domains[0]).name == "le"   # the first authority
    assert load(AUTH).authorities[0].account_keytype == "rsa"
    assert acme_conf.ACME_CONF == "/etc/acme-client.conf"


def test_macros_and_unquoted_url():
    conf = load('ca = "https://ca.test:14000/dir"\nakey = "/k/a.key"\n'
                "authority x {\n\tapi url $ca\n\taccount key $akey ecdsa\n}\n")
    a = conf.authorities[0]
    assert (a.api_url, a.account_key, a.account_keytype) == \
        ("https://ca.test:14000/dir", "/k/a.key", "ecdsa")
    # acme-client's words keep `/`: a URL needs no quotes
    conf = load("authority x {\n\tapi url https://ca.test/dir\n\taccount key k\n}\n")
    assert conf.authorities[0].api_url == "https://ca.test/dir"
    conf = acme_conf.load(NAME, {"ca": "https://other.test/dir"},
                          text='ca = "https://ca.test/dir"\n'
                               "authority x {\n\tapi url $ca\n\taccount key k\n}\n")
    assert conf.authorities[0].api_url == "https://other.test/dir"   # -D style wins


def test_include(tmp_path):
    inc = tmp_path / "auth.conf"
    inc.write_text(AUTH)
    main = tmp_path / "main.conf"
    main.write_text(f'include "{inc}"\ndomain d {{\n{KEY}\n{CERT}\n}}\n')
    conf = acme_conf.load(str(main))
    assert conf.authorities[0].name == "le" and conf.domains[0].handle == "d"
    bad = tmp_path / "bad.conf"
    bad.write_text("authority z {\n\taccount key k\n}\n")
    main.write_text(f'include "{bad}"\n')
    with pytest.raises(ConfigError) as exc:
        acme_conf.load(str(main))
    assert exc.value.lines == [f"{bad}:3: authority z: no api URL specified"]
    main.write_text(f'include "{tmp_path}/missing.conf"\n')
    with pytest.raises(ConfigError) as exc:
        acme_conf.load(str(main))
    assert exc.value.lines[0].startswith(f"{main}:1: cannot open {tmp_path}/missing.conf")


@pytest.mark.parametrize("text, line, message", [
    (AUTH + AUTH, 5, "authority already defined"),
    ("authority x {\n\taccount key k\n}\n", 3, "authority x: no api URL specified"),
    ("authority x {\n\tapi url u\n}\n", 3, "authority x: no account key file specified"),
    ("authority x {\n\tapi url u\n\tapi url v\n\taccount key k\n}\n", 3, "duplicate api"),
    ("authority x {\n\tapi url u\n\taccount key k\n\taccount key l\n}\n", 4,
     "duplicate account"),
    ("authority x {\n\tapi url u\n\taccount key k\n\tcontact a\n\tcontact b\n}\n", 5,
     "duplicate contact"),
    (AUTH + f"domain a/b {{\n{KEY}\n{CERT}\n}}\n", 5, "a/b: bad domain syntax"),
    (AUTH + f"domain d {{\n{KEY}\n{CERT}\n}}\ndomain d {{\n}}\n", 9, "domain already defined"),
    (AUTH + f"domain d {{\n{CERT}\n}}\n", 7, "no domain key file specified for domain d"),
    (AUTH + f"domain d {{\ndomain name n.test\n{KEY}\n}}\n", 8,
     "at least certificate file or full certificate chain file must be specified "
     "for domain n.test"),
    (AUTH + f"domain d {{\ndomain name a\ndomain name b\n{KEY}\n{CERT}\n}}\n", 7,
     "duplicate domain name"),
    (AUTH + f"domain d {{\n{KEY}\n{KEY}\n{CERT}\n}}\n", 7, "duplicate key"),
    (AUTH + f'domain d {{\ndomain key "k.pem"\n{CERT}\n}}\n', 6, "k.pem: not an absolute path"),
    (AUTH + f"domain d {{\n{KEY}\n{CERT}\n{CERT}\n}}\n", 8, "duplicate cert"),
    (AUTH + f'domain d {{\n{KEY}\ndomain certificate "c.pem"\n}}\n', 7,
     "not an absolute path"),
    (AUTH + f'domain d {{\n{KEY}\ndomain certificate "/k"\ndomain chain certificate "/k"\n}}\n',
     8, "domain chain file already used"),
    (AUTH + f'domain d {{\n{KEY}\n{CERT}\ndomain chain certificate "/a"\n'
     'domain chain certificate "/b"\n}}\n', 9, "duplicate chain"),
    (AUTH + f'domain d {{\n{KEY}\ndomain full chain certificate "/a"\n'
     'domain full chain certificate "/b"\n}}\n', 8, "duplicate full chain"),
    (AUTH + f'domain d {{\n{KEY}\n{CERT}\ndomain full chain certificate "/etc/ssl/example.com.crt"'
     "\n}}\n", 8, "domain full chain file already used"),
    (AUTH + f'domain d {{\n{KEY}\n{CERT}\n}}\ndomain e {{\n{KEY}\n'
     'domain certificate "/x"\n}}\n', 10, "domain key file already used"),
    (AUTH + f'domain d {{\n{KEY}\ndomain certificate "/etc/ssl/example.com.crt"\n}}\n'
     f'domain e {{\ndomain key "/k2"\n{CERT}\n}}\n', 11, "domain cert file already used"),
    (AUTH + f"domain d {{\n{KEY}\n{CERT}\nsign with le\nsign with le\n}}\n", 9,
     "duplicate sign with"),
    (AUTH + f"domain d {{\n{KEY}\n{CERT}\nsign with nobody\n}}\n", 8,
     "sign with: unknown authority"),
    (AUTH + f'domain d {{\n{KEY}\n{CERT}\nchallengedir "/a"\nchallengedir "/b"\n}}\n', 9,
     "duplicate challengedir"),
    (AUTH + f"domain d {{\n{KEY}\n{CERT}\nalternative names {{ ok.test, bad/name }}\n}}\n", 8,
     "bad domain syntax"),
    ("authority x {\n\tapi url u\n\tbogus\n\taccount key k\n}\n", 3,
     'syntax error: unexpected "bogus"'),
    ("domain = 1\n", 1, 'syntax error: cannot use keyword "domain" as a macro name'),
    ("authority x {\n\tapi url $nope\n\taccount key k\n}\n", 2, "macro 'nope' not defined"),
])
def test_errors(text, line, message):
    lines = errors(text)
    assert lines[0] == f"{NAME}:{line}: {message}", lines


def test_secret_key_file(tmp_path):
    key = tmp_path / "d.key"
    key.write_text("x")
    os.chmod(key, 0o640)
    error_at(AUTH + f'domain d {{\ndomain key "{key}"\n{CERT}\n}}\n', 6,
             f"{key}: group read/writable or world read/writable")
    os.chmod(key, 0o600)
    assert domain(f'domain key "{key}"\n{CERT}').key == str(key)


def test_errors_are_collected():
    lines = errors("authority x {\n}\nauthority y {\n\tapi url u\n}\n")
    assert lines == [f"{NAME}:2: authority x: no api URL specified",
                     f"{NAME}:5: authority y: no account key file specified"]


def test_format_config_round_trip():
    """-nv prints the file in a form that parses back to the same values."""
    import dataclasses
    text = AUTH + f"domain d {{\nalternative names {{ a.test b.test }}\n{KEY} ecdsa\n{CERT}\n}}\n"
    conf = load(text)
    again = load(acme_conf.format_config(conf))
    def strip(items):
        return [dataclasses.replace(i, where="") for i in items]
    assert strip(again.authorities) == strip(conf.authorities)
    assert strip(again.domains) == strip(conf.domains)


def test_sample_config():
    """conf/acme-client.conf parses (and `make configtest` checks it)."""
    from tests.conftest import REPO
    conf = acme_conf.load(str(REPO / "conf" / "acme-client.conf"))
    dom = conf.domain("example.com")
    assert dom.names == ("example.com", "www.example.com")
    assert conf.authority_for(dom).name == "letsencrypt"
