"""The documentation stays navigable and current: every relative link in README.md, docs/*.md and
launch/README.md reaches an existing file (and heading, for a #anchor), docs/layout.md names every
module, config and launch file by its repository path (and no path that does not exist), and the
README stays a front page. Pure text checks: nothing is imported from the project."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "launch" / "README.md", *(ROOT / "docs").glob("*.md")])
LAYOUT = ROOT / "docs" / "layout.md"
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def without_code(text: str) -> str:
    """The text with fenced code blocks blanked (their `# comments` are not headings, their
    brackets not links); line count kept."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text lowercased, every character but letters,
    digits, spaces, hyphens and underscores dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors of a markdown file's headings, with GitHub's -1, -2 for repeated ones."""
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(without_code(path.read_text())):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: pathlib.Path) -> list[str]:
    text = INLINE_CODE.sub("", without_code(path.read_text()))
    return [m.group(1) for m in LINK.finditer(text)]


def broken_links(page: pathlib.Path) -> list[str]:
    """The relative links of `page` (http(s), mailto and other schemes skipped) whose file does
    not exist, or whose #anchor is not a heading of that file (an anchor alone: of `page`)."""
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            bad.append(f"{target}: no file {destination}")
        elif anchor and destination.suffix != ".md":
            bad.append(f"{target}: an anchor into a file that is not markdown")
        elif anchor and anchor not in anchors(destination):
            bad.append(f"{target}: no heading #{anchor} in {destination.name}")
    return bad


def test_the_pages_exist():
    assert (ROOT / "README.md").is_file() and LAYOUT.is_file()
    assert len(PAGES) > 3, PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = broken_links(page)
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(bad)


def test_every_page_starts_with_a_title():
    for page in sorted((ROOT / "docs").glob("*.md")):
        first = page.read_text().lstrip().splitlines()[0]
        assert first.startswith("# "), f"{page.relative_to(ROOT)}: starts with {first!r}, not '# Title'"


def layout_required() -> list[str]:
    """The repository paths docs/layout.md must name: every module of the package but the
    `__init__.py` files, every file in launch/ and configs/."""
    modules = [p for p in (ROOT / "dgae_jax").rglob("*.py") if p.name != "__init__.py"
               and "__pycache__" not in p.parts]
    files = [p for d in ("launch", "configs") for p in (ROOT / d).iterdir()
             if p.is_file() and not p.name.startswith(".")]
    return sorted(str(p.relative_to(ROOT)) for p in modules + files)


def test_layout_names_every_module_config_and_launch_file():
    text = LAYOUT.read_text()
    missing = [path for path in layout_required() if f"`{path}`" not in text]
    assert not missing, ("docs/layout.md does not name (as `path`, the repository path in "
                         "backticks) " + ", ".join(missing))


def test_layout_names_only_files_that_exist():
    text = LAYOUT.read_text()
    named = re.findall(r"`((?:dgae_jax|launch|configs|benchmarks|tests)/[\w./-]*\.\w+)`", text)
    assert named, "docs/layout.md names no repository path"
    stale = sorted({path for path in named if not (ROOT / path).exists()})
    assert not stale, "docs/layout.md names files that do not exist: " + ", ".join(stale)


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference text to docs/")


def test_the_checks_can_fail(tmp_path):
    """The helpers see a broken link, a missing anchor and the GitHub slug rules."""
    page = tmp_path / "page.md"
    page.write_text("# A title: `--mode=sweep` & more\n\n## Same\n\n## Same\n\n"
                    "```bash\n# not a heading [x](nowhere.md)\n```\n"
                    "[ok](#a-title---modesweep--more) [dup](#same-1) [gone](missing.md) "
                    "[web](https://example.com) `[code](nowhere.md)`\n")
    assert anchors(page) == {"a-title---modesweep--more", "same", "same-1"}
    assert links(page) == ["#a-title---modesweep--more", "#same-1", "missing.md",
                           "https://example.com"]
    assert broken_links(page) == [f"missing.md: no file {tmp_path / 'missing.md'}"]
    (tmp_path / "other.md").write_text("# Other\n")
    page.write_text("[a](other.md#other) [b](other.md#nope) [c](#same)\n")
    assert broken_links(page) == ["other.md#nope: no heading #nope in other.md",
                                  "#same: no heading #same in page.md"]
    assert slug("SD-VAE's weights in and out") == "sd-vaes-weights-in-and-out"
    assert slug("(d) Resuming after a preemption") == "d-resuming-after-a-preemption"
