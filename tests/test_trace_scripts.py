"""What the trace-reading scripts have in common: a file that is not a bench trace is one line
on stderr and exit status 2, not a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("script", ["trace_join_passes.py", "trace_copy_queue.py"])
@pytest.mark.parametrize("text", ["{}", "not json"])
def test_a_file_that_is_not_a_trace_is_one_line(tmp_path, script, text):
    p = tmp_path / "x.json"
    p.write_text(text)
    r = subprocess.run([sys.executable, str(SCRIPTS / script), str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cannot read" in r.stderr
