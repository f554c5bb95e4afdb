"""scripts/generate_job.py as a Ray job: submitted with the `ray job submit` CLI to a real
local head (`ray start --head`), results written as JSONL.

The job's working dir is the `scripts/` folder alone (a few kB): the entrypoint only needs
the script, and `specoffload` is imported from the environment the head runs in (this
venv, where it is installed). Uploading the repository root instead would also put its
top-level folders (`models`, `configs`, `tests`...) on the workers' sys.path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ray_head import start_head, stop_head

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["hello world", "the quick brown fox", "one two three four five"]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = start_head(tmp_path_factory.mktemp("rayjob"), num_cpus=4, dashboard=True)
    try:
        yield h
    finally:
        stop_head(h)  # `ray stop --force` for this head only
        shutil.rmtree(h.temp_dir, ignore_errors=True)


def _submit(head, sid, *args, timeout=120):
    return head.cli("job", "submit", "--address", head.dashboard, "--working-dir", str(REPO / "scripts"),
                    "--submission-id", sid, "--", "python", "generate_job.py", *args, timeout=timeout)


def _status(head, sid):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard).get_job_status(sid)


def test_job_writes_jsonl(head, tiny_dir, tmp_path):
    from specoffload import LLM, SamplingParams

    d = tiny_dir("llama")
    pf = tmp_path / "prompts.jsonl"
    pf.write_text(f"{PROMPTS[0]}\n" + json.dumps({"prompt": PROMPTS[1]}) + "\n\n")
    out = tmp_path / "results.jsonl"
    p = _submit(head, "specoffload-job-ok", "--model", str(d), "--prompts", str(pf), "--prompt", PROMPTS[2],
                "--max-tokens", "8", "--draft", "self:2", "--batch-size", "2", "--no-chat-template",
                "--out", str(out))
    log = "\n".join(head.log[-1:])
    assert p.returncode == 0, log[-6000:]
    assert _status(head, "specoffload-job-ok") == "SUCCEEDED"
    st = head.cli("job", "status", "--address", head.dashboard, "specoffload-job-ok", check=True)
    assert "succeeded" in (st.stdout + st.stderr).lower()
    assert "generate_job: 3 requests" in p.stdout + p.stderr  # the job's log is tailed by submit

    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == len(PROMPTS)
    assert sorted(r["index"] for r in recs) == [0, 1, 2]
    order = [PROMPTS[2], PROMPTS[0], PROMPTS[1]]  # --prompt ones first, then the file's (as the CLI)
    assert {r["index"]: r["prompt"] for r in recs} == dict(enumerate(order))
    assert all(r["token_ids"] and len(r["token_ids"]) <= 8 and r["finish_reason"] in ("length", "stop")
               for r in recs)

    # Greedy: the job's tokens are the in-process reference engine's tokens.
    ref = LLM(str(d), engine="reference", progress=False)
    ids = [{"prompt_token_ids": ref.tokenizer(t, add_special_tokens=False)["input_ids"]} for t in order]
    want = [o.outputs[0].token_ids for o in ref.generate(ids, SamplingParams(max_tokens=8))]
    assert [r["token_ids"] for r in sorted(recs, key=lambda r: r["index"])] == want


def test_job_bad_input_fails_with_one_line(head, tiny_dir, tmp_path):
    p = _submit(head, "specoffload-job-bad", "--model", str(tiny_dir("llama")),
                "--prompts", str(tmp_path / "missing.txt"), timeout=90)
    assert p.returncode != 0
    assert _status(head, "specoffload-job-bad") == "FAILED"
    logs = head.cli("job", "logs", "--address", head.dashboard, "specoffload-job-bad", check=True).stdout
    assert f"generate_job: error: prompts file not found: {tmp_path / 'missing.txt'}" in logs
    assert "Traceback" not in logs
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(head.dashboard).get_job_info("specoffload-job-bad")
    assert "exit code 2" in (info.message or "")
