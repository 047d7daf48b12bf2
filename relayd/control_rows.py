"""relayd.control_rows -- the rows of the control protocol (sans I/O).

What a `show` answers is a list of these dicts (relayd.control's module
docstring has the protocol).  They live one floor below control so that
pfe, which builds the redirect, router and demote rows, does not import
the control socket's module (control, parent, privsep and pfe used to
import each other in a circle).

Not here: the protocol's requests and the socket (relayd.control), the
layout relayctl gives the rows (relayctl).
"""

from __future__ import annotations


# Rows.  Field names follow the imsgs pfe sends for `show` (struct rdr,
# table, host, relay, router, netroute, rsession), as plain values.

def table_row(id: int, name: str, up: int, disabled: bool, **extra) -> dict:
    return {"type": "table", "id": id, "name": name, "up": up, "disabled": disabled,
            **extra}


def host_row(id: int, name: str, state: str, *, parent: int = 0, table: int = 0,
             disabled: bool = False, check_cnt: int = 0, up_cnt: int = 0,
             retry_cnt: int = 0, error: str = "none", **extra) -> dict:
    return {"type": "host", "id": id, "name": name, "parent": parent, "table": table,
            "state": state, "disabled": disabled, "check_cnt": check_cnt,
            "up_cnt": up_cnt, "retry_cnt": retry_cnt, "error": error, **extra}


def relay_row(id: int, name: str, disabled: bool, stats: list[dict]) -> dict:
    """`stats`: one ctl_stats dict per relay process (relayctl sums them)."""
    return {"type": "relay", "id": id, "name": name, "disabled": disabled, "stats": stats}


def redirect_row(id: int, name: str, disabled: bool, down: bool = False,
                 backup: bool = False, stats: list[dict] | None = None) -> dict:
    return {"type": "redirect", "id": id, "name": name, "disabled": disabled,
            "down": down, "backup": backup, "stats": stats or []}


def router_row(id: int, name: str, disabled: bool, rtable: int = 0,
               rtlabel: str | None = None, routes: list | None = None) -> dict:
    """`routes`: [address, prefix length] pairs."""
    return {"type": "router", "id": id, "name": name, "disabled": disabled,
            "rtable": rtable, "rtlabel": rtlabel or "", "routes": routes or []}


def demote_row(group: str, counter: int, path: str = "") -> dict:
    """A `demote GROUP` group: relayd's counter (tables demoting it) and
    the keepalived track file holding it (an extension of ours; OpenBSD's
    relayctl shows no carp state)."""
    return {"type": "demote", "name": group, "counter": counter, "file": path}


def pfe_row_map(rows: list[dict]) -> dict:
    """pfe's snapshot() rows by (type, id); demote rows by (type, name)."""
    return {(r["type"], r["name"] if r["type"] == "demote" else r["id"]): r for r in rows}
