"""The figures that README.md and docs/*.md quote are the figures of committed result files.

Every markdown table of figures (a table with a body cell that is a number, or holds a decimal number)
must have, on the last non-blank line before it or the first non-blank line after it, a line

    Source: `<command>` → <result file>[, <result file> ...]

naming the command that produced the figures and the committed file(s) holding them (repository-relative
paths; ``->`` is accepted for ``→``). Every number in the table's body cells (code spans excepted) must occur
among the numbers of those files after rounding to the decimals shown: "+1.3" matches 0.0134 x 100 or
"1.3", "2.570" matches 2.569708, "2^16" is 65536. A JSON file's numbers count as written and times 100
(fractions shown as percentages). A cell "m [lo, hi]" (a mean and its interval) must moreover match three
consecutive numbers of the file, so that a figure cannot borrow its digits from another row.

Also: every relative link in those files points at a file or folder of the repository, and README.md stays a
guide (at most 350 lines). Fast (well under a second): no torch import.
"""
from __future__ import annotations

import bisect
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 350
#: docs/*.md that are not checked for Source lines, and why (links are still checked)
NOT_RESULTS = {
    "docs/KERNEL_NOTES.md": "its tables are predictions from bytes and flops written before the GPU run, "
                            "not measurements; the measurements are in bench/RESULTS.md",
}

# a number not glued to a word or to another number: "+1.3", "-0.7", "2.570", "3.44e-09", "2^16";
# "noise0.3", "ring8", "2.13.0" (a version) and "fp32" give none
NUMBER = re.compile(
    r"(?:(?<![A-Za-z0-9_.)\]])(?P<sign>[+-]))?(?<![A-Za-z0-9_.])"
    r"(?P<int>\d+)(?:\.(?P<frac>\d+))?(?:[eE](?P<exp>[+-]?\d+))?(?:\^(?P<pow>\d+))?"
    r"(?![\d.]\d|\d)"
)
SOURCE = re.compile(r"^Source: `(?P<cmd>[^`]+)` (?:→|->) (?P<files>[^\s,]+(?:, [^\s,]+)*)\.?\s*$")
INTERVAL = re.compile(r"^\s*(?P<m>[+-]?[\d.eE+-]+)\s*%?\s*\[\s*(?P<lo>[+-]?[\d.eE+-]+)\s*,\s*(?P<hi>[+-]?[\d.eE+-]+)\s*\]")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


@dataclass(frozen=True)
class Figure:
    text: str
    value: float
    tol: float  # half a unit of the last digit shown

    def matches(self, x: float) -> bool:
        return abs(x - self.value) <= self.tol * (1 + 1e-9) + 1e-15


def figures(text: str) -> list:
    out = []
    for m in NUMBER.finditer(text):
        sign, digits, frac, exp, pw = m["sign"] or "", m["int"], m["frac"] or "", m["exp"], m["pow"]
        if pw is not None:
            out.append(Figure(m[0], float(int(digits) ** int(pw)) * (-1 if sign == "-" else 1), 0.5))
            continue
        value = float(f"{sign}{digits}.{frac or '0'}e{exp or 0}")
        out.append(Figure(m[0], value, 0.5 * 10.0 ** (int(exp or 0) - len(frac))))
    return out


class SourceNumbers:
    """The numbers of one result file, in file order, with a sorted index for look-ups."""

    def __init__(self, path: Path):
        text = path.read_text()
        if path.suffix == ".json":
            seq = []
            self._walk(json.loads(text), seq)
            self.scales = (1.0, 100.0)
        else:
            seq = [f.value for f in figures(text)]
            self.scales = (1.0,)
        self.seq = seq
        self.index = {s: sorted((x * s, i) for i, x in enumerate(seq)) for s in self.scales}

    def _walk(self, node, seq):
        if isinstance(node, bool) or node is None:
            return
        if isinstance(node, (int, float)):
            seq.append(float(node))
        elif isinstance(node, str):
            seq.extend(f.value for f in figures(node))
        elif isinstance(node, dict):
            for v in node.values():
                self._walk(v, seq)
        elif isinstance(node, list):
            for v in node:
                self._walk(v, seq)

    def _positions(self, fig: Figure, scale: float):
        idx = self.index[scale]
        lo = bisect.bisect_left(idx, (fig.value - 2 * fig.tol - 1e-12, -1))
        for x, i in idx[lo:]:
            if x > fig.value + 2 * fig.tol + 1e-12:
                break
            if fig.matches(x):
                yield i

    def contains(self, fig: Figure) -> bool:
        return any(True for s in self.scales for _ in self._positions(fig, s))

    def contains_run(self, figs: list) -> bool:
        """Whether the figures occur as consecutive numbers of the file (one scale for all)."""
        for s in self.scales:
            for i in self._positions(figs[0], s):
                if i + len(figs) <= len(self.seq) and all(
                        f.matches(self.seq[i + j] * s) for j, f in enumerate(figs)):
                    return True
        return False


_SOURCES: dict = {}


def source_numbers(rel: str) -> SourceNumbers:
    if rel not in _SOURCES:
        _SOURCES[rel] = SourceNumbers(ROOT / rel)
    return _SOURCES[rel]


def split_cells(line: str) -> list:
    """The cells of a table row; a '|' inside a code span or escaped does not split."""
    cells, cur, code = [], [], False
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] == "|":
            cur.append("|")
            i += 2
            continue
        if c == "`":
            code = not code
        if c == "|" and not code:
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        cells.append("".join(cur).strip())
    return cells


@dataclass
class Table:
    start: int  # line index of the header
    end: int  # line index after the last row
    body: list  # rows of cells


def tables(lines: list) -> list:
    out, i, fence = [], 0, False
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fence = not fence
            i += 1
            continue
        if (not fence and lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                and SEPARATOR.match(lines[i + 1])):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(Table(i, j, [split_cells(row) for row in lines[i + 2:j]]))
            i = j
            continue
        i += 1
    return out


def plain(cell: str) -> str:
    """A cell without code spans and emphasis."""
    return re.sub(r"`[^`]*`", " ", cell).replace("**", "").replace("__", "")


def is_figure_cell(cell: str) -> bool:
    c = plain(cell).strip()
    return bool(re.search(r"\d\.\d", c) or re.fullmatch(r"[+-]?\d[\d,]*(\.\d+)?\s*(%|x|ms|s|MB|GB)?", c))


def source_line(lines: list, table: Table):
    before = next((lines[k] for k in range(table.start - 1, -1, -1) if lines[k].strip()), "")
    after = next((lines[k] for k in range(table.end, len(lines)) if lines[k].strip()), "")
    for line in (before, after):
        m = SOURCE.match(line.strip())
        if m:
            return m
    return None


def command_problem(cmd: str):
    """Why ``cmd`` does not name something in the repository (None when it does)."""
    words = cmd.split()
    if len(words) >= 3 and words[0] == "python" and words[1] == "-m":
        mod = ROOT.joinpath(*words[2].split("."))
        if (mod / "__init__.py").exists() or (mod / "__main__.py").exists() or mod.with_suffix(".py").exists():
            return None
        return f"module {words[2]} not in the repository"
    if len(words) >= 2 and words[0] in ("bash", "python"):
        return None if (ROOT / words[1]).is_file() else f"{words[1]} not in the repository"
    return "the command must be `python -m <module> ...`, `python <script> ...` or `bash <script> ...`"


def _tracked() -> set | None:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


def check_figures(text: str, label: str, tracked: set | None = None) -> list:
    """Problems with the tables of figures of one markdown text (``label`` names it in the messages)."""
    problems = []
    lines = text.splitlines()
    for t in tables(lines):
        if not any(is_figure_cell(c) for row in t.body for c in row):
            continue
        where = f"{label}:{t.start + 1}"
        m = source_line(lines, t)
        if m is None:
            problems.append(f"{where}: a table of figures without a 'Source: `command` → file' line")
            continue
        bad_cmd = command_problem(m["cmd"])
        if bad_cmd:
            problems.append(f"{where}: Source command `{m['cmd']}`: {bad_cmd}")
        files = m["files"].split(", ")
        missing = [f for f in files if not (ROOT / f).is_file()]
        untracked = [f for f in files if tracked is not None and f not in missing and f not in tracked]
        if missing or untracked:
            problems += [f"{where}: Source file {f} does not exist" for f in missing]
            problems += [f"{where}: Source file {f} is not committed" for f in untracked]
            continue
        sources = [source_numbers(f) for f in files]
        for r, row in enumerate(t.body):
            for cell in row:
                c = plain(cell)
                for fig in figures(c):
                    if not any(s.contains(fig) for s in sources):
                        problems.append(f"{where} row {r + 1}: {fig.text!r} (in {cell!r}) is not in {', '.join(files)}")
                iv = INTERVAL.match(c)
                if iv:
                    run = [figures(iv[k])[0] for k in ("m", "lo", "hi")]
                    if all(any(s.contains(f) for s in sources) for f in run) and not any(
                            s.contains_run(run) for s in sources):
                        problems.append(f"{where} row {r + 1}: {cell!r}: no mean with this interval in "
                                        f"{', '.join(files)}")
    return problems


def link_problems(text: str, doc: Path) -> list:
    problems = []
    in_fence = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            path = target.split("#", 1)[0]
            resolved = (doc.parent / path).resolve()
            label = f"{doc.relative_to(ROOT)}:{n}"
            if path.startswith("/") or ROOT not in (resolved, *resolved.parents):
                problems.append(f"{label}: link {target} points outside the repository")
            elif not resolved.exists():
                problems.append(f"{label}: link {target} does not exist")
    return problems


def documents() -> list:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_table_of_figures_names_its_source_and_its_figures_are_in_it():
    tracked = _tracked()
    problems = []
    for doc in documents():
        rel = doc.relative_to(ROOT).as_posix()
        if rel not in NOT_RESULTS:
            problems += check_figures(doc.read_text(), rel, tracked)
    assert not problems, "\n".join(problems)


def test_relative_links_point_into_the_repository():
    problems = [p for doc in documents() for p in link_problems(doc.read_text(), doc)]
    assert not problems, "\n".join(problems)


def test_readme_is_a_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    assert "## Set-up" in lines


# -- the checker itself -----------------------------------------------------------------------------


def _first_checked_table(text: str):
    lines = text.splitlines()
    for t in tables(lines):
        if any(is_figure_cell(c) for row in t.body for c in row) and source_line(lines, t):
            return lines, t
    raise AssertionError("no table of figures with a Source line")


def test_checker_reports_a_changed_figure():
    """Change one digit of one figure of docs/EVIDENCE.md in memory: the checker must name it."""
    text = (ROOT / "docs" / "EVIDENCE.md").read_text()
    assert check_figures(text, "EVIDENCE.md") == []
    lines, t = _first_checked_table(text)
    files = source_line(lines, t)["files"].split(", ")
    sources = [source_numbers(f) for f in files]
    for k in range(t.start + 2, t.end):
        for m in NUMBER.finditer(lines[k]):
            if "." not in m[0]:
                continue
            for digit in "0123456789":
                new = m[0][:-1] + digit
                if new == m[0] or any(s.contains(figures(new)[0]) for s in sources):
                    continue
                mutated = lines[:k] + [lines[k][:m.start()] + new + lines[k][m.end():]] + lines[k + 1:]
                problems = check_figures("\n".join(mutated), "EVIDENCE.md")
                assert any(repr(new) in p for p in problems), problems
                return
    raise AssertionError("no figure could be changed into one the source lacks")


def test_checker_reports_a_mean_with_another_rows_interval():
    """Give one row's mean another row's interval (same table): every number still occurs in the file, the
    pairing does not."""
    lines = (ROOT / "docs" / "EVIDENCE.md").read_text().splitlines()
    _, t = _first_checked_table("\n".join(lines))
    cells = [(k, m) for k in range(t.start + 2, t.end) for m in re.finditer(r"(\d+\.\d+) (\[[^\]]+\])", lines[k])]
    (k1, m1), (_, m2) = next((a, b) for a, b in zip(cells, cells[1:]) if a[1][2] != b[1][2])
    lines[k1] = lines[k1][:m1.start(2)] + m2[2] + lines[k1][m1.end(2):]
    problems = check_figures("\n".join(lines), "EVIDENCE.md")
    assert any(f"EVIDENCE.md:{t.start + 1} row {k1 - t.start - 1}" in p and "no mean with this interval" in p
               for p in problems), problems


def test_checker_reports_a_table_without_source_and_a_missing_file():
    # a figure the committed summary does contain: the last cell of its first table row
    row = next(line for line in (ROOT / "docs/bench_cpu/summary.md").read_text().splitlines()
               if line.startswith("| ") and line[2:3].isalpha() and "---" not in line and "op |" not in line)
    figure = row.strip("| ").split("|")[-1].strip()
    table = f"| method | ms |\n|---|---|\n| erm | {figure} |\n"
    assert any("without a 'Source" in p for p in check_figures("Step times:\n\n" + table, "x.md"))
    sourced = table + "\nSource: `python -m bench --quick --out docs/bench_cpu` → docs/bench_cpu/summary.md\n"
    assert check_figures(sourced, "x.md") == []
    assert any("does not exist" in p for p in check_figures(sourced.replace("summary.md", "nothing.md"), "x.md"))
    assert any("not in the repository" in p for p in check_figures(sourced.replace("bench --quick", "benchx"), "x.md"))
    # a table of words is not a table of figures
    assert check_figures("| backend | where |\n|---|---|\n| `torch` | any device |\n", "x.md") == []


def test_checker_reports_a_broken_link():
    doc = ROOT / "README.md"
    assert link_problems("[ok](docs/DESIGN.md) [url](https://example.org/x)", doc) == []
    assert link_problems("[gone](docs/NO_SUCH_FILE.md)", doc)
    assert link_problems("[out](../elsewhere/file.md)", doc)


@pytest.mark.parametrize("text, values", [
    ("+1.3 [0.4, 2.2]", [1.3, 0.4, 2.2]),
    ("**-1.3 [-2.0, -0.7]**", [-1.3, -2.0, -0.7]),
    ("4.6 (1.00x) 0.63-0.78 93.6%", [4.6, 1.0, 0.63, 0.78, 93.6]),
    ("3.44e-09 2^16 noise0.3 ring8 torch 2.13.0", [3.44e-09, 65536.0]),
])
def test_number_parsing(text, values):
    assert [f.value for f in figures(text)] == pytest.approx(values)
