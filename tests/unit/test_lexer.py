"""shared.lexer and shared.parser: the OpenBSD config dialect, grammar-free."""

from __future__ import annotations

import pytest

from shared.lexer import EOF, NL, NUMBER, PUNCT, STRING, WORD, Errors, Lexer, Macros, \
    parse_cmdline_macro
from shared.parser import Parser


def toks(text: str, macros: dict[str, str] | None = None):
    errs = Errors()
    lx = Lexer(errs, Macros(macros))
    lx.push_text(text, "t.conf")
    out = []
    while True:
        t = lx.next()
        if t.kind == EOF:
            break
        out.append((t.kind, t.value) if t.kind != NL else (NL,))
    return out, errs.lines


def test_words_strings_numbers_punct():
    out, errs = toks('server "a b" { listen on 127.0.0.1 port 80 }\n')
    assert out == [(WORD, "server"), (STRING, "a b"), (PUNCT, "{"), (WORD, "listen"),
                   (WORD, "on"), (WORD, "127.0.0.1"), (WORD, "port"), (NUMBER, 80),
                   (PUNCT, "}"), (NL,)]
    assert errs == []


def test_single_quotes_and_escapes():
    out, _ = toks("'it''s' \"a\\\"b\" \"c\\ d\"\n")
    assert out[:3] == [(STRING, "it"), (STRING, "s"), (STRING, 'a"b')]
    assert out[3] == (STRING, "c d")


def test_comment_and_continuation():
    out, _ = toks("a \\\n b # comment \\\n c\nd\n")
    # the comment ends in a backslash: it swallows the next line (OpenBSD)
    assert out == [(WORD, "a"), (WORD, "b"), (NL,), (WORD, "d"), (NL,)]


def test_negative_and_not_numbers():
    out, _ = toks("-5 5x 10/8 1.2.3.4\n")
    assert out[:5] == [(NUMBER, -5), (WORD, "5x"), (NUMBER, 10), (PUNCT, "/"), (NUMBER, 8)]
    assert out[5] == (WORD, "1.2.3.4")


def test_macro_expands_to_several_tokens():
    out, errs = toks("listen on $ext port 80\n", {"ext": "127.0.0.1 tls"})
    assert out[:4] == [(WORD, "listen"), (WORD, "on"), (WORD, "127.0.0.1"), (WORD, "tls")]
    assert errs == []


def test_macro_not_expanded_in_quotes():
    out, _ = toks('"$x"\n', {"x": "y"})
    assert out[0] == (STRING, "$x")


def test_undefined_macro_is_an_error_with_line():
    _, errs = toks("a\nb $nope c\n")
    assert errs == ["t.conf:2: macro 'nope' not defined"]


def test_unterminated_quote():
    _, errs = toks('a "b\n')
    assert errs and errs[0].startswith("t.conf:1: unterminated")


def test_cmdline_macro_parsing():
    assert parse_cmdline_macro("a=b=c") == ("a", "b=c")
    with pytest.raises(ValueError):
        parse_cmdline_macro("novalue")


class Tiny(Parser):
    """A two-statement grammar to exercise the helpers."""
    KEYWORDS = frozenset({"set", "block", "include"})

    def __init__(self, *a, **kw):
        self.values: dict[str, object] = {}
        super().__init__(*a, **kw)

    def statement(self):
        if self.accept("set"):
            name = self.string("name")
            self.values[name] = self.number("value", 0, 100)
        elif self.accept("block"):
            items = []
            self.block(lambda: items.append(self.string()))
            self.values["block"] = items
        else:
            raise self.syntax_error()

    def run(self):
        self.top_level(self.statement)
        self.finish()
        return self.values


def test_parser_collects_every_error():
    p = Tiny("x.conf", text="set a 5\nset b 500\nbogus\nset c 7\n")
    with pytest.raises(Exception) as ei:
        p.run()
    assert ei.value.lines == ["x.conf:2: invalid value: 500 (must be 0..100)",
                              'x.conf:3: syntax error: unexpected "bogus"']
    assert p.values == {"a": 5, "c": 7}


def test_parser_blocks_commas_newlines_and_macros():
    p = Tiny("x.conf", text='m = "9"\nset a $m\nblock { x, y\n z }\n')
    assert p.run() == {"a": 9, "block": ["x", "y", "z"]}


def test_cmdline_macro_overrides_file():
    p = Tiny("x.conf", cmdline_macros={"m": "42"}, text='m = "9"\nset a $m\n')
    assert p.run() == {"a": 42}


def test_keyword_cannot_be_a_macro_name():
    p = Tiny("x.conf", text='set = "1"\n')
    with pytest.raises(Exception) as ei:
        p.run()
    assert ei.value.lines[0].startswith("x.conf:1: ")


def test_include_nested(tmp_path):
    (tmp_path / "b.conf").write_text("set b 2\n")
    (tmp_path / "a.conf").write_text(f'include "{tmp_path}/b.conf"\nset a 1')
    main = tmp_path / "main.conf"
    main.write_text(f'include "{tmp_path}/a.conf"\nset c 3\n')
    assert Tiny(str(main)).run() == {"b": 2, "a": 1, "c": 3}


def test_include_loop_and_missing(tmp_path):
    loop = tmp_path / "loop.conf"
    loop.write_text(f'include "{loop}"\n')
    with pytest.raises(Exception) as ei:
        Tiny(str(loop)).run()
    assert "include loop" in ei.value.lines[0]
    with pytest.raises(Exception) as ei:
        Tiny("m.conf", text=f'include "{tmp_path}/missing.conf"\n').run()
    assert ei.value.lines[0].startswith("m.conf:1: cannot open")
