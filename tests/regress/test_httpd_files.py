"""httpd static files: content, headers, index/auto index, redirects,
conditional and range requests, media types, gzip-static, error pages."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import time
from email.utils import formatdate, parsedate_to_datetime

import pytest

from tests.regress.httpd_helpers import Conn, module_site, site_factory  # noqa: F401

IMF_DATE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
                      r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
                      r"\d{2}:\d{2}:\d{2} GMT$")
MTIME = 1_700_000_000                       # Tue, 14 Nov 2023 22:13:20 GMT
BIG = bytes(range(256)) * 1024              # 256 KiB: sent with sendfile
TEXT = b"0123456789abcdefghijklmnopqrstuvwxyz\n"   # 37 bytes

FILES_CONF = """
types {
    text/css css
    text/html html
    text/plain txt
    image/svg+xml svg
    application/x-foo foo fooo ;
    include "{dir}/mime.types"
}
default type text/x-unknown
server "files" {
    listen on 127.0.0.1 port {port}
    root "/htdocs"
    location "/auto/*" { directory auto index }
    location "/noindex*" { directory no index }
    location "/custom/*" { directory index "main.html" }
    location "/gz/*" { gzip-static }
    location "/typed/*" { default type "application/x-typed" }
}
"""


def _setup_files(site) -> None:
    h = site.htdocs
    (site.dir / "mime.types").write_text(
        "# comment line\n"
        "application/x-included    inc incl\n"
        "text/x-later              foo\n")
    (h / "index.html").write_text("<p>root index</p>\n")
    (h / "text.txt").write_bytes(TEXT)
    (h / "big.bin").write_bytes(BIG)
    (h / "style.css").write_text("p{}")
    (h / "pic.svg").write_text("<svg/>")
    (h / "x.foo").write_text("foo")
    (h / "x.FOOO").write_text("fooo")
    (h / "x.inc").write_text("inc")
    (h / "noext").write_text("noext")
    (h / "x.unknownext").write_text("?")
    (h / ".hidden").write_text("dotfile")
    (h / "a b&c.txt").write_text("spaces")
    os.utime(h / "text.txt", (MTIME, MTIME))
    for d in ("sub", "empty", "auto/dir1", "noindex", "custom", "gz", "typed"):
        (h / d).mkdir(parents=True, exist_ok=True)
    (h / "sub/index.html").write_text("sub index\n")
    (h / "noindex/index.html").write_text("never served\n")
    (h / "noindex/file.txt").write_text("noindex file\n")
    (h / "custom/main.html").write_text("custom main\n")
    (h / "custom/index.html").write_text("not the custom index\n")
    (h / "auto/b.txt").write_bytes(b"x" * 4096)
    (h / "auto/a.txt").write_text("a")
    (h / "auto/.secret").write_text("hidden")
    (h / "auto/c:d.txt").write_text("colon")
    (h / "typed/thing").write_text("typed")
    (h / "typed/page.html").write_text("<p>typed</p>")
    # gzip-static: fresh .gz, stale .gz, no .gz
    (h / "gz/page.html").write_text("<p>plain</p>\n")
    (h / "gz/page.html.gz").write_bytes(gzip.compress(b"<p>zipped</p>\n"))
    (h / "gz/stale.html").write_text("<p>stale plain</p>\n")
    (h / "gz/stale.html.gz").write_bytes(gzip.compress(b"<p>stale zipped</p>\n"))
    os.utime(h / "gz/stale.html.gz", (MTIME, MTIME))
    (h / "gz/plain.html").write_text("<p>only plain</p>\n")
    os.mkfifo(h / "fifo")
    os.symlink("text.txt", h / "link.txt")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    yield from module_site(tmp_path_factory, FILES_CONF, setup=_setup_files)


# -- plain files --------------------------------------------------------------

def test_get_file_body_and_headers(files):
    r = files.get("/text.txt")
    assert (r.version, r.status, r.reason) == ("HTTP/1.1", 200, "OK")
    assert r.body == TEXT
    assert r.header("Content-Type") == "text/plain"          # no charset
    assert r.header("Content-Length") == str(len(TEXT))
    assert r.header("Server") == "OpenBSD httpd"
    assert r.header("Last-Modified") == formatdate(MTIME, usegmt=True)
    assert IMF_DATE.match(r.header("Date"))
    assert abs(parsedate_to_datetime(r.header("Date")).timestamp() - time.time()) < 300
    # no extras OpenBSD does not send
    for name in ("keep-alive", "accept-ranges", "etag", "vary", "transfer-encoding"):
        assert name not in r.names()


def test_keep_alive_header_on_persistent_response(files):
    r = files.get("/text.txt", close=False)
    assert r.header("Connection") == "keep-alive"
    r = files.get("/text.txt", close=True)
    assert r.header("Connection") == "close"


def test_status_line_echoes_http10(files):
    r = files.get("/text.txt", version="HTTP/1.0", host=None)
    assert r.version == "HTTP/1.0" and r.status == 200 and r.body == TEXT


def test_head_has_headers_but_no_body(files):
    with Conn(files.port) as c:
        c.send(b"HEAD /text.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        r = c.response("HEAD")
        assert r.status == 200
        assert r.header("Content-Length") == str(len(TEXT))
        assert r.header("Content-Type") == "text/plain"
        # the next response starts right after the head: no body was sent
        c.send(b"GET /text.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r2 = c.response()
        assert r2.status == 200 and r2.body == TEXT


def test_large_file_is_sent_whole(files):
    r = files.get("/big.bin")
    assert r.status == 200
    assert r.header("Content-Length") == str(len(BIG))
    assert r.body == BIG
    assert r.header("Content-Type") == "text/x-unknown"


def test_symlink_followed_and_dotfile_served(files):
    assert files.get("/link.txt").body == TEXT
    r = files.get("/.hidden")
    assert r.status == 200 and r.body == b"dotfile"


def test_percent_encoded_name(files):
    r = files.get("/a%20b%26c.txt")
    assert r.status == 200 and r.body == b"spaces"


# -- errors -------------------------------------------------------------------

def test_missing_file_404(files):
    r = files.get("/does-not-exist.html")
    assert r.status == 404
    r = files.get("/text.txt/below-a-file")                  # ENOTDIR
    assert r.status == 404


def test_special_file_403(files):
    r = files.get("/fifo")
    assert r.status == 403


def test_post_to_file_405(files):
    r = files.get("/text.txt", method="POST", body=b"a=b")
    assert r.status == 405
    assert r.reason == "Method Not Allowed"
    for m in ("PUT", "DELETE", "OPTIONS", "PROPFIND"):
        assert files.get("/text.txt", method=m).status == 405, m
    # the file is looked up first: missing stays 404, a directory 301/405
    assert files.get("/missing.txt", method="POST").status == 404
    assert files.get("/sub", method="POST").status == 301
    assert files.get("/sub/", method="POST").status == 405


def test_error_page_format(files):
    path = "/no-such-<script>-page"
    r = files.get(path.replace("<", "%3C").replace(">", "%3E"), close=False)
    assert r.version == "HTTP/1.0"                       # always, whatever was asked
    assert (r.status, r.reason) == (404, "Not Found")
    assert r.header("Connection") == "close"             # even without Connection: close
    assert r.header("Content-Type") == "text/html"
    assert r.header("Content-Length") == str(len(r.body))
    assert r.header("Server") == "OpenBSD httpd"
    assert IMF_DATE.match(r.header("Date"))
    body = r.body.decode()
    assert body.startswith("<!DOCTYPE html>")
    assert "<title>404 Not Found</title>" in body
    assert "<h1>404 Not Found</h1>" in body
    assert "<address>OpenBSD httpd</address>" in body
    assert "script" not in body and "no-such" not in body    # path never echoed


def test_error_page_closes_connection(files):
    with Conn(files.port) as c:
        c.send(b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n")
        r = c.response()
        assert r.status == 404
        assert c.read_all() == b""
        assert c.eof


def test_head_error_has_no_body(files):
    with Conn(files.port) as c:
        c.send(b"HEAD /missing HTTP/1.1\r\nHost: x\r\n\r\n")
        r = c.response("HEAD")
        assert r.status == 404
        assert c.read_all() == b""


# -- directories --------------------------------------------------------------

def test_root_index(files):
    r = files.get("/")
    assert r.status == 200 and r.body == b"<p>root index</p>\n"
    assert r.header("Content-Type") == "text/html"


def test_subdir_index(files):
    assert files.get("/sub/").body == b"sub index\n"
    assert files.get("/sub//").body == b"sub index\n"


def test_directory_without_slash_redirects(files):
    r = files.get("/sub")
    assert r.status == 301
    assert r.version == "HTTP/1.0"
    assert r.header("Location") == "/sub/"               # relative, newest OpenBSD
    assert r.header("Connection") == "close"


def test_directory_redirect_location_is_url_encoded(files):
    (files.htdocs / "sp ace").mkdir(exist_ok=True)
    r = files.get("/sp%20ace")
    assert r.status == 301
    assert r.header("Location") == "/sp%20ace/"


def test_directory_redirect_with_query(files):
    # OpenBSD builds the Location from the path only (server_file_access)
    r = files.get("/sub?a=1")
    assert r.status == 301
    assert r.header("Location").startswith("/sub/")


def test_directory_without_index_is_403(files):
    r = files.get("/empty/")
    assert r.status == 403


def test_custom_index(files):
    r = files.get("/custom/")
    assert r.status == 200 and r.body == b"custom main\n"


def test_no_index_403_even_with_index_file(files):
    assert files.get("/noindex/").status == 403
    assert files.get("/noindex").status == 403        # no redirect either
    r = files.get("/noindex/file.txt")
    assert r.status == 200 and r.body == b"noindex file\n"


def test_auto_index_listing(files):
    r = files.get("/auto/")
    assert r.status == 200
    assert r.header("Content-Type") == "text/html"
    page = r.body.decode()
    assert "Index of /auto/" in page
    assert "<table" in page
    hrefs = re.findall(r'href="([^"]+)"', page)
    assert hrefs == ["../", "a.txt", "b.txt", "./c:d.txt", "dir1/"]
    assert ".secret" not in page
    # directories end in '/' with size '-'; files have scaled sizes + exact title
    assert re.search(r'>dir1/</a>', page)
    assert re.search(r'title="4096"[^>]*>4\.0K<', page)
    assert re.search(r"\d{2}-[A-Z][a-z]{2}-\d{4} \d{2}:\d{2}", page)


def test_auto_index_head(files):
    with Conn(files.port) as c:
        c.send(b"HEAD /auto/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r = c.response("HEAD")
        assert r.status == 200 and int(r.header("Content-Length")) > 0
        assert c.read_all() == b""


def test_no_escape_above_root(files):
    for path in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                 "/sub/../../etc/passwd", "/..%2f..%2fetc/passwd"):
        r = files.get(path)
        assert r.status in (400, 404), path
        assert b"root:" not in r.body


def test_dot_segments_resolved(files):
    assert files.get("/sub/../text.txt").body == TEXT
    assert files.get("/./sub/./index.html").body == b"sub index\n"
    assert files.get("//text.txt").body == TEXT
    assert files.get("/%2e%2e/text.txt").body == TEXT       # '..' at '/' stays at '/'


# -- conditional GET ------------------------------------------------------------

def test_if_modified_since_not_modified(files):
    with Conn(files.port) as c:
        c.send(b"GET /text.txt HTTP/1.1\r\nHost: x\r\n"
               b"If-Modified-Since: " + formatdate(MTIME, usegmt=True).encode() + b"\r\n\r\n")
        r = c.response()
        assert r.status == 304
        assert r.version == "HTTP/1.1"
        assert r.header("Content-Length") is None
        assert r.header("Last-Modified") == formatdate(MTIME, usegmt=True)
        # nothing follows the head: the next request is answered normally
        c.send(b"GET /text.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r2 = c.response()
        assert r2.status == 200 and r2.body == TEXT


def test_if_modified_since_later_date(files):
    r = files.get("/text.txt", headers={"If-Modified-Since": formatdate(MTIME + 3600, usegmt=True)})
    assert r.status == 304 and r.body == b""


def test_if_modified_since_older_date(files):
    r = files.get("/text.txt", headers={"If-Modified-Since": formatdate(MTIME - 1, usegmt=True)})
    assert r.status == 200 and r.body == TEXT


def test_if_modified_since_garbage_ignored(files):
    r = files.get("/text.txt", headers={"If-Modified-Since": "yesterday"})
    assert r.status == 200 and r.body == TEXT


# -- ranges -------------------------------------------------------------------

def test_range_single(files):
    r = files.get("/text.txt", headers={"Range": "bytes=0-9"})
    assert r.status == 206 and r.reason == "Partial Content"
    assert r.body == TEXT[0:10]
    assert r.header("Content-Range") == f"bytes 0-9/{len(TEXT)}"
    assert r.header("Content-Length") == "10"
    assert r.header("Content-Type") == "text/plain"


def test_range_suffix_and_open(files):
    r = files.get("/text.txt", headers={"Range": "bytes=-5"})
    assert r.status == 206 and r.body == TEXT[-5:]
    assert r.header("Content-Range") == f"bytes {len(TEXT) - 5}-{len(TEXT) - 1}/{len(TEXT)}"
    r = files.get("/text.txt", headers={"Range": "bytes=30-"})
    assert r.status == 206 and r.body == TEXT[30:]
    assert r.header("Content-Range") == f"bytes 30-{len(TEXT) - 1}/{len(TEXT)}"


def test_range_end_clamped(files):
    r = files.get("/text.txt", headers={"Range": "bytes=30-1000"})
    assert r.status == 206 and r.body == TEXT[30:]
    assert r.header("Content-Range") == f"bytes 30-{len(TEXT) - 1}/{len(TEXT)}"


def test_range_large_file(files):
    r = files.get("/big.bin", headers={"Range": "bytes=100000-199999"})
    assert r.status == 206 and r.body == BIG[100000:200000]


def _parts(resp):
    ctype = resp.header("Content-Type")
    m = re.fullmatch(r"multipart/byteranges; boundary=(\d+)", ctype)
    assert m, ctype
    b = m.group(1).encode()
    body = resp.body
    assert body.endswith(b"\r\n--" + b + b"--\r\n")
    chunks = body[:-len(b"\r\n--" + b + b"--\r\n")].split(b"\r\n--" + b + b"\r\n")
    assert chunks[0] == b""
    out = []
    for ch in chunks[1:]:
        head, _, data = ch.partition(b"\r\n\r\n")
        hdrs = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append((hdrs, data))
    return out


def test_range_multipart(files):
    r = files.get("/text.txt", headers={"Range": "bytes=0-1,5-6,-2"})
    assert r.status == 206
    assert r.header("Content-Length") == str(len(r.body))
    parts = _parts(r)
    assert [p[1] for p in parts] == [TEXT[0:2], TEXT[5:7], TEXT[-2:]]
    n = len(TEXT)
    assert [p[0]["Content-Range"] for p in parts] == [
        f"bytes 0-1/{n}", "bytes 5-6/" + str(n), f"bytes {n - 2}-{n - 1}/{n}"]
    assert all(p[0]["Content-Type"] == "text/plain" for p in parts)


def test_range_multipart_large_file(files):
    r = files.get("/big.bin", headers={"Range": "bytes=0-99,200000-200099"})
    assert r.status == 206
    assert [p[1] for p in _parts(r)] == [BIG[0:100], BIG[200000:200100]]


def test_range_too_many_416(files):
    r = files.get("/text.txt", headers={"Range": "bytes=0-1,2-3,4-5,6-7,8-9"})
    assert r.status == 416
    assert r.header("Content-Range") == f"bytes */{len(TEXT)}"


def test_range_unsatisfiable_416(files):
    r = files.get("/text.txt", headers={"Range": "bytes=999999-"})
    assert (r.status, r.reason) == (416, "Range Not Satisfiable")
    assert r.version == "HTTP/1.0"
    assert r.header("Content-Range") == f"bytes */{len(TEXT)}"


def test_range_ignored_for_head(files):
    with Conn(files.port) as c:
        c.send(b"HEAD /text.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\n"
               b"Connection: close\r\n\r\n")
        r = c.response("HEAD")
        assert r.status == 200
        assert r.header("Content-Length") == str(len(TEXT))


def test_range_bad_unit_416(files):
    r = files.get("/text.txt", headers={"Range": "lines=0-3"})
    assert r.status == 416


# -- media types ----------------------------------------------------------------

@pytest.mark.parametrize("path,ctype", [
    ("/style.css", "text/css"),
    ("/pic.svg", "image/svg+xml"),
    ("/x.foo", "text/x-later"),               # the included file's later line wins
    ("/x.FOOO", "application/x-foo"),         # extension lookup is case-insensitive
    ("/x.inc", "application/x-included"),     # from the included mime.types
    ("/noext", "text/x-unknown"),             # global default type
    ("/x.unknownext", "text/x-unknown"),
    ("/typed/thing", "application/x-typed"),  # per-location default type
    ("/typed/page.html", "text/html"),
])
def test_types(files, path, ctype):
    r = files.get(path)
    assert r.status == 200
    assert r.header("Content-Type") == ctype


def test_builtin_types(site_factory):
    site = site_factory('server "t" {\n listen on 127.0.0.1 port {port}\n}\n',
                        setup=lambda s: [(s.htdocs / n).write_text(n) for n in
                                         ("a.svg", "a.htm", "a.js", "a.jpg", "a.css", "a.PNG")])
    assert site.get("/a.svg").header("Content-Type") == "image/svg+xml"
    assert site.get("/a.htm").header("Content-Type") == "application/octet-stream"
    assert site.get("/a.js").header("Content-Type") == "application/javascript"
    assert site.get("/a.jpg").header("Content-Type") == "image/jpeg"
    assert site.get("/a.css").header("Content-Type") == "text/css"
    assert site.get("/a.PNG").header("Content-Type") == "image/png"


# -- gzip-static ----------------------------------------------------------------

def test_gzip_static_served(files):
    r = files.get("/gz/page.html", headers={"Accept-Encoding": "deflate, gzip"})
    assert r.status == 200
    assert r.header("Content-Encoding") == "gzip"
    assert gzip.decompress(r.body) == b"<p>zipped</p>\n"
    assert r.header("Content-Length") == str(len(r.body))
    assert r.header("Content-Type") == "text/html"
    assert r.header("Vary") is None


def test_gzip_static_needs_accept_encoding(files):
    r = files.get("/gz/page.html")
    assert r.header("Content-Encoding") is None and r.body == b"<p>plain</p>\n"
    r = files.get("/gz/page.html", headers={"Accept-Encoding": "br"})
    assert r.header("Content-Encoding") is None and r.body == b"<p>plain</p>\n"


def test_gzip_static_stale_or_missing_gz(files):
    r = files.get("/gz/stale.html", headers={"Accept-Encoding": "gzip"})
    assert r.header("Content-Encoding") is None and r.body == b"<p>stale plain</p>\n"
    r = files.get("/gz/plain.html", headers={"Accept-Encoding": "gzip"})
    assert r.header("Content-Encoding") is None and r.body == b"<p>only plain</p>\n"


def test_gzip_static_only_where_enabled(files):
    (files.htdocs / "sub/z.html").write_text("z")
    (files.htdocs / "sub/z.html.gz").write_bytes(gzip.compress(b"zz"))
    r = files.get("/sub/z.html", headers={"Accept-Encoding": "gzip"})
    assert r.header("Content-Encoding") is None and r.body == b"z"


# -- the same through common clients ------------------------------------------------

def test_httpx_client_keep_alive(files):
    import httpx
    with httpx.Client(base_url=f"http://127.0.0.1:{files.port}") as client:
        r1 = client.get("/text.txt")
        r2 = client.get("/sub/")
        r3 = client.get("/text.txt", headers={"Range": "bytes=2-4"})
        r4 = client.get("/sub", follow_redirects=True)
    assert r1.status_code == 200 and r1.content == TEXT
    assert r2.status_code == 200 and r2.content == b"sub index\n"
    assert r3.status_code == 206 and r3.content == TEXT[2:5]
    assert r4.status_code == 200 and r4.content == b"sub index\n"
    assert r4.url.path == "/sub/"


def _curl(*args: str) -> subprocess.CompletedProcess:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl not installed")
    return subprocess.run([curl, "-sS", "--max-time", "20", *args], capture_output=True,
                          timeout=30)


def test_curl_get_head_range(files):
    base = f"http://127.0.0.1:{files.port}"
    r = _curl(f"{base}/text.txt")
    assert r.returncode == 0 and r.stdout == TEXT
    r = _curl("-I", f"{base}/text.txt")
    head = r.stdout.decode()
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert f"Content-Length: {len(TEXT)}\r\n" in head
    r = _curl("-r", "0-3", f"{base}/text.txt")
    assert r.stdout == TEXT[:4]
    r = _curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/nope")
    assert r.stdout == b"404"
    r = _curl("-L", f"{base}/sub")
    assert r.stdout == b"sub index\n"
