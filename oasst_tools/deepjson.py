"""A JSON parser without a nesting limit, for the rare line orjson refuses as too deep.

orjson stops at 1,024 levels (a nested tree about 500 messages deep) and the standard library's `json` recurses,
so a deeper tree raises RecursionError there. This parser keeps its open containers on a list: no recursion, no
limit but memory, no C stack to overflow. It accepts what orjson accepts (strict UTF-8, no lone surrogates, no
control characters in strings, one value per line) and is about 20x slower, so readers use it for such lines only:

    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        if not is_depth_error(exc): raise
        record = deepjson.loads(line)

Standard library only.
"""

from __future__ import annotations

import re
from json import JSONDecodeError
from json.decoder import scanstring
from typing import Any

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LITERALS = (("true", True), ("false", False), ("null", None))


def is_depth_error(exc: Exception) -> bool:
    """True when a parser gave up on nesting depth (orjson: "depth limit exceeded"; older: "recursion limit")."""
    text = str(exc).lower()
    return "depth limit" in text or "recursion" in text


def loads(data: bytes | str) -> Any:
    """The value of one JSON document, however deeply nested; raises `json.JSONDecodeError` naming the position."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONDecodeError(f"str is not valid UTF-8 ({exc.reason})", "", exc.start) from None
    else:
        text = data
    ws = _WS.match
    end = len(text)
    pos = ws(text, 0).end()
    # Open containers, innermost last: [list, None] or [dict, key the next value goes under].
    stack: list[list[Any]] = []
    while True:
        char = text[pos:pos + 1]
        if char == "{":
            pos = ws(text, pos + 1).end()
            if text.startswith("}", pos):
                value: Any = {}
                pos += 1
            else:
                key, pos = _key(text, pos)
                stack.append([{}, key])
                continue
        elif char == "[":
            pos = ws(text, pos + 1).end()
            if text.startswith("]", pos):
                value = []
                pos += 1
            else:
                stack.append([[], None])
                continue
        elif char == '"':
            value, pos = _string(text, pos)
        elif (number := _NUMBER.match(text, pos)) is not None:
            fraction, exponent = number.group(1), number.group(2)
            value = float(number.group()) if fraction or exponent else int(number.group())
            pos = number.end()
        else:
            for word, literal in _LITERALS:
                if text.startswith(word, pos):
                    value = literal
                    pos += len(word)
                    break
            else:
                raise JSONDecodeError("Expecting value", text, pos)
        # A value is complete: add it to its container, closing every container that ends right after it.
        while True:
            pos = ws(text, pos).end()
            if not stack:
                if pos != end:
                    raise JSONDecodeError("Extra data", text, pos)
                return value
            top = stack[-1]
            container = top[0]
            if type(container) is list:
                container.append(value)
                close = "]"
            else:
                container[top[1]] = value
                close = "}"
            char = text[pos:pos + 1]
            if char == ",":
                pos = ws(text, pos + 1).end()
                if close == "}":
                    top[1], pos = _key(text, pos)
                break
            if char != close:
                raise JSONDecodeError(f"Expecting ',' delimiter or '{close}'", text, pos)
            stack.pop()
            value = container
            pos += 1


def _string(text: str, start: int) -> tuple[str, int]:
    try:
        value, pos = scanstring(text, start + 1, True)
    except JSONDecodeError:
        raise
    except ValueError as exc:  # the C scanner raises plain ValueError for some bad escapes
        raise JSONDecodeError(str(exc), text, start) from None
    if _SURROGATE.search(value):  # orjson refuses them too: they cannot be written back as UTF-8
        raise JSONDecodeError("lone surrogate in string", text, start)
    return value, pos


def _key(text: str, pos: int) -> tuple[str, int]:
    """An object key and its colon, at `pos` (after whitespace); returns the key and the position after ':'."""
    if not text.startswith('"', pos):
        raise JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
    key, pos = _string(text, pos)
    pos = _WS.match(text, pos).end()
    if not text.startswith(":", pos):
        raise JSONDecodeError("Expecting ':' delimiter", text, pos)
    return key, _WS.match(text, pos + 1).end()
