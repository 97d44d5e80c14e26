"""A small, tolerant CIF 1.1 reader that remembers line numbers.

PETS2 files are simple CIF, but real ones carry CRLF line ends, duplicated scalar tags and
comments between loops, which strict parsers reject. This reader keeps the last value of a
duplicated scalar and records the line of every value so errors can point at it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError


@dataclass
class CifLoop:
    tags: list[str]
    rows: list[list[str]]
    lines: list[int]  # line number of each row's first value

    def column(self, tag: str) -> list[str] | None:
        tag = tag.lower()
        if tag not in self.tags:
            return None
        i = self.tags.index(tag)
        return [r[i] for r in self.rows]


@dataclass
class CifBlock:
    path: str
    values: dict[str, str] = field(default_factory=dict)
    value_lines: dict[str, int] = field(default_factory=dict)
    loops: list[CifLoop] = field(default_factory=list)

    def find_loop(self, tag: str) -> CifLoop | None:
        tag = tag.lower()
        for loop in self.loops:
            if tag in loop.tags:
                return loop
        return None


def _split_line(line: str, path: str, lineno: int) -> list[str]:
    """Tokens of one line by CIF 1.1's rules: whitespace separates; a token opening with ' or " runs
    to the same quote followed by whitespace or the line's end (so it may hold that quote); a bare
    word may hold quotes (O1'); # opens a comment only at the start of a token."""
    out: list[str] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c.isspace():
            i += 1
        elif c == "#":
            break
        elif c in "'\"":
            j = i + 1
            while j < n and not (line[j] == c and (j + 1 == n or line[j + 1].isspace())):
                j += 1
            if j >= n:
                raise InputError(path, f"line {lineno}", f"cannot parse (no closing {c})")
            out.append(line[i + 1:j])
            i = j + 1
        else:
            j = i
            while j < n and not line[j].isspace():
                j += 1
            out.append(line[i:j])
            i = j
    return out


def decoded_text(raw: bytes) -> str:
    """A CIF file's text with its line ends made '\\n' (Windows CRLF, old Mac CR): UTF-16 when it starts
    with that byte-order mark (some Windows editors save so), else UTF-8 (a UTF-8 byte-order mark dropped;
    bytes that are not UTF-8, e.g. Latin-1 in comments, replaced)."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_cif_block(path: str | Path) -> CifBlock:
    """Read the first data block of a CIF file into scalars and loops (tags lower-cased)."""
    path = str(path)
    try:
        text = decoded_text(Path(path).read_bytes())
    except OSError as exc:
        raise InputError(path, "file", f"cannot read ({exc.strerror})") from None
    lines = text.split("\n")

    # Tokenise into (token, line) with text fields as single tokens.
    tokens: list[tuple[str, int, bool]] = []  # (value, line, is_text_field)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(";"):
            start = i + 1
            buf = [line[1:]]
            i += 1
            while i < len(lines) and not lines[i].startswith(";"):
                buf.append(lines[i])
                i += 1
            if i >= len(lines):
                raise InputError(path, f"line {start}", "text field opened with ';' is never closed")
            tokens.append(("\n".join(buf).strip("\n"), start, True))
            i += 1
            continue
        for tok in _split_line(line, path, i + 1):
            tokens.append((tok, i + 1, False))
        i += 1

    block = CifBlock(path=path)
    k = 0
    seen_data = False
    n = len(tokens)
    while k < n:
        tok, ln, is_text = tokens[k]
        low = tok.lower()
        if not is_text and low.startswith("data_"):
            if seen_data:
                break
            seen_data = True
            k += 1
        elif not is_text and low == "loop_":
            k += 1
            tags = []
            while k < n and not tokens[k][2] and tokens[k][0].startswith("_"):
                tags.append(tokens[k][0].lower())
                k += 1
            if not tags:
                raise InputError(path, f"line {ln}", "loop_ without tags")
            vals: list[tuple[str, int]] = []
            while k < n:
                t, l2, txt = tokens[k]
                if not txt and (t.startswith("_") or t.lower() == "loop_" or t.lower().startswith("data_")):
                    break
                vals.append((t, l2))
                k += 1
            if len(vals) % len(tags):
                bad_line = vals[-1][1] if vals else ln
                per_line = Counter(l2 for _, l2 in vals)
                if Counter(per_line.values()).most_common(1)[0][0] == len(tags):  # one row per line (PETS): the short one
                    bad_line = next(l2 for l2, c in per_line.items() if c != len(tags))
                raise InputError(
                    path, f"loop starting line {ln} ({tags[0]})",
                    f"{len(vals)} values do not fill rows of {len(tags)} columns (near line {bad_line})",
                )
            rows, row_lines = [], []
            for r in range(0, len(vals), len(tags)):
                rows.append([v for v, _ in vals[r:r + len(tags)]])
                row_lines.append(vals[r][1])
            block.loops.append(CifLoop(tags, rows, row_lines))
        elif not is_text and tok.startswith("_"):
            if k + 1 >= n:
                raise InputError(path, f"line {ln}", f"tag {tok} has no value")
            val, vln, _ = tokens[k + 1]
            block.values[low] = val  # duplicated scalars: the last one wins
            block.value_lines[low] = vln
            k += 2
        else:
            k += 1  # stray token (e.g. garbage between blocks): ignored
    if not seen_data and not block.values and not block.loops:
        raise InputError(path, "file", "no CIF data found")
    return block
