"""The repository's documentation explains itself: every ARCHITECTURES.md section cited exists, nothing cites an
outside document.

Code comments cite ``docs/ARCHITECTURES.md §N.M``; those numbers must be headings of that document, and the
document's own cross-references (bare ``§N.M``) must resolve too. No file may cite the design notes that live
outside the repository.
"""
import re
from pathlib import Path

import pytest

SECTION = "\u00a7"  # the section sign, written as an escape so this file does not match its own patterns
NUMBER = r"\d+(?:\.\d+)*"
#: "ARCHITECTURES.md §0.6", also chains such as "ARCHITECTURES.md §0.6, §6.4" or "§3.2 / §3.4".
CITATION = re.compile(rf"ARCHITECTURES\.md\s*((?:{SECTION}\s*{NUMBER}(?:\s*(?:,|/|;|and|or)\s*)?)+)")
SECTION_NUMBER = re.compile(rf"{SECTION}\s*({NUMBER})")
HEADING = re.compile(rf"^#{{1,6}}\s+({NUMBER})\.?\s+\S", re.MULTILINE)
#: Citations of the design notes kept outside the repository (the shared folder next to the checkout, "the spec").
OUTSIDE_CITATIONS = [
    re.compile(r"\.\./shared"),
    re.compile(r"specs/architectures\.md"),
    re.compile(r"\bspec\s+architectures\.md"),
    re.compile(rf"\bspec(?:'s)?\b[^{SECTION}\n]{{0,30}}{SECTION}"),
]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt", ".cfg", ".toml", ".yaml", ".yml", ".json", ".ini"}
SKIPPED_FOLDERS = {"build", "dist", "__pycache__", "node_modules", "nnunetv2_mamba_demo"}


def checkout_root() -> Path:
    """Return the repository root (the folder with setup.py and docs/)."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "setup.py").is_file() and (folder / "docs").is_dir():
            return folder
    raise AssertionError(f"no repository root above {__file__}")


ROOT = checkout_root()
ARCHITECTURES = ROOT / "docs" / "ARCHITECTURES.md"


def repository_text_files():
    """Return the repository's own text files (not virtual environments, build outputs or git data)."""
    files = []
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        folders = relative.parts[:-1]
        if any(part in SKIPPED_FOLDERS or part.endswith(".egg-info") or (part.startswith(".") and part != ".ci")
               for part in folders):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or folders[:1] == (".ci",)):
            files.append(path)
    return files


def headings() -> set:
    numbers = HEADING.findall(ARCHITECTURES.read_text(encoding="utf-8"))
    duplicates = {number for number in numbers if numbers.count(number) > 1}
    assert not duplicates, f"docs/ARCHITECTURES.md numbers these sections twice: {sorted(duplicates)}"
    return set(numbers)


def cited_sections(text: str) -> list:
    """Return the section numbers cited as ARCHITECTURES.md §N.M (chains included)."""
    return [number for chain in CITATION.findall(text) for number in SECTION_NUMBER.findall(chain)]


def test_the_citation_pattern_reads_chains_and_ignores_trailing_punctuation():
    text = (f"(ARCHITECTURES.md {SECTION}0.6, {SECTION}6.4) and ARCHITECTURES.md {SECTION}4.1. Also "
            f"ARCHITECTURES.md {SECTION}3; not {SECTION}9.9 of the paper.")
    assert cited_sections(text) == ["0.6", "6.4", "4.1", "3"]


def test_every_architectures_citation_is_a_heading():
    sections = headings()
    for required in ("0", "1", "2", "3", "4", "5", "6", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "1.1",
                     "1.2", "1.3", "1.4", "2.1", "2.2", "2.3", "3.1", "3.2", "3.3", "3.4", "4.1", "4.2"):
        assert required in sections, f"docs/ARCHITECTURES.md lacks the heading of section {required}"
    missing, n_citations = [], 0
    for path in repository_text_files():
        for number in cited_sections(path.read_text(encoding="utf-8", errors="replace")):
            n_citations += 1
            if number not in sections:
                missing.append(f"{path.relative_to(ROOT)}: {SECTION}{number}")
    assert n_citations >= 20, f"only {n_citations} ARCHITECTURES.md citations found; is the scan looking at the code?"
    assert not missing, "cited but not a heading of docs/ARCHITECTURES.md: " + "; ".join(missing)


def test_cross_references_inside_architectures_resolve():
    sections = headings()
    text = ARCHITECTURES.read_text(encoding="utf-8")
    body = HEADING.sub("", text)
    unresolved = sorted({number for number in SECTION_NUMBER.findall(body) if number not in sections})
    assert not unresolved, f"docs/ARCHITECTURES.md refers to sections it does not have: {unresolved}"


@pytest.mark.parametrize("document", ["README.md", "docs/DECISIONS.md"])
def test_architectures_is_linked(document):
    text = (ROOT / document).read_text(encoding="utf-8")
    assert re.search(r"\]\((?:docs/)?ARCHITECTURES\.md\)", text), f"{document} does not link docs/ARCHITECTURES.md"


def test_no_file_cites_documents_outside_the_repository():
    offending = []
    for path in repository_text_files():
        for line_number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(pattern.search(line) for pattern in OUTSIDE_CITATIONS):
                offending.append(f"{path.relative_to(ROOT)}:{line_number}: {line.strip()[:100]}")
    assert not offending, "cite docs/ARCHITECTURES.md or the papers instead:\n" + "\n".join(offending)


def test_outside_citation_patterns_catch_the_known_forms():
    samples = ["see .." + "/shared/specs/" + "architectures.md", "(spec " + "architectures.md " + SECTION + "2)",
               "Values from the spec (" + SECTION + "1.3 formula)", "the spec's table (" + SECTION + "2.1)"]
    for sample in samples:
        assert any(pattern.search(sample) for pattern in OUTSIDE_CITATIONS), sample
    fine_samples = ["LoGStageSpec", "spec.map_size", "importlib.util.find_spec(name)", "ARCHITECTURES.md " + SECTION + "2"]
    for fine in fine_samples:
        assert not any(pattern.search(fine) for pattern in OUTSIDE_CITATIONS), fine
