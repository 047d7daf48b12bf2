"""server_file -- answer GET/HEAD from the file system (OpenBSD's server_file.c).

Maps a decoded, canonical request path onto the document root and decides
the response: a file (200, 206 with byte ranges, 304), a directory redirect
(301), an index file (handed back to the caller for re-routing) or a
generated auto index page.  Sans-I/O towards the client: this module opens,
stats and reads files but never touches a socket; server_http sends what
serve() returns.  Small files stay in memory between requests, checked by
a stat() on each (see "small-file cache").  Errors are raised as
HttpError(status).  Never parses HTTP, never talks FastCGI.
"""

from __future__ import annotations

import calendar
import errno
import fcntl
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import jinja2
from markupsafe import Markup

from engine.http1 import HttpError
from httpd.config import SERVER_MAXRANGES, HttpdConfig, ServerConfig
from httpd.http import PATH_MAX

SMALL_FILE = 64 * 1024      # files up to this size are read and returned as bytes

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK  # a FIFO must not block us
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTHS_FULL = ("january", "february", "march", "april", "may", "june", "july",
                "august", "september", "october", "november", "december")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DAYS_FULL = ("sunday", "monday", "tuesday", "wednesday", "thursday",
              "friday", "saturday")
# url_encode() leaves everything else alone (httpd.c: url_encode)
_URL_UNSAFE = frozenset(b' #%?"&<') | frozenset(range(0x20)) | frozenset(range(0x7f, 0x100))

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True, trim_blocks=True, lstrip_blocks=True,
    keep_trailing_newline=True, auto_reload=False)
# Compiled at import, i.e. before the server process chroots.
_AUTOINDEX = _templates.get_template("autoindex.html")


@dataclass
class Redirect:
    """301 to `location` (a directory requested without its trailing slash)."""
    location: str


@dataclass
class InternalRedirect:
    """Directory with slash: re-route `path` (directory + index file).

    If the location stays the same, call serve() again with index_dir=True;
    if it changes, dispatch to the new location (FastCGI or serve() with
    alias=True), as OpenBSD's server_file_access() does."""
    path: str


@dataclass
class FileResponse:
    """What to send: status, file headers and the body as segments.

    headers: Content-Type, Last-Modified, Content-Range, Content-Encoding
    only.  length: the Content-Length, -1 to omit it (304).  segments:
    literal bytes or (offset, count) slices of `fd`; empty for HEAD and 304.
    fd: open file for the slices (the caller closes it, also on errors)."""
    status: int
    headers: list[tuple[str, str]]
    length: int
    segments: list[bytes | tuple[int, int]] = field(default_factory=list)
    fd: int | None = None


def status_for(exc: OSError) -> int:
    """Map a failed open()/stat() to the HTTP status to answer with."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return 404
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
        return 403
    return 500


# What url_encode() leaves alone: printable ASCII but space # % ? " & <.
_URL_PLAIN = re.compile(r"[!$'-;=>@-~]*")


def url_encode(s: str) -> str:
    """httpd's url_encode: %XX for space # % ? " & <, controls and bytes >= 0x7f."""
    if _URL_PLAIN.fullmatch(s):
        return s                 # the usual case (every logged request)
    out = []
    for c in s.encode("utf-8", "surrogateescape"):
        out.append(f"%{c:02X}" if c in _URL_UNSAFE else chr(c))
    return "".join(out)


def media_type(gconf: HttpdConfig, conf: ServerConfig, path: str) -> str:
    """Content-Type for `path` (media_find_config): extension, else default type.

    The "extension" is what follows the last '.' of the last path component,
    or the whole component if it has no dot (so a file named "html" is
    text/html, as in OpenBSD); matched case-insensitively."""
    name = path[path.rfind("/") + 1:]
    ext = name[name.rfind(".") + 1:]
    if ext:
        mtype = gconf.media_types.get(ext.lower())
        if mtype is not None:
            return mtype
    default = conf.default_type or gconf.default_type
    text = _default_types.get(default)
    if text is None:
        text = _default_types[default] = f"{default[0]}/{default[1]}"
    return text


_default_types: dict[tuple[str, str], str] = {}   # ("text", "html") -> "text/html"


def fmt_scaled(n: int) -> str:
    """Human-readable size as libutil's fmt_scaled(3): 0B, 512B, 4.0K, 1.5M, 100K."""
    factors = [1024 ** i for i in range(7)]
    if n < 0 or n // 1024 >= factors[-1]:
        raise ValueError(f"cannot scale {n}")
    unit, fract, number = 0, 0, n
    for i, f in enumerate(factors):
        if n // 1024 < f:
            unit = i
            if i > 0:
                fract = (n % f) // factors[i - 1]
            number = n // f
            break
    fract = (10 * fract + 512) // 1024
    if fract == 10:
        number, fract = number + 1, 0
    if number == 0:
        return "0B"
    if unit == 0 or number >= 100:
        if fract >= 5:
            number += 1
        return f"{number}{'BKMGTPE'[unit]}"
    return f"{number}.{fract}{'BKMGTPE'[unit]}"


def parse_ranges(value: str, size: int) -> list[tuple[int, int]] | None:
    """Byte ranges of a Range header as inclusive (start, end), per parse_ranges().

    None: the header is unusable (not "bytes=", or more than SERVER_MAXRANGES
    ranges).  An invalid spec is dropped; as in OpenBSD, one that is followed
    by a comma also ends the parsing (specs after it are ignored)."""
    unit, sep, rest = value.partition("=")
    if not sep or unit != "bytes":
        return None
    specs = rest.split(",")
    ranges: list[tuple[int, int]] = []
    for spec in specs[:-1]:
        r = _range_spec(spec, size)
        if r is None:
            return ranges       # XXX OpenBSD's loop does not advance past it
        ranges.append(r)
        if len(ranges) == SERVER_MAXRANGES:
            return None
    r = _range_spec(specs[-1], size)
    if r is not None:
        ranges.append(r)
    return ranges


def serve(conf: ServerConfig, gconf: HttpdConfig, prefix: str, path: str,
          query: str | None, method: str, headers: dict[str, str],
          index_dir: bool = False, alias: bool = False
          ) -> FileResponse | Redirect | InternalRedirect:
    """Answer a static-file request (server_file + server_file_access).

    conf: effective (location) config; prefix: prepended to conf.root to
    reach the file system ("" when chrooted); path: decoded canonical request
    path; query: unused (OpenBSD's directory redirect drops it); headers:
    lower-case names.  index_dir: `path` is an InternalRedirect path in the
    same location: a missing index falls back to the auto index (or 403).
    alias: `path` is not the request path (index in another location,
    `request rewrite`): a directory there is a 500, as OpenBSD's
    http_path_alias check.  Raises HttpError(403/404/405/416/500)."""
    if "\0" in path:
        path = path.split("\0", 1)[0]      # a C string ends there
    if index_dir and conf.index and path.endswith(conf.index) and \
            path[:-len(conf.index)].endswith("/"):
        dir_path = path[:-len(conf.index)]
        fs_dir = conf.root + _root_strip(dir_path, conf.strip)
        if _blen(fs_dir) >= PATH_MAX:
            raise HttpError(500, dir_path)
        if _blen(fs_dir + conf.index) >= PATH_MAX:     # strlcat() would truncate
            raise HttpError(403, path)
        try:
            return _access(gconf, conf, prefix, fs_dir + conf.index, path,
                           method, headers, True)
        except HttpError as e:
            if e.status != 404:
                raise
        if not conf.auto_index:
            raise HttpError(403, path)
        return _index(gconf, conf, prefix + fs_dir, dir_path, method)
    fs = conf.root + (_root_strip(path, conf.strip) if conf.strip else path)
    if _blen(fs) >= PATH_MAX:
        raise HttpError(500, path)
    return _access(gconf, conf, prefix, fs, path, method, headers,
                   alias or index_dir)


# -- server_file_access ----------------------------------------------------

def _blen(s: str) -> int:
    # length of the C string (paths are limited to PATH_MAX bytes)
    if len(s) * 4 < PATH_MAX:
        return len(s)        # short enough either way: skip the encoding
    return len(s.encode("utf-8", "surrogateescape"))


def _root_strip(path: str, n: int) -> str:
    # server_root_strip: drop n leading components; too many leave "".
    i = 0
    while n > 0 and i < len(path):
        j = path.find("/", i + 1)
        i = len(path) if j == -1 else j
        n -= 1
    return path[i:]


def _access(gconf: HttpdConfig, conf: ServerConfig, prefix: str, fs: str,
            path: str, method: str, headers: dict[str, str], alias: bool
            ) -> FileResponse | Redirect | InternalRedirect:
    full = prefix + fs
    cached = _files.get(full)
    if cached is not None and not conf.gzip_static and \
            (method != "GET" or "range" not in headers):
        # A small file read before: one stat() instead of open, fstat,
        # fcntl, read and close, if it is still the same file unchanged.
        try:
            st = os.stat(full)
            key = _stat_key(st)
        except OSError:
            key = None
        if key == cached[0]:
            return _request(-1, st.st_size, st.st_mtime_ns // 10**9,
                            media_type(gconf, conf, fs), method, headers, None,
                            path, cached[1])
        _uncache(full)
    try:
        fd = os.open(full, _OPEN_FLAGS)
    except OSError as e:
        raise HttpError(status_for(e), path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                if conf.index is None:           # `directory no index`
                    raise HttpError(403, path)
                if alias:                        # the index "file" is a directory?
                    raise HttpError(500, path)
                if not fs.endswith("/"):
                    return Redirect(url_encode(path) + "/")
                return InternalRedirect(path + conf.index)
            raise HttpError(403, path)           # special files
        # Blocking again (one fcntl: no other status flag was set by open).
        fcntl.fcntl(fd, fcntl.F_SETFL, 0)
        media = media_type(gconf, conf, fs)
        if method == "GET" and "range" in headers:
            resp = _partial(fd, st, media, headers["range"], path)
            return _finish(resp, fd)
        extra: list[tuple[str, str]] = []
        mtime_ns = st.st_mtime_ns
        size = st.st_size
        if conf.gzip_static and "gzip" in headers.get("accept-encoding", ""):
            gz = _gzip_static(prefix + fs, mtime_ns, path)
            if gz is not None:
                os.close(fd)
                fd, size = gz
                extra.append(("Content-Encoding", "gzip"))
        resp = _request(fd, size, mtime_ns // 10**9, media, method, headers,
                        extra, path)
        if size <= SMALL_FILE and method == "GET" and resp.status == 200 and \
                not conf.gzip_static and resp.length == size and \
                st.st_ctime_ns < time.time_ns() - RACY_NS:
            # (the whole file was read: segments are [bytes], or [] if empty)
            _cache(full, st, resp.segments[0] if resp.segments else b"")
        return _finish(resp, fd)
    except BaseException:
        os.close(fd)
        raise


# -- small-file cache --------------------------------------------------------
#
# Full path -> (stat key, bytes) of small files served before, as nginx's
# open_file_cache but checked by a stat() on every request (OpenBSD re-opens
# each time; a changed file must be served fresh).  The key holds inode,
# device, size, mtime and ctime: every write, chmod, rename or replacement
# changes ctime or the inode.  A file is cached only once its ctime is
# RACY_NS old (git's "racily clean" rule): file times come from a coarse
# clock, and a change within the same tick as the read could otherwise keep
# the old key.  Bounded by FILE_CACHE_BYTES (paths come from clients).
FILE_CACHE_BYTES = 8 << 20
RACY_NS = 2 * 10**9
_files: dict[str, tuple[tuple, bytes]] = {}
_files_bytes = 0
_ENTRY_COST = 256          # about what an entry costs beyond its bytes


def _cache(full: str, st: os.stat_result, data: bytes) -> None:
    global _files_bytes
    cost = len(data) + len(full) + _ENTRY_COST
    if _files_bytes + cost > FILE_CACHE_BYTES:
        _files.clear()
        _files_bytes = 0
    _uncache(full)
    _files[full] = (_stat_key(st), data)
    _files_bytes += cost


def _stat_key(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _uncache(full: str) -> None:
    global _files_bytes
    old = _files.pop(full, None)
    if old is not None:
        _files_bytes -= len(old[1]) + len(full) + _ENTRY_COST


def _finish(resp: FileResponse, fd: int) -> FileResponse:
    # The fd goes to the caller only if the body refers to it.
    for seg in resp.segments:
        if type(seg) is tuple:
            resp.fd = fd
            return resp
    os.close(fd)
    return resp


def _gzip_static(fs: str, mtime_ns: int, path: str) -> tuple[int, int] | None:
    # (fd, size) of file.gz if it is a regular file not older than the original.
    gzpath = fs + ".gz"
    if _blen(gzpath) >= PATH_MAX:
        raise HttpError(500, path)
    try:
        gzfd = os.open(gzpath, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        gst = os.fstat(gzfd)
    except OSError:
        os.close(gzfd)
        return None
    if not stat.S_ISREG(gst.st_mode) or gst.st_mtime_ns < mtime_ns:
        os.close(gzfd)
        return None
    os.set_blocking(gzfd, True)
    return gzfd, gst.st_size


# -- server_file_request / server_partial_file_request ---------------------

def _request(fd: int, size: int, mtime: int, media: str, method: str,
             headers: dict[str, str], extra: list[tuple[str, str]] | None,
             path: str, data: bytes | None = None) -> FileResponse:
    # data: the file's bytes when the caller has them (the small-file cache).
    if method not in ("GET", "HEAD"):
        raise HttpError(405, path)
    now = int(time.time())
    hdrs = [("Content-Type", media),
            ("Last-Modified", _http_time(mtime if mtime < now else now))]
    if extra:
        hdrs += extra
    since = headers.get("if-modified-since")
    if since is not None:
        t = _parse_http_date(since)
        if t is not None and t >= mtime:
            return FileResponse(304, hdrs, -1)
    if method == "HEAD":
        return FileResponse(200, hdrs, size)
    if size <= SMALL_FILE:
        if data is None:
            data = _read(fd, size, path)
        return FileResponse(200, hdrs, len(data), [data] if data else [])
    return FileResponse(200, hdrs, size, [(0, size)])


def _partial(fd: int, st: os.stat_result, media: str, value: str,
             path: str) -> FileResponse:
    # GET with Range: no If-Modified-Since, no gzip-static (as OpenBSD).
    size = st.st_size
    data = _read(fd, size, path) if size <= SMALL_FILE else None
    if data is not None:
        size = len(data)
    ranges = parse_ranges(value, size)
    if not ranges:
        unsat = f"bytes */{size}"
        raise HttpError(416, unsat, [("Content-Range", unsat)])
    lastmod = _http_time(min(int(time.time()), st.st_mtime_ns // 10**9))

    def body(start: int, end: int) -> bytes | tuple[int, int]:
        if data is not None:
            return data[start:end + 1]
        return (start, end - start + 1)

    if len(ranges) == 1:
        start, end = ranges[0]
        hdrs = [("Content-Type", media), ("Last-Modified", lastmod),
                ("Content-Range", f"bytes {start}-{end}/{size}")]
        return FileResponse(206, hdrs, end - start + 1, [body(start, end)])

    boundary = secrets.randbits(64)
    segments: list[bytes | tuple[int, int]] = []
    length = 0
    for start, end in ranges:
        head = (f"\r\n--{boundary}\r\nContent-Type: {media}\r\n"
                f"Content-Range: bytes {start}-{end}/{size}\r\n\r\n").encode()
        segments += [head, body(start, end)]
        length += len(head) + end - start + 1
    tail = f"\r\n--{boundary}--\r\n".encode()
    segments.append(tail)
    length += len(tail)
    if data is not None:
        segments = [b"".join(segments)]      # one literal body
    hdrs = [("Content-Type", f"multipart/byteranges; boundary={boundary}"),
            ("Last-Modified", lastmod)]
    return FileResponse(206, hdrs, length, segments)


def _range_spec(spec: str, size: int) -> tuple[int, int] | None:
    # parse_range_spec(): "a-b", "a-", "-n"; the end is clamped to size - 1.
    start_s, sep, end_s = spec.partition("-")
    if not sep or (not start_s and not end_s):
        return None
    if end_s:
        end = _strtonum(end_s)
        if end is None:
            return None
        end = min(end, size - 1)
    else:
        end = size - 1
    if start_s:
        start = _strtonum(start_s)
        if start is None or start >= size:
            return None
    else:
        # XXX as OpenBSD: the suffix length was clamped above, so a suffix
        # longer than the file yields bytes 1..size-1, not 0..size-1.
        start, end = size - end, size - 1
    if end < start:
        return None
    return start, end


_NUM_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)\Z")


def _strtonum(s: str) -> int | None:
    # strtonum(s, 0, LLONG_MAX): leading space and a sign allowed, nothing after.
    m = _NUM_RE.match(s)
    if m is None:
        return None
    n = int(m.group(1))
    return n if 0 <= n <= 2**63 - 1 else None


def _read(fd: int, size: int, path: str) -> bytes:
    if size <= 0:
        return b""
    try:
        first = os.pread(fd, size, 0)     # all of it, unless the file shrank
    except OSError:
        raise HttpError(500, path) from None
    if len(first) == size or not first:
        return first
    chunks = [first]
    off = len(first)
    try:
        while off < size:
            b = os.pread(fd, size - off, off)
            if not b:
                break
            chunks.append(b)
            off += len(b)
    except OSError:
        raise HttpError(500, path) from None
    return b"".join(chunks)


# -- dates -----------------------------------------------------------------

_http_times: dict[int, str] = {}


def _http_time(t: int) -> str:
    # Memoised: Last-Modified of the same few files on every request.
    s = _http_times.get(t)
    if s is None:
        s = formatdate(t, usegmt=True)
        if len(_http_times) >= 1024:
            _http_times.clear()
        _http_times[t] = s
    return s


# strptime(3) "%a, %d %h %Y %T %Z" as OpenBSD does it; trailing text ignored.
_IMF_RE = re.compile(
    r"([A-Za-z]+),\s*([0-9]{1,2})\s*([A-Za-z]+)\s*([0-9]{1,4})\s*"
    r"([0-9]{1,2}):([0-9]{1,2}):([0-9]{1,2})\s*(GMT|UTC|[A-Za-z]+)")


def _parse_http_date(value: str) -> int | None:
    m = _IMF_RE.match(value)
    if m is None:
        return None
    wday, mday, mon, year, hh, mm, ss, zone = m.groups()
    if wday.lower() not in _DAYS and wday.lower() not in _DAYS_FULL:
        return None
    mon = mon.lower()
    if mon in _MONTHS_FULL:
        month = _MONTHS_FULL.index(mon) + 1
    elif mon.capitalize() in _MONTHS:
        month = _MONTHS.index(mon.capitalize()) + 1
    else:
        return None
    if zone not in ("GMT", "UTC") and zone.upper() not in \
            (z.upper() for z in time.tzname):
        return None
    mday_i, h, mi, s = int(mday), int(hh), int(mm), int(ss)
    if not (1 <= mday_i <= 31 and h <= 23 and mi <= 59 and s <= 60):
        return None
    try:
        return calendar.timegm((int(year), month, mday_i, h, mi, s))
    except (ValueError, OverflowError):
        return None


# -- server_file_index -----------------------------------------------------

def _index(gconf: HttpdConfig, conf: ServerConfig, fs_dir: str, dir_path: str,
           method: str) -> FileResponse:
    if method not in ("GET", "HEAD"):
        raise HttpError(405, dir_path)
    try:
        fd = os.open(fs_dir, _OPEN_FLAGS | os.O_DIRECTORY)
    except OSError as e:
        raise HttpError(status_for(e), dir_path) from None
    try:
        st = os.fstat(fd)
        names = [n for n in os.listdir(fd) if not n.startswith(".")]
        names.append("..")
        names.sort(key=os.fsencode)        # alphasort in the C locale
        entries = []
        for name in names:
            try:
                sub = os.stat(name, dir_fd=fd)
            except OSError:
                continue
            is_dir = stat.S_ISDIR(sub.st_mode)
            if not is_dir and not stat.S_ISREG(sub.st_mode):
                continue
            href = url_encode(name)
            # "a:b" must not be read as a URL scheme
            href = ("./" if ":" in href else "") + href
            mtime = sub.st_mtime_ns // 10**9
            entries.append({
                "dir": is_dir,
                "name": name,
                # url_encode leaves no '"', '&' or '<': safe in the attribute
                "href": Markup(href),
                "mtime": mtime,
                "date": _local_date(mtime),
                "size": sub.st_size,
                "hsize": "-" if is_dir else fmt_scaled(sub.st_size),
            })
    except OSError:
        raise HttpError(500, dir_path) from None
    finally:
        os.close(fd)
    body = _AUTOINDEX.render(path=dir_path, entries=entries).encode(
        "utf-8", "surrogateescape")
    hdrs = [("Content-Type", media_type(gconf, conf, "index.html")),
            ("Last-Modified", _http_time(min(int(time.time()), st.st_mtime_ns // 10**9)))]
    return FileResponse(200, hdrs, len(body), [] if method == "HEAD" else [body])


def _local_date(t: int) -> str:
    # strftime "%d-%h-%Y %R" in local time, with C-locale month names.
    tm = time.localtime(t)
    return (f"{tm.tm_mday:02d}-{_MONTHS[tm.tm_mon - 1]}-{tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}")
