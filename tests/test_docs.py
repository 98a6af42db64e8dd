"""The documentation stays true: every relative link and image in README.md, CHANGELOG.md and
docs/*.md resolves (files and #anchors), every --flag it names exists, every --mode it names is a mode and
every experiments/*.cfg it names is there."""

from __future__ import annotations

import pathlib
import re

import pytest

import run_experiment
from digits import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
ABSL_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok"}  # defined by absl itself
OTHER_TOOLS_FLAGS = {"nodes", "xla_backend_optimization_level"}  # SLURM's srun (multi-host); XLA's, in XLA_FLAGS

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.I)
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)(?![\w-])")


def prose(text: str) -> str:
    """Markdown without code blocks and code spans (where [x](y) is code, not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return [m.group(1) for pattern in (LINK, REFERENCE, HTML_LINK) for m in pattern.finditer(body)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    found, seen = set(), {}
    for m in re.finditer(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", text), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found.update(re.findall(r"<a\s+(?:name|id)=[\"']([^\"']+)[\"']", text))
    return found


def is_remote(target: str) -> bool:
    return bool(re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)) or target.startswith("//")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    text = page.read_text()
    broken = []
    for target in links(text):
        if is_remote(target):
            continue
        path, _, fragment = target.partition("#")
        path = path.split("?")[0]
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            shown = resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved
            broken.append(f"{target} (no {shown})")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text()):
            broken.append(f"{target} (no heading #{fragment} in {resolved.name})")
    assert not broken, f"{page.name}: broken links: {', '.join(broken)}"


def program_flags() -> set[str]:
    """Every flag of this repository's programs: run_experiment.py's (with renamed aliases) and
    the argparse ones (digits/launch.py, benchmarks/*.py)."""
    names = set(run_experiment.FLAGS) | ABSL_FLAGS
    for source in [*(ROOT / "digits").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        names |= {n.replace("-", "_") for n in re.findall(r"add_argument\(\s*[\"']--([\w-]+)", source.read_text())}
    return names


def test_every_flag_mode_and_flagfile_the_docs_name_exists():
    known = program_flags() | OTHER_TOOLS_FLAGS
    booleans = {name for name in run_experiment.FLAGS if run_experiment.FLAGS[name].boolean}
    missing = []
    for page in PAGES:
        text = page.read_text()
        for name in sorted(set(FLAG.findall(text))):
            if name.endswith("_"):  # a family, "--bench_*": some flag must start with it
                if not any(flag.startswith(name) for flag in known):
                    missing.append(f"{page.name}: --{name}*")
            elif name not in known and not (name.startswith("no") and name[2:] in booleans):
                missing.append(f"{page.name}: --{name}")
        for mode in sorted(set(re.findall(r"--mode[= ]([a-z_]+)", text))):
            if mode not in config_lib.MODES:
                missing.append(f"{page.name}: --mode={mode}")
        for flagfile in sorted(set(re.findall(r"(experiments/[\w.-]+\.cfg)", text))):
            if not (ROOT / flagfile).is_file():
                missing.append(f"{page.name}: {flagfile}")
    assert not missing, f"named in the docs but not in the code: {', '.join(missing)}"


def test_the_checks_find_what_they_look_for():
    """The parsers above on a page with one of everything (so a pass means something)."""
    page = ("# Top: `digits` & co\n## Top: `digits` & co\n[a](x.md#top-digits--co) ![i](img/p.png \"t\")\n"
            "<img src=\"b.png\"> [r]: c.md\n[ok](https://x.org) `[no](code.md)`\n"
            "```sh\n[no](fenced.md) --in_code\n```\n"
            "--epochs=2 --no-deps --l2_per_example --notensorboard --bench_*\n")
    assert sorted(links(page)) == ["b.png", "https://x.org", "img/p.png", "x.md#top-digits--co"]
    assert anchors(page) == {"top-digits--co", "top-digits--co-1"}
    assert FLAG.findall(page) == ["in_code", "epochs", "l2_per_example", "notensorboard", "bench_"]
    assert {"epochs", "l2_per_example", "processes", "port", "flagfile"} <= program_flags()
