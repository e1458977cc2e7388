"""Every command in the README's shell blocks is run here as written, in order, on the tiny models, or its
comment says why it is not: it needs real weights or a GPU, it takes minutes and is its own check
(`make demo`, `make test`, `make bench`, ...), or it is a multi-process launch that the test it names runs. A README example that drifts from the code fails here.

The commands run in a fresh folder laid out like the checkout (its folders linked, `runs/` its own), so
they build on each other as they do for a reader, and never touch the checkout's `runs/`. Python entry points
run in this process, as their launchers would run them, to spare an interpreter start-up each:
`python -m X` through runpy, `accelerate launch train/cycle.py` as a script (never imported), `make T` as
the commands `make -n` prints for it. The `cycletune` lines are run in tests/test_packaging.py's fresh
virtualenv, against an installed wheel.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cycle_runs import RECIPE, REPO, run_recipe_in_process
from import_graph import NAMESPACE

README = REPO / "README.md"
PACKAGING_TEST = REPO / "tests" / "test_packaging.py"
SHELL_LANGUAGES = frozenset({"bash", "sh", "shell", "console"})
# What a comment says of a command the tests cannot run.
NOT_RUN = re.compile(r"\bneeds (real weights|a GPU|\d+ GPUs)\b|\bminutes\b")
# A multi-process launch this file cannot run in-process, run instead by the test its comment names.
RUN_BY = re.compile(r"\brun by (tests/[\w/]+\.py)\b")
# Small shell tools that make a command's input files: cheap enough to run in a shell of their own.
SHELL_TOOLS = frozenset({"printf", "echo", "mkdir", "cp", "cat", "ls"})
SHELL_SYNTAX = frozenset({">", ">>", "<", "|", "||", "&&", ";", "&"})
ENVIRONMENT_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# The checkout's own folders a reader's commands write into; everything else is linked.
LOCAL = frozenset({"runs", ".git", ".venv"})


@dataclass(frozen=True)
class Command:
    """One command of a shell block: its backslash continuations joined and its comment apart."""

    line: int  # where it starts in the README
    text: str
    note: str  # its trailing comment and the comment lines heading its part of the block

    @property
    def not_run(self) -> bool:
        return NOT_RUN.search(self.note) is not None

    @property
    def run_by(self) -> Path | None:
        match = RUN_BY.search(self.note)
        return None if match is None else REPO / match.group(1)

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) as the shell reads them: `#` starts a comment at the start of a word, outside quotes."""
    quote = ""
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].strip(), line[index + 1 :].strip()
    return line.strip(), ""


def shell_blocks(markdown: str) -> Iterator[list[tuple[int, str]]]:
    """The numbered lines of each fenced block in a shell language."""
    language: str | None = None  # of the open block; None outside blocks
    block: list[tuple[int, str]] = []
    for number, line in enumerate(markdown.splitlines(), start=1):
        fence = re.match(r"^```(\S*)", line)
        if fence and language is None:
            language, block = fence.group(1), []
        elif fence:
            if language in SHELL_LANGUAGES:
                yield block
            language = None
        elif language is not None:
            block.append((number, line))


def commands(markdown: str) -> list[Command]:
    """Every command of the shell blocks, in order. A run of comment lines heads the commands below it, up to
    the next comment line, so one heading can say why a group of commands is not run."""
    found = []
    for block in shell_blocks(markdown):
        heading: list[str] = []
        previous_was_comment = False
        pending: tuple[int, str] | None = None
        for number, line in block:
            if pending is not None:
                start, text = pending
                line = f"{text} {line.strip()}"
                number = start
            if line.rstrip().endswith("\\"):
                pending = (number, line.rstrip()[:-1].rstrip())
                continue
            pending = None
            text, comment = split_comment(line)
            if not text:
                if comment and not line[0].isspace():  # an indented one continues the comment above it
                    heading = [*heading, comment] if previous_was_comment else [comment]
                    previous_was_comment = True
                continue
            previous_was_comment = False
            found.append(Command(number, text, " ".join([*heading, comment])))
    return found


def packaging_commands() -> tuple[str, ...]:
    """The commands tests/test_packaging.py runs in its virtualenv (its README_COMMANDS)."""
    for node in ast.parse(PACKAGING_TEST.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "README_COMMANDS" for target in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{PACKAGING_TEST} has no README_COMMANDS")


@contextlib.contextmanager
def environment_variables(assignments: list[str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(dict(assignment.split("=", 1) for assignment in assignments))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def exit_code(error: SystemExit) -> int:
    return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)


class Reader:
    """Runs commands as a reader in `folder` would, in this process where the command is a Python entry point."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.installed_commands = packaging_commands()

    def run(self, command: Command) -> None:
        """Run `command`; raise AssertionError saying why it failed or cannot be run."""
        words = shlex.split(command.text)
        if words[0] == "cycletune":
            assert command.text in self.installed_commands, (
                f"{command}\nnot run: add it to README_COMMANDS in {PACKAGING_TEST.name}, or say in its "
                "comment why it cannot run"
            )
            return
        if words[0] in SHELL_TOOLS:
            result = subprocess.run(
                ["bash", "-c", command.text], cwd=self.folder, capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, f"{command}\n{result.stderr}"
            return
        self.run_words(words, str(command))

    def run_words(self, words: list[str], origin: str) -> None:
        assignments = [word for word in words if ENVIRONMENT_ASSIGNMENT.match(word)]
        words = words[len(assignments) :] if words[: len(assignments)] == assignments else words
        assert not SHELL_SYNTAX & set(words), f"{origin}\nshell syntax cannot be run in-process"
        with environment_variables(assignments):
            if words[0] == "make":
                for line in self.make_commands(words[1:], origin):
                    self.run_words(line, f"{origin}\n  (make runs: {shlex.join(line)})")
                return
            if words[:2] == ["python", "-m"] or words[:2] == [".venv/bin/python", "-m"]:
                code = self.run_module(words[2], words[3:], origin)
            elif words[:2] == ["accelerate", "launch"]:
                code = self.run_script(words[2], words[3:], origin)
            else:
                raise AssertionError(
                    f"{origin}\nnot run: neither a Python entry point nor a shell tool "
                    f"({', '.join(sorted(SHELL_TOOLS))}); say in its comment why it cannot run"
                )
        assert code == 0, f"{origin}\nexited with {code}"

    def make_commands(self, targets: list[str], origin: str) -> list[list[str]]:
        """What `make TARGETS` runs in a set-up checkout: `make -n`'s lines, the virtualenv taken as made."""
        result = subprocess.run(
            ["make", "--no-print-directory", "-n", "-o", "setup", *targets],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{origin}\n{result.stderr}"
        return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]

    def run_module(self, module: str, argv: list[str], origin: str) -> int:
        """`python -m MODULE ARGV` from the checkout's folder, run as the installed namespace's module
        (the same file: the editable install maps each top folder to cycletune.<folder>)."""
        source = self.folder.joinpath(*module.split("."))
        assert source.with_suffix(".py").is_file() or (source / "__main__.py").is_file(), (
            f"{origin}\nno module {module} in the checkout"
        )
        saved, sys.argv = sys.argv, [module, *argv]
        try:
            runpy.run_module(f"{NAMESPACE}.{module}", run_name="__main__", alter_sys=True)
        except SystemExit as done:
            return exit_code(done)
        finally:
            sys.argv = saved
        return 0

    def run_script(self, script: str, argv: list[str], origin: str) -> int:
        assert not script.startswith("-"), (
            f"{origin}\nlauncher flags: the tests cannot honour them in-process"
        )
        assert (self.folder / script).resolve() == RECIPE, f"{origin}\nonly the recipe is launched in-process"
        return run_recipe_in_process(argv)


def assert_launched_by(command: Command, test_file: Path) -> None:
    """A launch the README says a test runs: that test exists and launches the same accelerate config."""
    words = shlex.split(command.text)
    assert test_file.is_file(), f"{command}\nno test file {test_file.relative_to(REPO)}"
    assert "--config_file" in words, (
        f"{command}\nonly accelerate launches with a --config_file are run elsewhere"
    )
    engine = words[words.index("--config_file") + 1]
    assert engine in test_file.read_text(encoding="utf-8"), (
        f"{command}\n{test_file.relative_to(REPO)} does not launch {engine}"
    )


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder laid out like the checkout, its own `runs/` empty, as the working directory."""
    for entry in REPO.iterdir():
        if entry.name not in LOCAL:
            (tmp_path / entry.name).symlink_to(entry)
    monkeypatch.chdir(tmp_path)
    return tmp_path


SAMPLE = """
```bash
make demo   # the demo, ~12 minutes
# with real models: needs real weights
python -m train.cli.export --checkpoint runs/x/checkpoint-2000 \\
    --kohya  # first
accelerate launch train/cycle.py --config configs/x.yaml
# on the tiny run
printf 'a # b\\n' > prompts.txt  # two prompts
```

```
python -m not.a.shell.block
```
"""


def test_commands_are_read_as_the_shell_reads_them() -> None:
    assert [(command.line, command.text, command.not_run) for command in commands(SAMPLE)] == [
        (3, "make demo", True),
        (5, "python -m train.cli.export --checkpoint runs/x/checkpoint-2000 --kohya", True),
        (7, "accelerate launch train/cycle.py --config configs/x.yaml", True),
        (9, "printf 'a # b\\n' > prompts.txt", False),
    ]


def test_a_command_that_cannot_run_in_process_is_refused(checkout: Path) -> None:
    reader = Reader(checkout)
    for text, reason in (
        ("pip install -e .", "neither a Python entry point"),
        ("accelerate launch --num_processes 2 train/cycle.py", "launcher flags"),
        ("python -m train.cli.nothing", "no module"),
        ("python -m train.cli.export --help > help.txt", "shell syntax"),
        ("cycletune export --help", "README_COMMANDS"),
    ):
        with pytest.raises(AssertionError, match=reason):
            reader.run(Command(1, text, ""))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
def test_every_readme_command_runs_as_written_or_says_why_not(
    checkout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reader = Reader(checkout)
    for command in commands(README.read_text(encoding="utf-8")):
        if command.not_run:
            continue
        try:
            if command.run_by is not None:
                assert_launched_by(command, command.run_by)
                continue
            reader.run(command)
        except AssertionError as failure:
            output = capsys.readouterr()
            raise AssertionError(f"{failure}\n{output.out[-3000:]}\n{output.err[-6000:]}") from None
        capsys.readouterr()
