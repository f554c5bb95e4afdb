"""--out as a resumable journal, dead runs' /dev/shm folders swept, and the driver killed at
random points and rerun (scripts/kill_rerun.py, 3 cycles here, 20 in docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specoffload.cli import main
from specoffload.errors import ConfigError
from specoffload.results_journal import Journal, open_journal


def _records(path: Path) -> dict:
    return {r["index"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_journal_appends_whole_lines_and_resumes(tmp_path):
    f = tmp_path / "o.jsonl"
    j = open_journal(str(f), ["k0", "k1", "k2"])
    assert j.pending() == [0, 1, 2] and not f.exists()  # nothing written before a result
    j.append(2, {"text": "c"})
    j.append(0, {"text": "a"})
    j.close()
    assert f.read_text().splitlines()[0] == '{"index": 2, "key": "k2", "text": "c"}'
    j = Journal(f, ["k0", "k1", "k2"])
    assert j.pending() == [1] and j.done[0]["text"] == "a"
    with pytest.raises(RuntimeError):
        j.append(0, {"text": "again"})  # never a second line for a request


@pytest.mark.parametrize("cut", [1, 9, 20, -1])
def test_torn_last_line_is_dropped(tmp_path, cut):
    """Killed mid-write: the bytes after the last newline (a prefix of a line, even all of it
    without its newline) go; the request runs again."""
    f = tmp_path / "o.jsonl"
    j = open_journal(str(f), ["k0", "k1"])
    j.append(0, {"text": "a"})
    j.close()
    whole = f.read_bytes()
    line = b'{"index": 1, "key": "k1", "text": "b"}\n'
    f.write_bytes(whole + line[:cut])
    j = Journal(f, ["k0", "k1"])
    assert j.torn == len(line[:cut]) and j.pending() == [1] and f.read_bytes() == whole


def test_a_file_not_ours_is_never_touched(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_bytes(b"my notes, no newline at the end")
    with pytest.raises(ConfigError, match="line 1 is not a result line"):
        Journal(f, ["k0"])
    assert f.read_bytes() == b"my notes, no newline at the end"
    f.write_text('{"index": 0, "key": "k0"}\n{"index": 0, "key": "k0"}\n')
    with pytest.raises(ConfigError, match="line 2 repeats index 0"):
        Journal(f, ["k0"])


def _gen(model, out, *extra):
    return main(["generate", "--model", str(model), "--engine", "reference", "--quiet", "--no-chat-template",
                 "--prompt", "w3 w4", "--prompt", "w5", "--prompt", "w6 w7 w8", "--max-tokens", "6",
                 "--ignore-eos", "--out", str(out), *extra])


def test_cli_rerun_keeps_what_is_there_and_runs_the_rest(tiny_dir, tmp_path, capsys):
    m = tiny_dir("llama")
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert _gen(m, full) == 0
    want = _records(full)
    lines = full.read_text().splitlines(keepends=True)
    part.write_text(lines[0] + lines[1][:15])  # one finished, one torn by a kill
    capsys.readouterr()
    assert _gen(m, part) == 0
    err = capsys.readouterr().err
    assert "dropped a torn last line" in err and "resuming: 1 of 3 requests already in" in err
    got = _records(part)
    assert part.read_text().startswith(lines[0]) and len(part.read_text().splitlines()) == 3
    assert {i: r["token_ids"] for i, r in got.items()} == {i: r["token_ids"] for i, r in want.items()}
    before = part.read_bytes()
    assert _gen(m, part) == 0 and part.read_bytes() == before  # all there: nothing runs
    assert "all 3 requests already in" in capsys.readouterr().err
    # other parameters: refused in one line, the file untouched
    assert _gen(m, part, "--temperature", "0.5", "--seed", "1") == 2
    assert "holds results for other prompts or parameters" in capsys.readouterr().err
    assert part.read_bytes() == before


def test_generate_job_resumes_too(ray_session, tiny_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_job", Path(__file__).parents[1] / "scripts" / "generate_job.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "o.jsonl"
    args = ["--model", str(tiny_dir("llama")), "--device", "cpu", "--no-chat-template", "--prompt", "w3",
            "--prompt", "w4 w5", "--max-tokens", "4", "--out", str(out)]
    assert job.main(args) == 0
    first = out.read_text().splitlines(keepends=True)
    out.write_text(first[0])
    assert job.main(args) == 0
    assert "resuming: 1 of 2" in capsys.readouterr().err
    assert sorted(out.read_text().splitlines()) == sorted(x.rstrip("\n") for x in first)


def test_dead_runs_folders_are_removed_and_counted(tiny_dir, tmp_path, monkeypatch, capsys):
    from specoffload.actors import shm_owners
    from specoffload.placement.plan import Plan

    monkeypatch.setenv("SPECOFFLOAD_SHM", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("dead", dead.pid), ("live", os.getpid())):
        shm_owners.claim(tmp_path / f"specoffload-{name}", "loader", pid)
        (tmp_path / f"specoffload-{name}" / "layer_000.bin").write_bytes(b"\1" * (3 << 20))
    (tmp_path / "specoffload-legacy").mkdir()  # no owners.json: nothing says it is dead
    (tmp_path / "other-app").mkdir()
    # a new process reusing the dead pid is not the owner: its start time differs
    rec = json.loads((tmp_path / "specoffload-live" / "owners.json").read_text())[0]
    assert shm_owners.alive(rec["pid"], rec["start"]) and not shm_owners.alive(rec["pid"], rec["start"] + 1)
    from specoffload.models.spec import load_spec

    spec = load_spec(tiny_dir("llama"))
    capsys.readouterr()
    n, freed = shm_owners.prepare(spec, Plan())
    assert n == 1 and 3 << 20 <= freed < (3 << 20) + (64 << 10)  # the weights and owners.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-app", "specoffload-legacy", "specoffload-live"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"specoffload: removed 1 shared-memory folder(s) of dead runs from "
                                               f"{tmp_path}, reclaimed 3.0 MiB")


def test_driver_killed_at_random_points_and_rerun(tmp_path):
    """CI form of scripts/kill_rerun.py: 3 kills (SIGKILL to the driver) and a final run; nothing
    lost, duplicated, torn or wrong, and no shared-memory folder left."""
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "kill_rerun.py"),
                        "--cycles", "3", "--requests", "12", "--max-tokens", "12", "--seed", "3", "--kill-within", "8",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "lost 0, duplicated 0, wrong 0, unparseable lines 0, torn last line at the end 0" in r.stdout
    assert "shm folders left at the end 0" in r.stdout
