"""shared.parser -- recursive-descent helpers for OpenBSD-style grammars.

A daemon's parse module subclasses Parser and writes one method per
statement.  This module gives it the pieces both grammars share: keywords,
strings, numbers, `{ a, b \\n c }` option lists, macro definitions at the top
level, `include`, and error collection: a statement that fails records
`file:line: message`, is skipped to the end of its line and parsing goes on,
so one run reports every problem (OpenBSD's `errors++`).

It does not know any keyword of httpd.conf or relayd.conf.
"""

from __future__ import annotations

import re
import sys
from typing import Callable

from shared.lexer import (EOF, NL, NUMBER, PUNCT, PUNCT_CHARS, STRING, WORD, ConfigError,
                          Errors, Lexer, Macros, Token)

_MACRO_NAME = re.compile(r"[A-Za-z0-9_]+\Z")


class StmtError(Exception):
    """Abandon the current statement; the message is already recorded."""


class Parser:
    """Base of the httpd and relayd grammars."""

    # Reserved words of the grammar; a macro may not be named like one.
    KEYWORDS: frozenset[str] = frozenset()
    # Characters that are tokens of their own (the lexer's default: httpd's).
    PUNCT_CHARS: frozenset[str] = PUNCT_CHARS

    def __init__(self, path: str, cmdline_macros: dict[str, str] | None = None,
                 text: str | None = None, verbose: int = 0) -> None:
        self.path = path
        self.verbose = verbose
        self.errors = Errors()
        self.macros = Macros(cmdline_macros)
        self.lex = Lexer(self.errors, self.macros, self.PUNCT_CHARS)
        if text is not None:
            self.lex.push_text(text, path)
        else:
            self.lex.push_file(path)
        self.tok: Token = self.lex.next()

    @classmethod
    def load_config(cls, path: str, macros: dict[str, str] | None = None,
                    verbose: int = 0, text: str | None = None):
        """Parse `path` (or `text`, named `path`) with this grammar: the
        subclass's parse(), then finish(), which raises ConfigError with
        every `file:line: message`.  Warnings go to stderr either way."""
        p = cls(path, macros, text=text, verbose=verbose)
        try:
            conf = p.parse()
            p.finish()
        finally:
            for line in p.errors.warnings:
                print(line, file=sys.stderr)
        return conf

    # -- token access ------------------------------------------------------
    def next(self) -> Token:
        tok = self.tok
        self.tok = self.lex.next()
        return tok

    def where(self, tok: Token | None = None) -> str:
        return (tok or self.tok).where()

    def error(self, msg: str, tok: Token | None = None) -> StmtError:
        """Record `msg` at `tok` (default: the current token).  Returns the
        exception so callers can `raise self.error(...)`."""
        self.errors.add(self.where(tok), msg)
        return StmtError(msg)

    def warn(self, msg: str, tok: Token | None = None) -> None:
        self.errors.warn(self.where(tok), msg)

    def at(self, *words: str) -> bool:
        """Is the current token one of these keywords (unquoted)?"""
        return self.tok.kind == WORD and self.tok.value in words

    def at_punct(self, ch: str) -> bool:
        return self.tok.kind == PUNCT and self.tok.value == ch

    def at_end(self) -> bool:
        """End of a statement: newline, end of file, `}` or `,`."""
        t = self.tok
        return t.kind in (NL, EOF) or (t.kind == PUNCT and t.value in "},;")

    def accept(self, word: str) -> bool:
        if self.at(word):
            self.next()
            return True
        return False

    def accept_punct(self, ch: str) -> bool:
        if self.at_punct(ch):
            self.next()
            return True
        return False

    def expect(self, word: str) -> Token:
        if not self.at(word):
            raise self.error(f"syntax error: expected \"{word}\", got {self.tok.describe()}")
        return self.next()

    def expect_punct(self, ch: str) -> Token:
        if not self.at_punct(ch):
            raise self.error(f"syntax error: expected '{ch}', got {self.tok.describe()}")
        return self.next()

    def syntax_error(self, what: str = "") -> StmtError:
        got = self.tok.describe()
        return self.error(f"syntax error: unexpected {got}" + (f", expected {what}" if what else ""))

    def string(self, what: str = "string", allow_number: bool = True) -> str:
        """A quoted string, or an unquoted word that is not a keyword."""
        t = self.tok
        if t.kind == STRING or (t.kind == WORD and t.value not in self.KEYWORDS):
            self.next()
            return str(t.value)
        if t.kind == NUMBER and allow_number:
            self.next()
            return str(t.value)
        raise self.syntax_error(what)

    def is_string(self) -> bool:
        t = self.tok
        return t.kind == STRING or (t.kind == WORD and t.value not in self.KEYWORDS)

    def number(self, what: str = "number", lo: int | None = None,
               hi: int | None = None) -> int:
        t = self.tok
        if t.kind == NUMBER:
            val = int(t.value)
        elif t.kind == STRING and re.fullmatch(r"-?\d+", str(t.value)):
            val = int(t.value)
        else:
            raise self.syntax_error(what)
        self.next()
        if (lo is not None and val < lo) or (hi is not None and val > hi):
            rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
            raise self.error(f"invalid {what}: {val} (must be {rng})", t)
        return val

    def skip_newlines(self) -> None:
        while self.tok.kind == NL:
            self.next()

    def end_statement(self) -> None:
        if not self.at_end():
            raise self.syntax_error()

    def recover(self) -> None:
        """Skip the rest of a broken statement, including blocks it opened."""
        depth = 0
        while True:
            t = self.tok
            if t.kind == EOF:
                return
            if t.kind == PUNCT and t.value == "{":
                depth += 1
            elif t.kind == PUNCT and t.value == "}":
                if depth == 0:
                    return
                depth -= 1
                if depth == 0:
                    self.next()
                    if self.tok.kind == NL:
                        return
                    continue
            elif t.kind == NL and depth == 0:
                return
            self.next()

    # -- structure ---------------------------------------------------------
    def guarded(self, fn: Callable[[], None]) -> None:
        """Run one statement; on error skip to its end and carry on."""
        try:
            fn()
            self.end_statement()
        except StmtError:
            self.recover()

    def block(self, item: Callable[[], None], seps: str = ",") -> None:
        """`{ item (sep|newline) item ... }`; each item guarded."""
        self.skip_newlines()
        self.expect_punct("{")
        while True:
            while self.tok.kind == NL or (self.tok.kind == PUNCT and self.tok.value in seps):
                self.next()
            if self.accept_punct("}"):
                return
            if self.tok.kind == EOF:
                raise self.error("syntax error: missing '}'")
            try:
                item()
                if not self.at_end():
                    raise self.syntax_error()
            except StmtError:
                self.recover()

    def options(self, item: Callable[[], None]) -> None:
        """One option inline, or several in braces (httpd's `tcp`, `tls`, ...)."""
        if self.at_punct("{"):
            self.block(item)
        else:
            item()

    def macro_definition(self) -> bool:
        """`name = value` at the top level.  Returns False if not one."""
        if self.tok.kind != WORD:
            return False
        name_tok = self.tok
        nxt = self.lex.next()
        self.lex.unget(nxt)
        if not (nxt.kind == PUNCT and nxt.value == "="):
            return False
        self.next()   # the name
        self.next()   # '='
        if name_tok.value in self.KEYWORDS:
            raise self.error(f"syntax error: cannot use keyword \"{name_tok.value}\" "
                             "as a macro name", name_tok)
        if not _MACRO_NAME.match(str(name_tok.value)):
            raise self.error("macro name cannot contain whitespace or punctuation", name_tok)
        t = self.tok
        if t.kind in (STRING, WORD, NUMBER):
            self.next()
            self.macros.define(str(name_tok.value), str(t.value), name_tok.where())
        else:
            raise self.syntax_error("macro value")
        return True

    def include(self) -> None:
        """`include "file"` (the keyword already seen by the caller)."""
        t = self.tok
        if t.kind != STRING and t.kind != WORD:
            raise self.syntax_error("file name")
        path = str(t.value)
        # Push the file *behind* the statement end: the newline after the
        # include line must not be read from the included file.
        end = self.lex.next()
        if end.kind not in (NL, EOF):
            self.tok = end
            raise self.syntax_error()
        if not self.lex.push_file(path, t.where()):
            self.tok = end
            raise StmtError("include")
        self.tok = self.lex.next()
        # An included file's end yields an NL token of its own; the NL that
        # ended the include line was consumed above, so put one back.
        self.lex.unget(self.tok)
        self.tok = Token(NL, "\n", end.file, end.line)

    def top_level(self, statement: Callable[[], None]) -> None:
        """Drive the whole file: macros, include, and grammar statements."""
        while self.tok.kind != EOF:
            if self.tok.kind == NL:
                self.next()
                continue
            try:
                if self.accept("include"):
                    self.include()
                    continue
                if not self.macro_definition():
                    statement()
                self.end_statement()
            except StmtError:
                self.recover()
                # recover() stops before a `}` that closes no block; at the
                # top level nothing would ever consume it.
                if self.at_punct("}"):
                    self.next()

    def finish(self) -> None:
        """Raise ConfigError with every collected line if anything failed."""
        if self.verbose:
            for name in self.macros.unused():
                self.errors.warn("", f"warning: macro '{name}' not used")
        if self.errors:
            raise ConfigError(self.errors.lines)
