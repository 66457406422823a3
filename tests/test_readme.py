"""The README is the spec: every `peftlab` command it shows parses (its command, options and
arguments exist), and the "One run" block runs as written, in order, on a fresh folder."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from peftlab.cli import app

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Each ```bash block of the README under its section title: its command lines, with
    continuations joined and comments dropped."""
    blocks, title = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            title = lines[i][3:].strip()
        if lines[i].strip() == "```bash":
            body = []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            joined = re.sub(r"\\\n\s*", " ", "\n".join(body))
            commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
            blocks.append((title, [c for c in commands if c]))
        i += 1
    return blocks


def peftlab_args(words: list[str]) -> list[str] | None:
    """The arguments after `peftlab` in a command line (environment settings, `time` and a
    `.venv/bin/` path before it allowed); None for other commands."""
    for k, word in enumerate(words):
        if word.endswith("peftlab") and not word.startswith("-"):
            return words[k + 1:]
        if not (re.match(r"^\w+=", word) or word == "time"):
            return None
    return None


def commands() -> list[tuple[str, list[str]]]:
    readme = (ROOT / "README.md").read_text()
    found = []
    for title, block in bash_blocks(readme):
        for words in block:
            # the first lines: two commands joined by &&
            for part in " ".join(shlex.quote(w) for w in words).split(" '&&' "):
                args = peftlab_args(shlex.split(part))
                if args is not None:
                    found.append((title, args))
    return found


def parse(args: list[str]) -> None:
    """Parse a command line as `peftlab` does, without running it: a usage error (typer's
    click, a TyperException) if a command, option or argument is wrong or missing."""
    group = get_command(app)
    parent = group.context_class(group, info_name="peftlab")
    command = group.get_command(parent, args[0])
    if command is None:
        raise typer.BadParameter(f"no command {args[0]!r}")
    command.make_context(args[0], list(args[1:]), parent=parent)


def test_every_readme_command_parses():
    found = commands()
    assert len(found) >= 12 and {args[0] for _, args in found} >= {
        "run", "report", "train", "eval", "methods", "export"}
    for title, args in found:
        try:
            parse(args)
        except typer.TyperException as e:
            pytest.fail(f"README ({title}): peftlab {shlex.join(args)}: {e}")


def test_the_parse_check_refuses_what_the_cli_refuses():
    for wrong in (["eval", "--runs", "x"], ["export", "runs/x"], ["trian"]):
        with pytest.raises(typer.TyperException):
            parse(wrong)
    parse(["export", "runs/x", "--to", "y"])


@pytest.mark.slow  # seven commands, about a minute
def test_the_one_run_block_runs_as_written_on_a_fresh_folder(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    block = next(b for title, b in bash_blocks((ROOT / "README.md").read_text())
                 if title == "One run")
    peftlab = str(Path(sys.executable).parent / "peftlab")
    for words in block:
        args = peftlab_args(words)
        assert args is not None, words
        done = subprocess.run([peftlab, *args], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ}, timeout=600)
        assert done.returncode == 0, f"peftlab {shlex.join(args)}:\n{done.stdout}{done.stderr}"
    for folder in ("runs/sst2-lora-tiny", "runs/sst2-lora-r4-tiny", "runs/samsum-lora-tiny"):
        assert (tmp_path / folder / "summary.json").is_file()
    assert (tmp_path / "adapters/lora/adapter_config.json").is_file()
    assert (tmp_path / "models/lora-merged/config.json").is_file()
