"""The README's example keeps working (a short run; what it prints is checked, not its timing)."""

import os
import pathlib
import re
import subprocess
import sys

from .conftest import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_moma_example_trains_on_the_bundled_corpus(tmp_path):
    env = {**os.environ, "MOMA_CACHE": str(tmp_path), "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tiny_moma.py"), "--steps", "30", "--recompute"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step +\d+ \| loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0]  # steps 1 and 25
    held_out = re.search(r"held-out loss text ([0-9.]+), image ([0-9.]+)", result.stdout)
    assert held_out and all(float(v) < 7 for v in held_out.groups())
    assert "steps outside the bound 0" in result.stdout
