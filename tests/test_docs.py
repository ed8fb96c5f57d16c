"""README.md and docs/: every relative link and image resolves to a file that exists, every
#anchor to a heading of its target (GitHub's rule), every docs page is linked from README and
links back, README stays a first page (under 15,000 bytes), and every flag of the three trainers
is named in docs/training.md."""
import argparse
import re

import pytest

from conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_LIMIT = 15_000  # bytes: a first page that a student reads in five minutes

FENCE = re.compile(r"^```.*?^```", re.S | re.M)  # fenced code blocks: their brackets are code
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), ![alt](target)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as rendered (no code marks, emphasis or link
    targets), lowercase, punctuation dropped except '-' and '_', each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps only its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())  # \w keeps letters and digits of any script
    return text.replace(" ", "-")


def anchors(path) -> set:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        anchor = github_anchor(heading)
        if anchor in seen:
            seen[anchor] += 1
            anchor = f"{anchor}-{seen[anchor]}"
        else:
            seen[anchor] = 0
        found.add(anchor)
    return found


def relative_links(path) -> list:
    """The link and image targets of a markdown file that point inside the repository."""
    text = INLINE_CODE.sub("code", FENCE.sub("", path.read_text()))
    targets = LINK.findall(text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:


def broken_links(path) -> list:
    """Each relative link of `path` whose file, or whose #anchor in that file, does not exist."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{path.name}: {target} (no heading #{anchor} in {linked.name})")
    return broken


def test_github_anchor_rule():
    # Anchors as GitHub renders them for headings of this README and docs
    assert github_anchor("The scripts (the paper's Table 1)") == "the-scripts-the-papers-table-1"
    assert github_anchor("model.py") == "modelpy"
    assert github_anchor("Measured, three seeds") == "measured-three-seeds"
    assert github_anchor("See a run: `plot.py`") == "see-a-run-plotpy"
    assert github_anchor("Past one GPU: DDP and FSDP2") == "past-one-gpu-ddp-and-fsdp2"
    assert github_anchor("The protocol and results.json") == "the-protocol-and-resultsjson"
    assert github_anchor("snake_case and -dash") == "snake_case-and--dash"


def test_the_checker_finds_broken_links(tmp_path):
    # A page with one good link and a broken file, a broken anchor and a broken image
    (tmp_path / "other.md").write_text("# Other page\n\n## A: part\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-part) [self](#page) [web](https://example.com)\n"
                    "[gone](missing.md) [bad anchor](other.md#a_part) ![img](missing.png)\n"
                    "`[in code](nowhere.md)`\n\n```\n[in a block](nowhere.md)\n```\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)",
                                  "page.md: other.md#a_part (no heading #a_part in other.md)",
                                  "page.md: missing.png (no such file)"]


@pytest.mark.parametrize("path", [README] + DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_resolves(path):
    assert relative_links(path), f"{path.name} links nowhere"
    assert broken_links(path) == []


def test_readme_is_a_first_page():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move reference text to docs/"


def test_every_docs_page_is_linked_both_ways():
    linked_from_readme = {t.partition("#")[0] for t in relative_links(README)}
    assert len(DOCS) >= 8  # the reference pages README was split into
    for page in DOCS:
        assert f"docs/{page.name}" in linked_from_readme, f"README does not link {page.name}"
        assert "../README.md" in relative_links(page), f"{page.name} has no link back to README"


class ParserBuilt(Exception):
    """Raised in place of parsing, to hand over a trainer's finished parser."""


@pytest.mark.parametrize("trainer", ["train_sft", "train_rl", "train_distill"])
def test_every_trainer_flag_is_documented(trainer, monkeypatch):
    # Build the trainer's own parser (get_args), stopping it where it would parse the arguments
    def hand_over(parser, args=None, namespace=None):
        raise ParserBuilt(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", hand_over)
    module = __import__(trainer)
    with pytest.raises(ParserBuilt) as built:
        module.get_args([])
    parser = built.value.args[0]
    flags = {f for f in parser._option_string_actions if f.startswith("--") and f != "--help"}
    text = (ROOT / "docs" / "training.md").read_text()
    undocumented = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w])", text))
    assert undocumented == []
