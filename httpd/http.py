"""httpd.http -- HTTP tables of httpd (OpenBSD's http.h): methods, names.

Data only.  Reason phrases are shared with relayd and live in engine.http1.
"""

from __future__ import annotations

# Methods httpd recognises (RFC 2616, 2518, 3253, 3648, 3744, 5323, 5789, 4437);
# anything else is answered 400.
METHODS = frozenset((
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK",
    "VERSION-CONTROL", "REPORT", "CHECKOUT", "CHECKIN", "UNCHECKOUT",
    "MKWORKSPACE", "UPDATE", "LABEL", "MERGE", "BASELINE-CONTROL",
    "MKACTIVITY", "ORDERPATCH", "ACL", "MKREDIRECTREF", "UPDATEREDIRECTREF",
    "SEARCH", "PATCH",
))

# What the Server header and error pages call us (SERVER_SOFTWARE too).
SERVER_SOFTWARE = "OpenBSD httpd"

# Longest canonical path (PATH_MAX); longer → 400.
PATH_MAX = 1024
