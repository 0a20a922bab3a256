"""README "Comparisons and challenges": every nnU-Net and nnunetv2_mamba command there parses with its own parser."""
import argparse
import importlib.metadata
import re
import shlex
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def section_commands():
    """Return the command lines (continuations joined) of the section's indented code blocks."""
    text = README.read_text()
    section = text[text.index("## Comparisons and challenges"):]
    following = re.search(r"^## ", section[3:], flags=re.MULTILINE)
    section = section[:following.start() + 3] if following else section
    lines, current = [], ""
    for line in section.splitlines():
        if not line.startswith("    "):
            current = ""
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current)
        current = ""
    # "[--flag value]" in a usage line: check the command with every optional part given
    return [re.sub(r"\[(-[^\]]*)\]", r"\1", line).replace("$fold", "0") for line in lines
            if line.startswith(("nnUNetv2_", "nnunetv2_mamba"))]


COMMANDS = section_commands()


class _Parsed(Exception):
    """Raised instead of running the command once its arguments parsed."""


def test_the_section_has_the_commands_the_issue_asks_for():
    names = {shlex.split(line)[0] for line in COMMANDS}
    assert {"nnUNetv2_convert_MSD_dataset", "nnUNetv2_plan_and_preprocess", "nnUNetv2_train",
            "nnUNetv2_find_best_configuration", "nnUNetv2_predict", "nnUNetv2_ensemble",
            "nnUNetv2_apply_postprocessing", "nnUNetv2_export_model_to_zip",
            "nnUNetv2_install_pretrained_model_from_zip", "nnunetv2_mamba"} <= names
    assert any(" compare " in line for line in COMMANDS) and any("cluster slurm" in line for line in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses(line, monkeypatch):
    argv = shlex.split(line, comments=True)
    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert argv[0] in scripts, f"{argv[0]} is not an installed command"
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)  # exits with status 2 on an unknown or malformed argument
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", argv)
    entry = scripts[argv[0]].load()
    with pytest.raises(_Parsed):
        entry(argv[1:]) if argv[0] == "nnunetv2_mamba" else entry()
