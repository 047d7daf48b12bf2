"""Unit tests for httpd.server_file: serve() on a temporary document root."""

from __future__ import annotations

import errno
import os
import re
import time
from email.utils import formatdate

import pytest

from engine.http1 import HttpError
from httpd import server_file as sf
from httpd.config import HttpdConfig, ServerConfig
from httpd.server_file import FileResponse, InternalRedirect, Redirect

GCONF = HttpdConfig(path="test.conf")
MTIME = 1_700_000_000           # Tue, 14 Nov 2023 22:13:20 GMT
BIG = sf.SMALL_FILE + 1000


def conf(root, **kw) -> ServerConfig:
    return ServerConfig(id=1, name="test", where="test.conf:1", root=str(root), **kw)


def serve(c: ServerConfig, path: str, method: str = "GET", headers=None,
          query=None, gconf=GCONF, **kw):
    resp = sf.serve(c, gconf, "", path, query, method, headers or {}, **kw)
    if isinstance(resp, FileResponse) and resp.fd is not None:
        # the caller owns the fd; tests read what it points at and close it
        resp.body = b"".join(
            s if isinstance(s, bytes) else os.pread(resp.fd, s[1], s[0])
            for s in resp.segments)
        os.close(resp.fd)
    elif isinstance(resp, FileResponse):
        assert all(isinstance(s, bytes) for s in resp.segments)
        resp.body = b"".join(resp.segments)
    return resp


def status(c, path, **kw) -> int:
    with pytest.raises(HttpError) as ei:
        serve(c, path, **kw)
    return ei.value.status


def hdr(resp, name):
    vals = [v for k, v in resp.headers if k.lower() == name.lower()]
    assert len(vals) <= 1
    return vals[0] if vals else None


def put(path, data: bytes, mtime=MTIME):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "htdocs"
    d.mkdir()
    return d


# -- helpers of the module ---------------------------------------------------

@pytest.mark.parametrize("code,expect", [
    (errno.ENOENT, 404), (errno.ENOTDIR, 404), (errno.EACCES, 403),
    (errno.EPERM, 403), (errno.ELOOP, 403), (errno.EIO, 500),
    (errno.ENAMETOOLONG, 500),
])
def test_status_for(code, expect):
    assert sf.status_for(OSError(code, os.strerror(code))) == expect


def test_url_encode():
    assert sf.url_encode('/a b#c%d?e"f&g<h>i') == "/a%20b%23c%25d%3Fe%22f%26g%3Ch>i"
    assert sf.url_encode("\x01\x1f\x7f") == "%01%1F%7F"
    assert sf.url_encode("é") == "%C3%A9"
    assert sf.url_encode("a:b/c'd=e+f;g") == "a:b/c'd=e+f;g"
    assert sf.url_encode(os.fsdecode(b"\xff")) == "%FF"


@pytest.mark.parametrize("path,expect", [
    ("/a/style.css", "text/css"),
    ("/a/PAGE.HTML", "text/html"),
    ("/a/pic.JpG", "image/jpeg"),
    ("/a/x.svg", "image/svg+xml"),
    ("/a/x.htm", "application/octet-stream"),     # htm is not built in
    ("/a/x.tar.gz", "application/octet-stream"),
    ("/a/noext", "application/octet-stream"),
    ("/a/trailingdot.", "application/octet-stream"),
    ("/a.html/file", "application/octet-stream"),  # only the last component
    ("/a/html", "text/html"),                      # no dot: whole name (OpenBSD)
    ("/a/.css", "text/css"),
])
def test_media_type_builtin(root, path, expect):
    assert sf.media_type(GCONF, conf(root), path) == expect


def test_media_type_defaults(root):
    g = HttpdConfig(path="t", default_type=("text", "plain"),
                    media_types={"foo": "application/x-foo"})
    assert sf.media_type(g, conf(root), "/x.FOO") == "application/x-foo"
    assert sf.media_type(g, conf(root), "/x.css") == "text/plain"   # table replaced
    c = conf(root, default_type=("application", "x-local"))
    assert sf.media_type(g, c, "/x.bin") == "application/x-local"


@pytest.mark.parametrize("n,expect", [
    (0, "0B"), (1, "1B"), (999, "999B"), (1023, "1023B"), (1024, "1.0K"),
    (1536, "1.5K"), (4096, "4.0K"), (5000, "4.9K"), (102400, "100K"),
    (1048575, "1024K"), (1048576, "1.0M"), (10 * 2**20 - 1, "10.0M"),
    (3 * 2**30, "3.0G"),
])
def test_fmt_scaled(n, expect):
    assert sf.fmt_scaled(n) == expect


@pytest.mark.parametrize("value,expect", [
    ("bytes=0-9", [(0, 9)]),
    ("bytes=-5", [(95, 99)]),
    ("bytes=90-", [(90, 99)]),
    ("bytes=0-999", [(0, 99)]),
    ("bytes=0-0,-1", [(0, 0), (99, 99)]),
    ("bytes=0-1, 4-5", [(0, 1), (4, 5)]),         # strtonum skips leading space
    ("bytes=0-1 ", []),                            # but not trailing garbage
    ("bytes=5-4", []),
    ("bytes=100-", []),
    ("bytes=-0", []),
    ("bytes=-", []),
    ("bytes=", []),
    ("bytes=abc", []),
    ("bytes=1-2-3", []),
    ("bytes=+1-2", [(1, 2)]),
    ("bytes=-200", [(1, 99)]),                     # OpenBSD clamps the suffix first
    ("bytes=0-1,x,4-5", [(0, 1)]),                 # an invalid spec ends parsing
    ("bytes=0-1,4-5,x", [(0, 1), (4, 5)]),
    ("bytes=0-1,1-2,2-3,3-4", [(0, 1), (1, 2), (2, 3), (3, 4)]),
    ("bytes=0-1,1-2,2-3,3-4,4-5", None),           # more than 4
    ("bytes=0-1,1-2,2-3,3-4,", None),
    ("items=0-1", None),
    ("Bytes=0-1", None),
    ("0-1", None),
])
def test_parse_ranges(value, expect):
    assert sf.parse_ranges(value, 100) == expect


# -- mapping the path ----------------------------------------------------------

def test_plain_file(root):
    put(root / "a.txt", b"hello")
    r = serve(conf(root), "/a.txt")
    assert r.status == 200 and r.body == b"hello" and r.length == 5
    assert r.fd is None and r.segments == [b"hello"]
    assert hdr(r, "Content-Type") == "text/plain"
    assert hdr(r, "Last-Modified") == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert {k for k, _ in r.headers} == {"Content-Type", "Last-Modified"}


def test_empty_file(root):
    put(root / "empty.txt", b"")
    r = serve(conf(root), "/empty.txt")
    assert r.status == 200 and r.length == 0 and r.segments == []


def test_prefix_is_prepended(tmp_path):
    put(tmp_path / "chroot/htdocs/x.txt", b"x")
    c = ServerConfig(id=1, name="t", where="t", root="/htdocs")
    r = sf.serve(c, GCONF, str(tmp_path / "chroot"), "/x.txt", None, "GET", {})
    assert r.segments == [b"x"]


def test_last_modified_not_in_future(root):
    future = int(time.time()) + 86400 * 365
    put(root / "f.txt", b"x", mtime=future)
    before = int(time.time())
    r = serve(conf(root), "/f.txt")
    lm = hdr(r, "Last-Modified")
    assert lm in {formatdate(t, usegmt=True) for t in range(before, int(time.time()) + 1)}


def test_big_file_gives_slices(root):
    data = os.urandom(BIG)
    put(root / "big.bin", data)
    r = serve(conf(root), "/big.bin")
    assert r.status == 200 and r.length == BIG
    assert r.segments == [(0, BIG)] and r.body == data
    assert hdr(r, "Content-Type") == "application/octet-stream"


def test_head(root):
    put(root / "a.txt", b"hello")
    put(root / "big.bin", b"x" * BIG)
    for name, size in (("/a.txt", 5), ("/big.bin", BIG)):
        r = serve(conf(root), name, "HEAD")
        assert r.status == 200 and r.length == size
        assert r.segments == [] and r.fd is None


@pytest.mark.parametrize("strip,path,expect", [
    (1, "/a/b/file.txt", b"b-file"),
    (2, "/a/b/file.txt", b"top-file"),
    (1, "/zzz/file.txt", b"top-file"),
])
def test_strip(root, strip, path, expect):
    put(root / "b/file.txt", b"b-file")
    put(root / "file.txt", b"top-file")
    assert serve(conf(root, strip=strip), path).body == expect


def test_strip_everything_maps_to_root(root):
    # server_root_strip leaves "" -> the root itself, which lacks its slash
    c = conf(root, strip=3)
    assert serve(c, "/a/b") == Redirect("/a/b/")
    assert serve(conf(root, strip=1), "/a/") == InternalRedirect("/a/index.html")


def test_path_too_long(root):
    assert status(conf(root), "/" + "x" * 1100) == 500


# -- errors --------------------------------------------------------------------

def test_missing(root):
    assert status(conf(root), "/nope.txt") == 404
    put(root / "file.txt", b"x")
    assert status(conf(root), "/file.txt/below") == 404      # ENOTDIR


def test_special_file_is_forbidden(root):
    os.mkfifo(root / "fifo")
    assert status(conf(root), "/fifo") == 403                 # and does not block


def test_symlink_loop_is_forbidden(root):
    os.symlink("loop", root / "loop")
    assert status(conf(root), "/loop") == 403


def test_symlinks_are_followed(root):
    put(root / "real.txt", b"real")
    os.symlink("real.txt", root / "link.txt")
    assert serve(conf(root), "/link.txt").body == b"real"


def test_unreadable_is_forbidden(root):
    p = put(root / "secret.txt", b"x")
    p.chmod(0)
    if os.geteuid() != 0:
        assert status(conf(root), "/secret.txt") == 403
        return
    # Root reads mode 000 files: judge as an unprivileged user, in a child
    # that drops to nobody (as httpd's chrooted workers run).
    import pwd
    nobody = pwd.getpwnam("nobody")
    os.chmod(root, 0o755)
    for parent in root.parents:
        if parent == parent.parent:
            break
        if not os.stat(parent).st_mode & 0o001:
            os.chmod(parent, os.stat(parent).st_mode | 0o001)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            os.write(w, str(status(conf(root), "/secret.txt")).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 16)
    os.waitpid(pid, 0)
    os.close(r)
    assert got == b"403"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_method_not_allowed(root, method):
    put(root / "a.txt", b"x")
    assert status(conf(root), "/a.txt", method=method) == 405
    assert status(conf(root), "/a.txt", method=method,
                  headers={"range": "bytes=0-0"}) == 405


def test_method_checked_after_open(root):
    # OpenBSD opens first: a missing file is 404, a directory redirects
    (root / "dir").mkdir()
    assert status(conf(root), "/nope", method="POST") == 404
    assert serve(conf(root), "/dir", "POST") == Redirect("/dir/")


# -- directories -----------------------------------------------------------

def test_directory_redirect(root):
    (root / "dir").mkdir()
    assert serve(conf(root), "/dir") == Redirect("/dir/")


def test_directory_redirect_encodes_and_drops_query(root):
    (root / 'a b#c?"&<>').mkdir()
    r = serve(conf(root), '/a b#c?"&<>', query="x=1")
    assert r == Redirect("/a%20b%23c%3F%22%26%3C>/")


def test_directory_index_redirect(root):
    (root / "dir").mkdir()
    assert serve(conf(root), "/dir/") == InternalRedirect("/dir/index.html")
    assert serve(conf(root), "/") == InternalRedirect("/index.html")
    c = conf(root, index="default.htm")
    assert serve(c, "/dir/") == InternalRedirect("/dir/default.htm")


def test_no_index_is_forbidden(root):
    (root / "dir").mkdir()
    for c in (conf(root, index=None), conf(root, index=None, auto_index=True)):
        assert status(c, "/dir/") == 403
        assert status(c, "/dir") == 403          # checked before the redirect
        assert status(c, "/") == 403


def test_index_file_served(root):
    put(root / "dir/index.html", b"<p>hi</p>")
    r = serve(conf(root), "/dir/index.html", index_dir=True)
    assert r.status == 200 and r.body == b"<p>hi</p>"
    assert hdr(r, "Content-Type") == "text/html"


def test_missing_index_without_auto_index(root):
    (root / "dir").mkdir()
    assert status(conf(root), "/dir/index.html", index_dir=True) == 403


def test_missing_index_with_auto_index(root):
    put(root / "dir/file.txt", b"x")
    r = serve(conf(root, auto_index=True), "/dir/index.html", index_dir=True)
    assert r.status == 200 and b"Index of /dir/" in r.body
    assert b'href="file.txt"' in r.body


def test_index_is_a_directory(root):
    (root / "dir/index.html").mkdir(parents=True)
    assert status(conf(root, auto_index=True), "/dir/index.html",
                  index_dir=True) == 500


def test_alias_directory(root):
    (root / "dir").mkdir()
    assert status(conf(root), "/dir", alias=True) == 500
    assert status(conf(root), "/dir/", alias=True) == 500
    assert status(conf(root), "/nope", alias=True) == 404


def test_auto_index_post(root):
    (root / "dir").mkdir()
    c = conf(root, auto_index=True)
    assert status(c, "/dir/index.html", index_dir=True, method="POST") == 405
    assert status(conf(root), "/dir/index.html", index_dir=True,
                  method="POST") == 403


# -- auto index page -------------------------------------------------------

ROW = re.compile(
    r'<tr( class="dir")?><td><a href="([^"]*)">([^<]*)</a></td>\n'
    r'    <td data-o="(-?\d+)">(\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d)</td>'
    r'<td( title="(\d+)")?>([^<]*)</td></tr>\n')


def listing(root, path="/", **kw):
    c = conf(root, auto_index=True, **kw)
    r = serve(c, path + "index.html", index_dir=True)
    assert r.status == 200 and r.length == len(r.body)
    return r, r.body.decode("utf-8", "surrogateescape")


def test_auto_index_page(root):
    put(root / "b.txt", b"x" * 4096)
    put(root / "a.txt", b"abc")
    put(root / "Z.txt", b"")
    (root / "sub").mkdir()
    os.utime(root / "sub", (MTIME, MTIME))
    put(root / ".hidden", b"")
    (root / ".git").mkdir()
    os.mkfifo(root / "fifo")
    os.symlink("missing", root / "dangling")
    r, page = listing(root)
    assert page.startswith("<!DOCTYPE html>\n<html lang=\"en\">\n")
    assert "<title>Index of /</title>" in page and "<h1>Index of /</h1>" in page
    assert "<style>" in page and "<script>" in page
    assert '<tr class="sort"><th class="sorted">Name</th>' in page
    assert "<th>Date</th><th>Size</th>" in page
    assert page.endswith("</html>\n")
    rows = ROW.findall(page)
    assert len(rows) == page.count("<tr") - 1          # every entry parsed
    names = [row[2] for row in rows]
    assert names == ["../", "Z.txt", "a.txt", "b.txt", "sub/"]   # byte order
    by = {row[2]: row for row in rows}
    assert by["b.txt"][6:] == ("4096", "4.0K")
    assert by["a.txt"][6:] == ("3", "3B")
    assert by["Z.txt"][6:] == ("0", "0B")
    assert by["sub/"][0] and by["sub/"][1] == "sub/" and by["sub/"][7] == "-"
    assert by["sub/"][5] == "" and by["../"][1] == "../"
    local = time.localtime(MTIME)
    assert by["a.txt"][3] == str(MTIME)
    assert by["a.txt"][4] == time.strftime("%d-%b-%Y %H:%M", local)
    assert "hidden" not in page and ".git" not in page
    assert "fifo" not in page and "dangling" not in page
    assert hdr(r, "Content-Type") == "text/html"


def test_auto_index_escaping(root):
    put(root / "<b>.txt", b"x")
    put(root / "a&b c.txt", b"x")
    put(root / "x:y", b"x")
    (root / "d:1").mkdir()
    put(root / "q\"'.txt", b"x")
    _, page = listing(root)
    assert "<b>" not in page
    assert '<a href="%3Cb>.txt">&lt;b&gt;.txt</a>' in page
    assert '<a href="a%26b%20c.txt">a&amp;b c.txt</a>' in page
    assert '<a href="./x:y">x:y</a>' in page
    assert '<a href="./d:1/">d:1/</a>' in page
    assert "<a href=\"q%22'.txt\">q&#34;&#39;.txt</a>" in page


def test_auto_index_non_utf8_name(root):
    put(root / os.fsdecode(b"caf\xe9.txt"), b"x")
    r, _ = listing(root)
    assert b'<a href="caf%E9.txt">caf\xe9.txt</a>' in r.body


def test_auto_index_subdir_title_and_headers(root):
    (root / "my dir").mkdir()
    put(root / "my dir/x.txt", b"x")
    os.utime(root / "my dir", (MTIME, MTIME))
    r, page = listing(root, "/my dir/")
    assert "<title>Index of /my dir/</title>" in page
    assert hdr(r, "Last-Modified") == formatdate(MTIME, usegmt=True)


def test_auto_index_head(root):
    put(root / "a.txt", b"x")
    c = conf(root, auto_index=True)
    get = serve(c, "/index.html", index_dir=True)
    head = serve(c, "/index.html", "HEAD", index_dir=True)
    assert head.segments == [] and head.length == get.length > 0


def test_auto_index_content_type_from_types(root):
    (root / "d").mkdir()
    g = HttpdConfig(path="t", media_types={"html": "text/x-html"})
    r = serve(conf(root, auto_index=True), "/d/index.html", gconf=g, index_dir=True)
    assert hdr(r, "Content-Type") == "text/x-html"
    g = HttpdConfig(path="t", media_types={"txt": "text/plain"})
    r = serve(conf(root, auto_index=True), "/d/index.html", gconf=g, index_dir=True)
    assert hdr(r, "Content-Type") == "application/octet-stream"


def test_auto_index_with_strip(root):
    put(root / "sub/f.txt", b"x")
    c = conf(root, auto_index=True, strip=1)
    r = serve(c, "/pfx/sub/index.html", index_dir=True)
    page = r.body.decode()
    assert "Index of /pfx/sub/" in page and 'href="f.txt"' in page


# -- conditional GET -------------------------------------------------------

@pytest.mark.parametrize("ims", [
    "Tue, 14 Nov 2023 22:13:20 GMT",            # equal
    "Wed, 15 Nov 2023 00:00:00 GMT",            # newer
    "Tuesday, 14 Nov 2023 22:13:20 GMT",
    "tue, 14 nov 2023 22:13:20 UTC",
    "Tue, 14 Nov 2023 22:13:20 GMT; length=5",  # trailing text is ignored
])
def test_not_modified(root, ims):
    put(root / "a.txt", b"hello")
    for method in ("GET", "HEAD"):
        r = serve(conf(root), "/a.txt", method, {"if-modified-since": ims})
        assert r.status == 304 and r.length == -1 and r.segments == []
        assert r.fd is None
        assert hdr(r, "Last-Modified") == formatdate(MTIME, usegmt=True)
        assert hdr(r, "Content-Type") == "text/plain"


@pytest.mark.parametrize("ims", [
    "Tue, 14 Nov 2023 22:13:19 GMT",            # older
    "garbage",
    "Tue, 14 Nov 2023 22:13:20",                # no zone
    "Tue, 32 Nov 2023 22:13:20 GMT",
    "Tue Nov 14 22:13:20 2023",                 # asctime is not accepted
    "2023-11-14T22:13:20Z",
])
def test_modified(root, ims):
    put(root / "a.txt", b"hello")
    r = serve(conf(root), "/a.txt", headers={"if-modified-since": ims})
    assert r.status == 200 and r.body == b"hello"


def test_range_ignores_if_modified_since(root):
    put(root / "a.txt", b"hello")
    r = serve(conf(root), "/a.txt", headers={
        "if-modified-since": "Wed, 15 Nov 2023 00:00:00 GMT", "range": "bytes=0-1"})
    assert r.status == 206 and r.body == b"he"


# -- ranges ----------------------------------------------------------------

DATA = bytes(range(100))


@pytest.mark.parametrize("spec,start,end", [
    ("bytes=0-9", 0, 9),
    ("bytes=-5", 95, 99),
    ("bytes=5-", 5, 99),
    ("bytes=90-999999", 90, 99),
    ("bytes=50-50", 50, 50),
])
def test_single_range(root, spec, start, end):
    put(root / "d.bin", DATA)
    r = serve(conf(root), "/d.bin", headers={"range": spec})
    assert r.status == 206 and r.body == DATA[start:end + 1]
    assert r.length == end - start + 1
    assert hdr(r, "Content-Range") == f"bytes {start}-{end}/100"
    assert hdr(r, "Content-Type") == "application/octet-stream"
    assert hdr(r, "Last-Modified") == formatdate(MTIME, usegmt=True)


def parse_multipart(resp):
    ctype = hdr(resp, "Content-Type")
    m = re.fullmatch(r"multipart/byteranges; boundary=(\d+)", ctype)
    assert m, ctype
    boundary = m.group(1)
    assert 0 <= int(boundary) < 2**64
    body = resp.body
    assert len(body) == resp.length
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    parts = []
    rest = body[:-len(f"\r\n--{boundary}--\r\n")]
    sep = f"\r\n--{boundary}\r\n".encode()
    assert rest.startswith(sep)
    for chunk in rest.split(sep)[1:]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append((fields, data))
    return parts


def test_multipart_ranges(root):
    put(root / "d.txt", DATA)
    r = serve(conf(root), "/d.txt", headers={"range": "bytes=0-1,-3,10-12,10-11"})
    assert r.status == 206 and hdr(r, "Content-Range") is None
    parts = parse_multipart(r)
    assert [(f["Content-Range"], d) for f, d in parts] == [
        ("bytes 0-1/100", DATA[0:2]), ("bytes 97-99/100", DATA[97:]),
        ("bytes 10-12/100", DATA[10:13]), ("bytes 10-11/100", DATA[10:12])]
    assert all(f["Content-Type"] == "text/plain" for f, _ in parts)


def test_multipart_ranges_big_file(root):
    data = os.urandom(BIG)
    put(root / "big.bin", data)
    r = serve(conf(root), "/big.bin",
              headers={"range": f"bytes=0-99,{BIG - 10}-"})
    assert r.status == 206
    assert [s for s in r.segments if isinstance(s, tuple)] == [(0, 100), (BIG - 10, 10)]
    parts = parse_multipart(r)
    assert [d for _, d in parts] == [data[:100], data[-10:]]


def test_single_range_big_file(root):
    data = os.urandom(BIG)
    put(root / "big.bin", data)
    r = serve(conf(root), "/big.bin", headers={"range": "bytes=1000-1999"})
    assert r.segments == [(1000, 1000)] and r.body == data[1000:2000]


def test_too_many_ranges(root):
    put(root / "d.bin", DATA)
    with pytest.raises(HttpError) as ei:
        serve(conf(root), "/d.bin", headers={"range": "bytes=0-0,1-1,2-2,3-3,4-4"})
    assert ei.value.status == 416
    assert ("Content-Range", "bytes */100") in ei.value.headers
    r = serve(conf(root), "/d.bin", headers={"range": "bytes=0-0,1-1,2-2,3-3"})
    assert len(parse_multipart(r)) == 4


@pytest.mark.parametrize("spec", ["bytes=999999-", "bytes=100-200", "bytes=5-4",
                                  "bytes=-0", "items=0-5", "bytes=x-y"])
def test_unsatisfiable(root, spec):
    put(root / "d.bin", DATA)
    with pytest.raises(HttpError) as ei:
        serve(conf(root), "/d.bin", headers={"range": spec})
    assert ei.value.status == 416
    assert ("Content-Range", "bytes */100") in ei.value.headers


def test_range_on_empty_file(root):
    put(root / "e.bin", b"")
    with pytest.raises(HttpError) as ei:
        serve(conf(root), "/e.bin", headers={"range": "bytes=0-"})
    assert ("Content-Range", "bytes */0") in ei.value.headers


def test_head_ignores_range(root):
    put(root / "d.bin", DATA)
    r = serve(conf(root), "/d.bin", "HEAD", {"range": "bytes=0-9"})
    assert r.status == 200 and r.length == 100 and r.segments == []
    r = serve(conf(root), "/d.bin", "HEAD", {"range": "bytes=999-"})
    assert r.status == 200


# -- gzip-static -----------------------------------------------------------

@pytest.fixture
def gz(root):
    put(root / "app.js", b"plain javascript")
    put(root / "app.js.gz", b"\x1f\x8bcompressed", mtime=MTIME + 10)
    return root


def test_gzip_static(gz):
    c = conf(gz, gzip_static=True)
    r = serve(c, "/app.js", headers={"accept-encoding": "deflate, gzip;q=1"})
    assert r.status == 200 and r.body == b"\x1f\x8bcompressed"
    assert r.length == len(b"\x1f\x8bcompressed")
    assert hdr(r, "Content-Encoding") == "gzip"
    assert hdr(r, "Content-Type") == "application/javascript"
    assert hdr(r, "Last-Modified") == formatdate(MTIME, usegmt=True)
    h = serve(c, "/app.js", "HEAD", {"accept-encoding": "gzip"})
    assert h.length == r.length and hdr(h, "Content-Encoding") == "gzip"


@pytest.mark.parametrize("gzip_static,headers", [
    (False, {"accept-encoding": "gzip"}),
    (True, {}),
    (True, {"accept-encoding": "deflate, br"}),
    (True, {"accept-encoding": "GZIP"}),              # strstr is case-sensitive
    (True, {"accept-encoding": "gzip", "range": "bytes=0-"}),   # ranges: no gzip
])
def test_gzip_static_not_used(gz, gzip_static, headers):
    r = serve(conf(gz, gzip_static=gzip_static), "/app.js", headers=headers)
    assert r.body == b"plain javascript"
    assert hdr(r, "Content-Encoding") is None


def test_gzip_static_older_or_not_a_file(root):
    put(root / "a.css", b"css", mtime=MTIME)
    put(root / "a.css.gz", b"old", mtime=MTIME - 1)
    (root / "b.css.gz").mkdir()
    put(root / "b.css", b"css")
    c = conf(root, gzip_static=True)
    for name in ("/a.css", "/b.css"):
        r = serve(c, name, headers={"accept-encoding": "gzip"})
        assert r.body == b"css" and hdr(r, "Content-Encoding") is None


def test_gzip_static_not_modified(gz):
    r = serve(conf(gz, gzip_static=True), "/app.js", headers={
        "accept-encoding": "gzip", "if-modified-since": formatdate(MTIME, usegmt=True)})
    assert r.status == 304 and hdr(r, "Content-Encoding") == "gzip"


def test_gzip_only_file_is_not_found(root):
    put(root / "only.js.gz", b"gz")
    c = conf(root, gzip_static=True)
    assert status(c, "/only.js", headers={"accept-encoding": "gzip"}) == 404


# -- small-file cache ----------------------------------------------------------

@pytest.fixture
def cache_now(monkeypatch):
    """Cache files at once (no 2 s "racily clean" wait), from an empty cache."""
    monkeypatch.setattr(sf, "RACY_NS", -10**12)
    monkeypatch.setattr(sf, "_files", {})
    monkeypatch.setattr(sf, "_files_bytes", 0)


def test_cache_serves_a_changed_file_fresh(root, cache_now):
    f = put(root / "a.txt", b"one")
    assert serve(conf(root), "/a.txt").body == b"one"
    assert str(f) in sf._files                     # cached by the first GET
    assert serve(conf(root), "/a.txt").body == b"one"
    with open(f, "r+b") as fh:                      # same size, same mtime, in place
        fh.write(b"two")
    os.utime(f, (MTIME, MTIME))
    assert serve(conf(root), "/a.txt").body == b"two"
    (root / "new").write_bytes(b"three")            # renamed over it
    os.rename(root / "new", f)
    assert serve(conf(root), "/a.txt").body == b"three"
    f.unlink()
    assert status(conf(root), "/a.txt") == 404
    f.mkdir()
    assert isinstance(serve(conf(root), "/a.txt"), Redirect)


def test_cache_keeps_ranges_conditionals_and_methods(root, cache_now):
    put(root / "a.txt", b"0123456789")
    serve(conf(root), "/a.txt")
    assert sf._files
    r = serve(conf(root), "/a.txt", headers={"range": "bytes=2-4"})
    assert (r.status, r.body) == (206, b"234")
    r = serve(conf(root), "/a.txt", headers={"if-modified-since": formatdate(MTIME, usegmt=True)})
    assert r.status == 304
    r = serve(conf(root), "/a.txt", method="HEAD")
    assert (r.status, r.body, r.length) == (200, b"", 10)
    assert status(conf(root), "/a.txt", method="POST") == 405


def test_cache_waits_for_racily_clean_files(root, monkeypatch):
    monkeypatch.setattr(sf, "_files", {})
    monkeypatch.setattr(sf, "_files_bytes", 0)
    put(root / "a.txt", b"new")                     # ctime is now: not cached yet
    assert serve(conf(root), "/a.txt").body == b"new"
    assert not sf._files


def test_cache_is_bounded(root, cache_now, monkeypatch):
    monkeypatch.setattr(sf, "FILE_CACHE_BYTES", 3000)
    for i in range(10):
        put(root / f"{i}.txt", b"x" * 1000)
        assert serve(conf(root), f"/{i}.txt").body == b"x" * 1000
        assert sf._files_bytes <= 3000
    assert 1 <= len(sf._files) <= 2
