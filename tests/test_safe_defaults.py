"""Safe defaults: nothing the engine reads can run code. Plans, hardware files, journals and
owner records are JSON or msgpack, never pickle; no model code from a checkpoint folder
(`trust_remote_code` is never set); tokenizers load from local files only."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# The installed package: everything but tests (which may build pickles to feed it) and the venv.
SOURCES = [p for p in ROOT.rglob("*.py") if not {"tests", ".venv", "build"} & set(p.relative_to(ROOT).parts)]


def _grep(pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES for n, line in enumerate(p.read_text().splitlines(), 1)
            if rx.search(line) and not line.lstrip().startswith("#")]


def test_sources_found():
    assert len(SOURCES) > 40 and any(p.name == "llm.py" for p in SOURCES)


def test_trust_remote_code_is_never_set():
    assert _grep(r"trust_remote_code\s*=") == []


def test_nothing_unpickles():
    assert _grep(r"\bpickle\.loads?\(|cloudpickle\.loads?\(|\bdill\.|torch\.load\(|numpy\.load\(.*allow_pickle=True"
                 r"|np\.load\(.*allow_pickle=True|\bmarshal\.loads?\(|\byaml\.load\(|(?<![\w.])eval\(|(?<![\w.])exec\(") == []


def test_tokenizers_load_local_files_only():
    calls = _grep(r"AutoTokenizer\.from_pretrained\(")
    here = [c for c in calls if not c.startswith(("scripts/", "sources/gguf_convert.py"))]
    assert here and all("local_files_only=True" in Path(ROOT / c.split(":")[0]).read_text().splitlines()
                        [int(c.split(":")[1]) - 1] for c in here)


def test_a_pickled_plan_or_hardware_file_is_refused_in_one_line(tmp_path):
    from specoffload.errors import ConfigError
    from specoffload.placement.plan import Plan

    class Boom:
        def __reduce__(self):
            return (exec, ("open('/tmp/pwned', 'w')",))

    f = tmp_path / "plan.json"
    f.write_bytes(pickle.dumps({"batch_size": 4, "x": Boom()}))
    with pytest.raises(ConfigError, match="plan.json: not valid JSON"):
        Plan.from_file(f)
    from specoffload.placement.hardware import Hardware

    with pytest.raises(ConfigError, match="plan.json: not valid JSON"):
        Hardware.from_file(f)
    assert not Path("/tmp/pwned").exists()
