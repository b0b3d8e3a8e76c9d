"""Text hygiene: the repository talks about what it does, not about how it was made.

No numbered work items ("issue 13", "#24"), sessions, agents, borrowed machines or files outside the
repository (../shared, GUIDE.md) in the README, docs/, config/, sd2/, workflow/, tests/ or the committed
results' markdown; a machine is named by its hardware, a change by what it does. Links to upstream issues
(a github.com/<owner>/<repo>/issues/<n> URL) are facts about other projects and stay allowed, and so is an
"issue <n>" beside such a URL. The README stays short, every relative link of the README, config/README.md
and docs/ points at a file of the repository (and at a heading of it, for an anchor), and
docs/architecture.md describes exactly the modules of sd2/.
"""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("README.md", "docs", "config", "sd2", "workflow", "tests", "results")
README_MAX_LINES = 300

# (pattern, what it flags); matched case-insensitively, line by line, URLs removed first.
FORBIDDEN = [
    (r"\bissues?\s*#?(\d+)", "a numbered work item"),
    (r"\b(?:pr|pull request|task|ticket)\s*#?\d+", "a numbered work item"),
    (r"(?<![\w&/])#\d{2,5}\b", "a numbered work item"),  # 6 digits: a colour, not an item
    (r"\b(?:this|that|the previous|previous|earlier|next|later|another|other|each|one|a)\s+sessions?\b", "a session"),
    (r"\bsessions'", "a session"),
    (r"(?<!user )(?<!user-)\bagents?\b", "an agent"),
    (r"\bon loan\b|\blent\b|\bborrowed\b", "a lent machine (name it by its hardware)"),
    (r"\.\./shared\b|(?-i:\bGUIDE\b)", "a file outside the repository"),
]
URL = re.compile(r"https?://\S+")
UPSTREAM_ISSUE = re.compile(r"github\.com/[\w.-]+/[\w.-]+/(?:issues|pull|discussions)/(\d+)")


def scanned_files() -> list[Path]:
    """The text files under SCANNED that git tracks or would track (untracked, not ignored); results/: *.md."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SCANNED],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        paths = [REPO / p for p in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked release)
        paths = [p for name in SCANNED for p in ([REPO / name] if name.endswith(".md") else (REPO / name).rglob("*"))]
    keep = []
    for path in paths:
        rel = path.relative_to(REPO)
        if not path.is_file() or path == Path(__file__).resolve() or "__pycache__" in rel.parts:
            continue
        if rel.parts[0] == "results" and path.suffix != ".md":
            continue
        keep.append(path)
    return sorted(keep)


def read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def offences(text: str) -> list[tuple[int, str, str]]:
    """(line number, matched text, what it flags) of every forbidden reference in text."""
    upstream = set(UPSTREAM_ISSUE.findall(text))
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        prose = URL.sub("", line)
        for pattern, what in FORBIDDEN:
            for match in re.finditer(pattern, prose, re.I):
                if match.groups() and match.group(1) in upstream:
                    continue
                found.append((number, match.group(0), what))
    return found


def test_no_references_to_how_the_project_was_made():
    report = []
    for path in scanned_files():
        text = read_text(path)
        if text is None:
            continue
        for number, matched, what in offences(text):
            report.append(f"{path.relative_to(REPO)}:{number}: '{matched}' ({what})")
    assert not report, "name machines by their hardware and changes by what they do:\n" + "\n".join(report)


@pytest.mark.parametrize(
    "line",
    [
        "the aims of the demo models (issue 11)",
        "Issue 13's families: heads for every target",
        "fixed in #24",
        "this session was lent an NVIDIA H200",
        "earlier sessions' attempts",
        "four agents ran beside it",
        "a borrowed GPU",
        "from [GUIDE](../shared/GUIDE.md)",
        "Definitions follow GUIDE section 3",
    ],
)
def test_forbidden_references_are_found(line):
    assert offences(line)


@pytest.mark.parametrize(
    "line",
    [
        "see https://github.com/huggingface/transformers/issues/35000 (transformers issue 35000)",
        'Method("dense", "dense", "draft", "dense", None, False, None, "#7f7f7f")',
        'UNKNOWN_COLOR = "#17becf"',
        '@pytest.fixture(scope="session")',
        "changing the session, so a job on a node without a terminal gets an answer",
        "a 2-core AMD EPYC; one NVIDIA H200",
        "the equivalent layer, silently dropped",
        "a guide to the configuration",
        "[Serving a draft](cluster.md#serving-a-draft-with-vllm)",
    ],
)
def test_legitimate_text_passes(line):
    assert not offences(line)


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img\s[^>]*src=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def link_problems(document: Path) -> list[str]:
    problems = []
    text = FENCE.sub("", document.read_text())
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (document.parent / file_part).resolve() if file_part else document
        where = f"{document.relative_to(REPO)}: {target}"
        if not path.is_relative_to(REPO):
            problems.append(f"{where} leaves the repository")
        elif not path.exists():
            problems.append(f"{where} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{where}: no heading '{anchor}' in {path.relative_to(REPO)}")
    return problems


def test_relative_links_point_at_files_of_the_repository():
    documents = [REPO / "README.md", REPO / "config" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    problems = [problem for document in documents for problem in link_problems(document)]
    assert not problems, "\n".join(problems)


def test_architecture_names_every_module_and_only_those():
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "sd2").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    named = set(re.findall(r"`(sd2/[\w/]+\.py)`", text))
    assert not modules - named, f"docs/architecture.md does not describe {sorted(modules - named)}"
    assert not named - modules, f"docs/architecture.md describes modules that do not exist: {sorted(named - modules)}"
