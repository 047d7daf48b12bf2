"""relayd.carp -- `demote GROUP` on Linux: keepalived track files.

OpenBSD raises the carp demotion counter of interface group GROUP when
every host of a table with `demote GROUP` is down, lowers it when one comes
back, and undoes its own demotions at exit; CARP then prefers the peer.
Linux has no demotion counter.  The closest is keepalived's VRRP
`track_file`: keepalived reads an integer from a file (on start and
whenever the file changes) and adds value x weight to the instance's
priority (weight 0: any non-zero value puts the instance in FAULT).

So relayd keeps, per group, the number of its tables that are demoted now
(the part of the carp counter relayd owns) in DEMOTE_DIR/GROUP:

    0\\n        nothing demoted (also written at start and at exit)
    N\\n        N tables with `demote GROUP` have no host up

A keepalived `track_file` with a negative weight on that file makes the
peer take the virtual addresses (see README).  Files are replaced
atomically (write + rename), so keepalived never reads half a number.
DEMOTE_DIR is /run/relayd/demote, or $RELAYD_DEMOTE_DIR.

Every change of a group's counter is logged with OpenBSD's words
(carp.c's carp_demote_ioctl(): "incremented/decremented the demote state
of group 'G'") plus the old and new counter, which OpenBSD's line lacks;
change_text() makes that line, the callers log it.  levels() is what
`relayctl show summary` and the metrics show.
"""

from __future__ import annotations

import os

DEMOTE_DIR = "/run/relayd/demote"
DEMOTE_ENV = "RELAYD_DEMOTE_DIR"


def demote_dir() -> str:
    return os.environ.get(DEMOTE_ENV) or DEMOTE_DIR


def track_file(group: str, directory: str | None = None) -> str:
    return os.path.join(directory or demote_dir(), group)


def change_text(group: str, level: int, prev: int | None) -> str | None:
    """The log line for a group's counter going from `prev` (None: never
    written) to `level`; None when nothing changed (the first 0)."""
    old = prev or 0
    if level == old:
        return None
    verb = "incremented" if level > old else "decremented"
    return (f"carp_demote_set: {verb} the demote state of group '{group}' "
            f"(demote counter {old} -> {level})")


class Demote:
    """Demotion state per group: which of our tables demote it now, and
    what its file says.  set() records, commit() writes what changed."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or demote_dir()
        self.demoted: dict[str, set[int]] = {}   # group -> table ids demoting it
        self.written: dict[str, int] = {}        # group -> value in its file

    def path(self, group: str) -> str:
        return track_file(group, self.directory)

    def level(self, group: str) -> int:
        return len(self.demoted.get(group, ()))

    def levels(self) -> dict[str, int]:
        """Group -> counter as its file says (groups of the configuration
        not written yet: 0)."""
        return {g: self.written.get(g, 0) for g in sorted(set(self.demoted) | set(self.written))}

    def configure(self, groups: set[str]) -> None:
        """The groups of a (new) configuration: table ids start over (the
        caller sets them again), groups no longer used go back to 0."""
        self.demoted = {g: set() for g in groups} | {
            g: set() for g in self.written if g not in groups}

    def set(self, group: str, table_id: int, demoted: bool) -> None:
        tables = self.demoted.setdefault(group, set())
        (tables.add if demoted else tables.discard)(table_id)

    def commit(self) -> list[tuple[str, int, int | None, str | None]]:
        """Write every group whose file does not hold its level yet:
        (group, level, previous level or None, error text or None) per
        file written."""
        out = []
        for g in sorted(self.demoted):
            level = self.level(g)
            prev = self.written.get(g)
            if prev == level:
                continue
            out.append((g, level, prev, self._write(g, level)))
        return out

    def shutdown(self) -> list[tuple[str, int, int | None, str | None]]:
        """Undo every demotion of ours (write 0)."""
        for tables in self.demoted.values():
            tables.clear()
        return self.commit()

    def _write(self, group: str, value: int) -> str | None:
        path = self.path(group)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(f"{value}\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return f"carp_demote: cannot write {path}: {e.strerror or e}"
        self.written[group] = value
        return None
