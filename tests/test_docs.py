"""Every command and code block in README.md and docs/*.md runs as written.

- ```python blocks run as they are, each in a fresh process.
- ```bash blocks run command by command, in order, in one scratch directory per document (so later
  commands see what earlier ones wrote), with ``examples/`` of the repository beside them.
- An HTML comment right before a block can say how it is tested:
  ``<!-- tested with: moma-pretrain --train-iters 20 | moma-generate --max-new-tokens 8 -->`` appends
  those flags to each command of that tool (a tiny size: the document says so next to the block), and
  ``<!-- tested by .ci/run -->`` marks a block that CI runs itself (it must appear in .ci/run verbatim),
  and ``<!-- tested by tests/test_x.py -->`` one that a test runs (verbatim in that file): commands
  that need a checkout the test makes (a Megatron-LM snapshot to patch).
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!--\s*(?P<note>[^>]*?)\s*-->\s*\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks(path: Path) -> List[Tuple[str, str, str]]:
    """(language, body, note) of each fenced block."""
    return [(m["lang"], m["body"], m["note"] or "") for m in FENCE.finditer(path.read_text())]


def commands(body: str) -> List[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        text = current.strip()
        current = ""
        if text and not text.startswith("#"):
            out.append(text)
    return out


def tool_of(command: str) -> str:
    if "moma_plugin.pretrain" in command:
        return "moma-pretrain"
    return command.split()[0]


def extra_flags(note: str) -> Dict[str, str]:
    """{tool: flags} of a ``tested with:`` note."""
    if not note.startswith("tested with:"):
        return {}
    extra = {}
    for part in note[len("tested with:"):].split("|"):
        tool, _, flags = part.strip().partition(" ")
        extra[tool] = flags
    return extra


def _with_extra(command: str, extra: Dict[str, str]) -> str:
    """``command`` with the note's flags for its tool appended, except those it gives itself."""
    flags = extra.get(tool_of(command), "").split()
    code, hash_, comment = command.partition("  #")  # a trailing comment stays at the end
    given = set(code.split())
    added, keep = [], False
    for token in flags:
        if token.startswith("--"):
            keep = token not in given
        if keep:
            added.append(token)
    if not added:
        return command
    return f"{code.rstrip()} {' '.join(added)}" + (f"  #{comment}" if hash_ else "")


def _run(command: str, cwd: Path, timeout: int = 600):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_document_has_code_to_run():
    assert all(blocks(path) for path in DOCUMENTS)


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_python_blocks_run_as_written(path, tmp_path):
    snippets = [body for lang, body, _ in blocks(path) if lang == "python"]
    for index, body in enumerate(snippets):
        proc = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert proc.returncode == 0, f"{path.name} python block {index}:\n{body}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_commands_marked_as_run_elsewhere_are_there_verbatim(path):
    for lang, body, note in blocks(path):
        if lang == "bash" and note.startswith("tested by "):
            runner = note[len("tested by "):]
            text = (REPO / runner).read_text()
            for command in commands(body):
                assert command in text, f"{path.name}: {command!r} is marked as run by {runner} but is not in it"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a document's commands, in order (each has its own 600 s limit in _run)
@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_shell_commands_run_as_written(path, tmp_path):
    """Every bash block not marked as run elsewhere (the test above checks those)."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    for lang, body, note in blocks(path):
        if lang != "bash" or note.startswith("tested by "):
            continue
        extra = extra_flags(note)
        for command in commands(body):
            full = _with_extra(command, extra)
            proc = _run(full, tmp_path)
            assert proc.returncode == 0, (f"{path.name}: `{full}` failed ({proc.returncode}):\n"
                                          f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            assert "Traceback" not in proc.stderr, f"{path.name}: `{full}`:\n{proc.stderr[-3000:]}"


def test_the_parser_of_this_test():
    body = "a --x 1 \\\n  --y 2   # comment\n# only a comment\n\nb\n"
    assert commands(body) == ["a --x 1    --y 2   # comment", "b"]
    extra = extra_flags("tested with: moma-pretrain --train-iters 3 | moma-generate --max-new-tokens 2")
    assert _with_extra("moma-pretrain --lr 1  # faster", extra) == "moma-pretrain --lr 1 --train-iters 3  # faster"
    assert _with_extra("torchrun -m moma_plugin.pretrain", extra).endswith("--train-iters 3")
    assert _with_extra("moma-compare a b", extra) == "moma-compare a b"
    assert _with_extra("moma-pretrain --train-iters 5", extra) == "moma-pretrain --train-iters 5"
