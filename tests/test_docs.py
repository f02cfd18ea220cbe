"""
The documentation: ``README.md`` and ``docs/*.md``.

- every option ``twistd octoplex --help`` lists, and every key of the config
  file, has its row in ``docs/configuration.md``'s table, with the right key
  and default, and no row names an option that does not exist;
- every relative link, and every anchor (``page.md#anchor``, ``#anchor``),
  in those pages and the READMEs of ``bench/`` and ``deploy/``, resolves:
  the file exists and the anchor is a heading's, by GitHub's slug rules;
  absolute ``http(s)`` links are not fetched;
- each page of ``docs/`` opens with a table of contents of its ``##`` and
  ``###`` headings;
- the README gives the test command that CI runs, verbatim.

No socket and no subprocess: the options are read from
:class:`octoplex.tap.Options` itself.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from twisted.python import reflect

from octoplex.config import KEYS
from octoplex.tap import Options

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
#: The pages whose links are checked: the README, docs/, and the READMEs of
#: bench/ and deploy/, which link into docs/.
PAGES = [
    README,
    *sorted(DOCS.glob("*.md")),
    *sorted((ROOT / "bench").glob("*.md")),
    *sorted((ROOT / "deploy").rglob("*.md")),
]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")


# -- reading Markdown --------------------------------------------------------


def prose_lines(text: str) -> list[tuple[int, str]]:
    """
    The lines of ``text`` outside fenced code blocks, with their numbers
    (from 1).
    """
    lines = []
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """
    The anchor GitHub gives a heading's text: its links reduced to their
    text, backticks dropped, lowercased, every character but letters,
    digits, ``_``, ``-`` and spaces removed, and each space made a hyphen.
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str, str]]:
    """
    Every heading of ``text`` outside code blocks: its level, its text and
    its anchor, a repeated anchor numbered ``-1``, ``-2`` ... as GitHub does.
    """
    seen: Counter[str] = Counter()
    found = []
    for _, line in prose_lines(text):
        match = _HEADING.match(line)
        if match is None:
            continue
        slug = github_slug(match.group(2))
        anchor = slug if not seen[slug] else f"{slug}-{seen[slug]}"
        seen[slug] += 1
        found.append((len(match.group(1)), match.group(2), anchor))
    return found


def links(text: str) -> list[tuple[int, str]]:
    """
    Every link target of ``text`` (images included) outside code, with its
    line number.
    """
    return [
        (number, target)
        for number, line in prose_lines(text)
        for target in _LINK.findall(_INLINE_CODE.sub("", line))
    ]


def broken_links(page: Path) -> list[str]:
    """
    What is wrong with each relative link of ``page``, as ``PAGE:LINE:
    TARGET: why``; absolute http(s) and mailto links are taken as they are.
    """
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        if re.match(r"(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        where = page if not path else (page.parent / path).resolve()
        why = None
        if not where.exists():
            why = f"no such file {where}"
        elif anchor and where.suffix != ".md":
            why = f"an anchor into {where.name}, which is not Markdown"
        elif anchor:
            anchors = {a for _, _, a in headings(where.read_text(encoding="utf-8"))}
            if anchor not in anchors:
                why = f"{where.name} has no heading whose anchor is #{anchor}"
        if why is not None:
            problems.append(f"{page.name}:{number}: {target}: {why}")
    return problems


# -- reading the options -----------------------------------------------------


def declared_options() -> set[str]:
    """
    The long options :class:`octoplex.tap.Options` declares, inherited ones
    included: its ``optParameters`` and ``optFlags``, and an ``opt_*``
    method each (``opt_listen_tls`` is ``--listen-tls``), as usage.Options
    reads them.
    """
    declared: list[list[object]] = []
    reflect.accumulateClassList(Options, "optParameters", declared)
    reflect.accumulateClassList(Options, "optFlags", declared)
    names = {str(entry[0]) for entry in declared}
    methods = reflect.prefixedMethodNames(Options, "opt_")
    return names | {name.replace("_", "-") for name in methods}


def help_options() -> set[str]:
    """
    The long options ``--help`` prints, read from its text (an option line
    starts ``  -x, --name`` or ``      --name``; a wrapped description is
    indented further).
    """
    usage = Options().getUsage()
    return set(re.findall(r"^  (?:-\w, |    )--([a-z][a-z0-9-]*)", usage, re.M))


def configuration_rows() -> dict[str, list[str]]:
    """
    The rows of ``docs/configuration.md``'s options table by option name:
    option, config key, default and meaning.
    """
    rows: dict[str, list[str]] = {}
    for _, line in prose_lines(CONFIGURATION.read_text(encoding="utf-8")):
        match = re.match(r"\| `--([a-z][a-z0-9-]*)", line)
        if match is None:
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 4, f"a row of four cells: {line}"
        assert match.group(1) not in rows, f"--{match.group(1)} has two rows"
        rows[match.group(1)] = cells
    return rows


def shown(default: object) -> str:
    """A default as the table writes it: ``10`` for 10.0."""
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


# -- the tests ---------------------------------------------------------------


def test_help_lists_the_declared_options() -> None:
    """What --help lists is what Options declares, so the docs are held to either."""
    assert help_options() == declared_options()
    # Each way of declaring an option is represented, so neither reading
    # can pass by finding nothing.
    assert {"max-batch-size", "log-file", "listen", "help", "version"} <= declared_options()


def test_every_option_has_its_row() -> None:
    """Every option --help lists has a row in docs/configuration.md, and every row an option."""
    rows = configuration_rows()
    options = declared_options()
    assert sorted(options - set(rows)) == [], "options missing from docs/configuration.md"
    assert sorted(set(rows) - options) == [], "rows for options that do not exist"


def test_every_config_key_is_in_its_options_row() -> None:
    """Each option's row names its config key, or none when it has none."""
    rows = configuration_rows()
    keys = {key.option: f"`[{key.section}] {key.name}`" for key in KEYS}
    for option, (_, key, _, _) in rows.items():
        assert key == keys.get(option, "none"), f"--{option}"


def test_the_defaults_are_the_options_defaults() -> None:
    """Each row's default shows the option's own, where the option has a fixed one."""
    rows = configuration_rows()
    parameters: list[list[object]] = []
    reflect.accumulateClassList(Options, "optParameters", parameters)
    for name, _, default, *_ in parameters:
        # The memory budget's default is computed from the machine's memory.
        if default is None or name == "max-buffered-bytes":
            continue
        cell = rows[str(name)][2]
        first = re.match(r"`?([^`\s,]*)", cell)
        assert first is not None and first.group(1) == shown(default), f"--{name}: {cell}"


def test_github_slugs() -> None:
    """Headings get GitHub's anchors: punctuation and backticks gone, spaces hyphens."""
    assert github_slug("Load shedding and a client's share") == "load-shedding-and-a-clients-share"
    assert github_slug("`POST /multiplex`") == "post-multiplex"
    assert github_slug("gRPC against HTTP/JSON, and the asyncio reactor") == (
        "grpc-against-httpjson-and-the-asyncio-reactor"
    )
    assert github_slug("Twisted's `ssl:` and `tls:` endpoints") == "twisteds-ssl-and-tls-endpoints"
    assert github_slug("max_parallel and [links](x.md)") == "max_parallel-and-links"
    text = "# A\n## Notes\n```sh\n# not a heading\n```\n## Notes\n### Notes\n"
    assert [anchor for _, _, anchor in headings(text)] == ["a", "notes", "notes-1", "notes-2"]


def test_broken_links_are_reported(tmp_path: Path) -> None:
    """A missing file, a missing anchor and a missing own anchor are reported; good links not."""
    (tmp_path / "b.md").write_text("# B\n\n## Part two\n")
    (tmp_path / "a.md").write_text(
        "# A\n\n## Part one\n\n"
        "[good](b.md#part-two), [also good](#part-one), [web](https://example.com/#x),\n"
        "[no file](c.md), [no anchor](b.md#part-three), [no own anchor](#part-1).\n"
        "`[in code](d.md)` is not a link.\n\n```md\n[nor in a block](e.md)\n```\n"
    )
    problems = broken_links(tmp_path / "a.md")
    assert [problem.split(": ")[1] for problem in problems] == [
        "c.md",
        "b.md#part-three",
        "#part-1",
    ], problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    """Every relative link and anchor of the page points at a file and heading that exist."""
    assert broken_links(page) == []


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda page: page.name)
def test_each_page_opens_with_its_contents(page: Path) -> None:
    """Before its first ## heading, the page lists a link to each ## and ### heading, nested."""
    text = page.read_text(encoding="utf-8")
    wanted = [
        ("  " * (level - 2), anchor) for level, _, anchor in headings(text) if level in (2, 3)
    ]
    top = text.split("\n## ", 1)[0]
    contents = re.findall(r"^( *)- \[[^\]]+\]\(#([^)]+)\)$", top, re.M)
    assert wanted and contents == wanted


def test_the_readme_gives_cis_test_command() -> None:
    """The README's test command is the one .ci/run runs, character for character."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = [line for line in ci.splitlines() if line.startswith("python3 -m venv .tox-venv")]
    assert len(command) == 1
    assert f"```sh\n{command[0]}\n```" in README.read_text(encoding="utf-8")
