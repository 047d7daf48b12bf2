"""shared.lexer -- tokens of the OpenBSD configuration dialect.

The lexical rules of httpd.conf(5) and relayd.conf(5): `#` comments, a
backslash at the end of a line joins it with the next one (before comments
are stripped, as in OpenBSD, so a commented line ending in `\\` swallows the
next line), "double" and 'single' quotes, `$macro` expansion outside quotes
(the value is lexed again, so a macro may expand to several tokens), and
`include` files pushed on a stack.  Every token carries its file and line.

This module knows nothing of either grammar: keywords are plain words here;
shared.parser and the daemons' parse modules give them meaning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Token kinds.
WORD = "word"          # unquoted string; may be a keyword
STRING = "string"      # quoted string; never a keyword
NUMBER = "number"      # unquoted decimal integer
PUNCT = "punct"        # one of PUNCT_CHARS
NL = "newline"
EOF = "end of file"

# Characters that end an unquoted word and are tokens of their own
# (OpenBSD's allowed_in_string() excludes exactly these from words).
PUNCT_CHARS = frozenset("(){}<>!=/,;")
# Characters after which a run of digits is a NUMBER (allowed_to_end_number()).
NUMBER_END = frozenset(" \t\r\n)},/=;>#")
# Most nested includes we follow before calling it a loop.
MAX_INCLUDE_DEPTH = 32


@dataclass(slots=True)
class Token:
    kind: str
    value: str | int
    file: str
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def describe(self) -> str:
        if self.kind in (NL, EOF):
            return self.kind
        if self.kind == STRING:
            return f'"{self.value}"'
        return f'"{self.value}"' if self.kind == WORD else str(self.value)


class Errors:
    """Collects `file:line: message` lines; the parser never stops at the first."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.warnings: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.lines.append(f"{where}: {msg}")

    def warn(self, where: str, msg: str) -> None:
        self.warnings.append(f"{where}: {msg}" if where else msg)

    def __bool__(self) -> bool:
        return bool(self.lines)


class ConfigError(Exception):
    """Raised with every collected error line when a config does not load."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class Macros:
    """Macro table.  Command-line (-D) macros persist over file definitions."""

    def __init__(self, cmdline: dict[str, str] | None = None) -> None:
        self.values: dict[str, str] = dict(cmdline or {})
        self.persist: set[str] = set(self.values)
        self.used: set[str] = set()
        self.where: dict[str, str] = {}

    def define(self, name: str, value: str, where: str = "") -> None:
        if name in self.persist:
            return
        self.values[name] = value
        self.where[name] = where

    def get(self, name: str) -> str | None:
        val = self.values.get(name)
        if val is not None:
            self.used.add(name)
        return val

    def unused(self) -> list[str]:
        return [n for n in self.values if n not in self.used]


def parse_cmdline_macro(arg: str) -> tuple[str, str]:
    """`name=value` from -D; raises ValueError like OpenBSD's cmdline_symset."""
    name, sep, value = arg.partition("=")
    if not sep or not name:
        raise ValueError(f"could not parse macro definition {arg}")
    return name, value


class _Source:
    __slots__ = ("text", "pos", "name", "line", "is_macro")

    def __init__(self, text: str, name: str, line: int = 1, is_macro: bool = False):
        self.text = text
        self.pos = 0
        self.name = name
        self.line = line
        self.is_macro = is_macro


class Lexer:
    """Turns a stack of files (and macro expansions) into Tokens."""

    def __init__(self, errors: Errors, macros: Macros,
                 punct: frozenset[str] = PUNCT_CHARS) -> None:
        self.errors = errors
        self.macros = macros
        # Grammars differ here: acme-client's allowed_in_string() keeps
        # `/` and `<>;` inside words (so an unquoted URL is one word).
        self.punct = punct
        self._stack: list[_Source] = []
        self._pending: list[Token] = []
        self._files: list[str] = []   # real paths of open files, for loops

    # -- sources ---------------------------------------------------------
    def push_text(self, text: str, name: str) -> None:
        self._stack.append(_Source(text, name))
        self._files.append(os.path.realpath(name) if name else name)

    def push_file(self, path: str, where: str | None = None) -> bool:
        """Open `path` on top of the stack (the grammar's `include`)."""
        real = os.path.realpath(path)
        if real in self._files or len(self._stack) >= MAX_INCLUDE_DEPTH:
            self.errors.add(where or path, f"include loop: {path}")
            return False
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as e:
            msg = f"cannot open {path}: {e.strerror}" if where else \
                f"{path}: {e.strerror}"
            self.errors.add(where or path, msg) if where else \
                self.errors.lines.append(msg)
            return False
        self._stack.append(_Source(text, path))
        self._files.append(real)
        return True

    def current_file(self) -> str:
        for src in reversed(self._stack):
            if not src.is_macro:
                return src.name
        return ""

    # -- characters ------------------------------------------------------
    def _src(self) -> _Source | None:
        return self._stack[-1] if self._stack else None

    def _getc(self, src: _Source) -> str:
        """One character of `src`, joining backslash-newline continuations."""
        while True:
            if src.pos >= len(src.text):
                return ""
            c = src.text[src.pos]
            src.pos += 1
            if c == "\\" and src.text.startswith("\n", src.pos):
                src.pos += 1
                src.line += 1
                continue
            return c

    def _peekc(self, src: _Source) -> str:
        save = src.pos, src.line
        c = self._getc(src)
        src.pos, src.line = save
        return c

    # -- tokens ----------------------------------------------------------
    def unget(self, tok: Token) -> None:
        self._pending.append(tok)

    def next(self) -> Token:
        if self._pending:
            return self._pending.pop()
        while True:
            src = self._src()
            if src is None:
                return Token(EOF, "", self._last_name, self._last_line)
            tok = self._lex(src)
            if tok is not None:
                self._last_name, self._last_line = tok.file, tok.line
                return tok
            # `src` is exhausted: pop it.  An included file ends its last
            # line even when the file itself lacks the final newline.
            self._stack.pop()
            self._files.pop()
            self._last_name, self._last_line = src.name, src.line
            if not src.is_macro and self._stack:
                return Token(NL, "\n", src.name, src.line)

    _last_name = ""
    _last_line = 1

    def _lex(self, src: _Source) -> Token | None:
        while True:
            c = self._getc(src)
            if c == "":
                return None
            if c in " \t\r":
                continue
            break
        name, line = (self.current_file() if src.is_macro else src.name), src.line
        if src.is_macro:
            line = self._macro_line(src)
        if c == "#":
            while True:
                c = self._getc(src)
                if c in ("\n", ""):
                    break
            if c == "":
                return None
            src.line += 1
            return Token(NL, "\n", name, line)
        if c == "\n":
            src.line += 1
            return Token(NL, "\n", name, line)
        if c == "$" and not src.is_macro:
            return self._expand(src, name, line)
        if c in ("'", '"'):
            return self._quoted(src, c, name, line)
        if c in self.punct:
            return Token(PUNCT, c, name, line)
        if c == "-" or c.isdigit():
            save = src.pos, src.line
            digits = c
            while self._peekc(src).isdigit():
                digits += self._getc(src)
            nxt = self._peekc(src)
            if digits != "-" and (nxt == "" or nxt in NUMBER_END):
                try:
                    return Token(NUMBER, int(digits), name, line)
                except ValueError:
                    pass
            src.pos, src.line = save
        word = c
        while True:
            nxt = self._peekc(src)
            if nxt == "" or not _allowed_in_word(nxt, self.punct):
                break
            word += self._getc(src)
        if not _allowed_in_word(c, self.punct):
            self.errors.add(f"{name}:{line}", f"syntax error: unexpected character {c!r}")
            return Token(PUNCT, c, name, line)
        return Token(WORD, word, name, line)

    def _macro_line(self, src: _Source) -> int:
        for s in reversed(self._stack):
            if not s.is_macro:
                return s.line
        return src.line

    def _expand(self, src: _Source, name: str, line: int) -> Token | None:
        mname = ""
        while True:
            nxt = self._peekc(src)
            if nxt and (nxt.isalnum() or nxt == "_"):
                mname += self._getc(src)
            else:
                break
        if not mname:
            self.errors.add(f"{name}:{line}", "syntax error: '$' without a macro name")
            return self._lex(src)
        val = self.macros.get(mname)
        if val is None:
            self.errors.add(f"{name}:{line}", f"macro '{mname}' not defined")
            # findeol(): drop the rest of the line, keep the newline.
            while True:
                nxt = self._peekc(src)
                if nxt in ("\n", ""):
                    break
                self._getc(src)
            return self._lex(src)
        self._stack.append(_Source(val, name, line, is_macro=True))
        self._files.append("")
        return self._lex(self._stack[-1]) or self.next()

    def _quoted(self, src: _Source, quote: str, name: str, line: int) -> Token:
        out = []
        while True:
            c = src.text[src.pos] if src.pos < len(src.text) else ""
            src.pos += 1
            if c == "":
                self.errors.add(f"{name}:{line}", "unterminated quoted string")
                return Token(STRING, "".join(out), name, line)
            if c == "\n":
                src.line += 1
                continue
            if c == "\\":
                nxt = src.text[src.pos] if src.pos < len(src.text) else ""
                if nxt in (quote, " ", "\t"):
                    src.pos += 1
                    c = nxt
                elif nxt == "\n":
                    src.pos += 1
                    src.line += 1
                    continue
            elif c == quote:
                return Token(STRING, "".join(out), name, line)
            elif c == "\0":
                self.errors.add(f"{name}:{line}", "syntax error: NUL in quoted string")
                continue
            out.append(c)


def _allowed_in_word(c: str, punct: frozenset[str] = PUNCT_CHARS) -> bool:
    if c.isalnum():
        return True
    return c.isprintable() and not c.isspace() and c not in punct \
        and c not in "#'\"" and ord(c) > 32
