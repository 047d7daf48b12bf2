"""relayd.nft -- nftables through libnftables (ctypes), not the nft(8) binary.

The library nft(8) itself is built on: the same JSON (libnftables-json(5))
and text commands, run in this process.  The context is made in advance
(Nft.open(), before the chroot): nft_ctx_new() opens its netlink socket
and reads the iproute2 tables then.  Sending on that socket still needs
CAP_NET_ADMIN (the kernel checks the sender as well as the opener), which
is why pfe keeps it; nothing is executed any more.

API, as pfe uses it (the calls block for the few milliseconds a netlink
transaction takes; one at a time):

    nft = Nft(); nft.open()           find the library, make the context
    nft.available() -> bool
    await nft.version() -> (1, 0, 6)  of the library (from a JSON listing's metainfo)
    await nft.apply(cmds)             one JSON transaction; NftError names the
                                      first failing command (dry runs on prefixes)
    await nft.apply_text(text)        nft(8) syntax
    await nft.counters() -> {name: packets} of table inet relayd

Not here: what the commands say (pfe_filter), when to run them (pfe).
"""

from __future__ import annotations

import ctypes
import json
import re

from relayd import pfe_filter

_OUTPUT_JSON = 1 << 4            # NFT_CTX_OUTPUT_JSON


class NftError(Exception):
    """An nft transaction failed; `failed` is the command it failed on."""

    def __init__(self, message: str, failed: dict | None = None) -> None:
        super().__init__(message)
        self.failed = failed


def _load():
    lib = ctypes.CDLL("libnftables.so.1")     # by soname: find_library runs ldconfig
    P = ctypes.c_void_p
    lib.nft_ctx_new.restype = P
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [P]
    lib.nft_ctx_output_set_flags.argtypes = [P, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [P]
    lib.nft_ctx_buffer_error.argtypes = [P]
    lib.nft_ctx_get_output_buffer.argtypes = [P]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [P]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_set_dry_run.argtypes = [P, ctypes.c_bool]
    lib.nft_run_cmd_from_buffer.argtypes = [P, ctypes.c_char_p]
    return lib


class Nft:
    """One libnftables context: JSON transactions, text transactions, listings."""

    def __init__(self) -> None:
        self._lib = None
        self._ctx = None
        self._version: tuple[int, ...] | None = None
        self.error = ""          # why open() failed

    def open(self) -> bool:
        """Make the context (before the chroot); False when there is no library."""
        if self._ctx is not None:
            return True
        try:
            self._lib = _load()
        except OSError as e:
            self.error = f"libnftables: {e}"
            return False
        self._ctx = self._lib.nft_ctx_new(0)
        if not self._ctx:
            self.error = "nft_ctx_new failed"
            return False
        self._lib.nft_ctx_output_set_flags(self._ctx, _OUTPUT_JSON)
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)
        return True

    def available(self) -> bool:
        return self.open()

    def run(self, text: str, dry: bool = False) -> tuple[int, str, str]:
        """(return code, output, error) of one command buffer."""
        if not self.open():
            return 1, "", self.error
        lib, ctx = self._lib, self._ctx
        lib.nft_ctx_set_dry_run(ctx, dry)
        try:
            rc = lib.nft_run_cmd_from_buffer(ctx, text.encode())
        finally:
            lib.nft_ctx_set_dry_run(ctx, False)
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        return rc, out, err

    @staticmethod
    def _error(rc: int, err: str) -> str:
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        return "; ".join(lines) or f"nft failed ({rc})"

    def version_now(self) -> tuple[int, ...]:
        """The library's version ((0,) when unknown); a listing says it."""
        if self._version is None:
            rc, out, _ = self.run("list tables")
            m = re.search(r'"version":\s*"(\d+)\.(\d+)(?:\.(\d+))?"', out) if rc == 0 else None
            self._version = tuple(int(x) for x in m.groups(default="0")) if m else (0,)
        return self._version

    async def version(self) -> tuple[int, ...]:
        return self.version_now()

    async def apply(self, cmds: list[dict]) -> None:
        """Run `cmds` as one transaction; NftError names the failing command."""
        if not cmds:
            return
        rc, _, err = self.run(json.dumps(pfe_filter.document(cmds)))
        if rc == 0:
            return
        raise NftError(self._error(rc, err), self.find_failing(cmds))

    def check(self, cmds: list[dict]) -> bool:
        return self.run(json.dumps(pfe_filter.document(cmds)), dry=True)[0] == 0

    def find_failing(self, cmds: list[dict]) -> dict | None:
        """The first command whose prefix of `cmds` fails a dry run."""
        lo, hi = 1, len(cmds)
        if self.check(cmds):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if self.check(cmds[:mid]):
                lo = mid + 1
            else:
                hi = mid
        return cmds[lo - 1]

    async def apply_text(self, text: str) -> None:
        rc, _, err = self.run(text)
        if rc != 0:
            raise NftError(self._error(rc, err))

    async def counters(self) -> dict[str, int]:
        rc, out, _ = self.run(f"list counters table {pfe_filter.FAMILY} {pfe_filter.TABLE}")
        if rc != 0:
            return {}
        try:
            return pfe_filter.counters_from_listing(json.loads(out))
        except ValueError:
            return {}
