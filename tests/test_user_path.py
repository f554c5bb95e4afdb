"""What a user of the command line meets: which Ray cluster is joined, errors found before
anything starts, one-line errors from the actors, a quiet normal run, and help for every option."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from specoffload import ray_env
from specoffload.errors import ConfigError

PACKAGE = Path(ray_env.__file__).resolve().parent


# -- which cluster -------------------------------------------------------------------------------

def test_joins_only_the_cluster_the_user_points_to(monkeypatch):
    """Like a plain ray.init(): --ray-address, else RAY_ADDRESS, else what `ray start` recorded;
    another Ray instance merely running on this machine is never joined (address="auto" did)."""
    import ray._private.services as services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: ["10.9.9.9:6379"])  # someone else's Ray
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    assert ray_env.cluster_address() == (None, "local")
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: "10.0.0.5:6379")
    assert ray_env.cluster_address()[0] == "10.0.0.5:6379"  # `ray start` on this machine
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert ray_env.cluster_address() == ("10.0.0.7:6379", "RAY_ADDRESS")
    assert ray_env.cluster_address("10.0.0.8:6379") == ("10.0.0.8:6379", "--ray-address")
    assert ray_env.cluster_address("local") == (None, "--ray-address")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_env.cluster_address() == (None, "RAY_ADDRESS")


def test_a_local_cluster_of_our_own_has_the_dashboard_on_localhost(monkeypatch):
    import socket

    import ray
    import ray._private.services as services

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: ["10.9.9.9:6379"])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.delenv("SPECOFFLOAD_DASHBOARD", raising=False)
    ray_env.ensure_ray()
    monkeypatch.setenv("SPECOFFLOAD_DASHBOARD", "0")
    ray_env.ensure_ray()
    ray_env.ensure_ray(dashboard=True)
    assert [c["address"] for c in calls] == ["local"] * 3  # a new cluster, never "auto"
    assert [c["include_dashboard"] for c in calls] == [True, False, True]
    assert calls[0]["dashboard_host"] == "127.0.0.1"
    with socket.socket() as s:  # a cluster `ray start` recorded, alive: joined as ray.init() would
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: f"127.0.0.1:{s.getsockname()[1]}")
        ray_env.ensure_ray()
    assert calls[3]["address"] is None and "include_dashboard" not in calls[3]


def test_a_minimal_ray_starts_without_the_dashboard_in_one_line(monkeypatch, capsys):
    """`pip install ray` (not ray[default]) has no dashboard: ray.init(include_dashboard=True)
    raises there (seen on the GPU machine's trimmed Ray), so the run starts without it."""
    import ray
    import ray._private.services as services
    import ray._private.utils as ray_utils

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("SPECOFFLOAD_DASHBOARD", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.setattr(ray_utils, "get_dashboard_dependency_error", lambda: "No module named 'aiohttp_cors'")
    ray_env.ensure_ray()
    assert calls[0]["include_dashboard"] is False
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["specoffload: Ray's dashboard needs ray[default] (No module named 'aiohttp_cors'); "
                   "starting Ray without it"]


def test_a_cluster_that_does_not_answer_is_one_line_at_once(monkeypatch):
    import socket

    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init retries a dead address for minutes"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=f"cannot join the Ray cluster at 127.0.0.1:{port} \\(from RAY_ADDRESS\\): "
                                          "nothing answers there"):
        ray_env.ensure_ray()


def _other_specoffload(tmp_path: Path) -> Path:
    """A copy of this package's sources whose version differs."""
    dst = tmp_path / "other" / "specoffload"
    for d, dirs, files in os.walk(PACKAGE):
        dirs[:] = [x for x in dirs if (Path(d) / x / "__init__.py").is_file()]
        for f in files:
            if f.endswith(".py"):
                out = dst / Path(d).relative_to(PACKAGE) / f
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(d) / f, out)
    init = dst / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.9.9+other-'))
    return dst.parent


def test_a_cluster_running_another_specoffload_is_refused(ray_session, tmp_path):
    """The check runs a task on the cluster: workers that import this specoffload pass, workers
    that import another copy (here through PYTHONPATH) are a one-line error naming both."""
    ray_env.check_cluster(runtime_env={})
    other = _other_specoffload(tmp_path)
    with pytest.raises(ConfigError) as e:
        ray_env.check_cluster(runtime_env={"env_vars": {"PYTHONPATH": str(other)}})
    msg = str(e.value)
    assert "\n" not in msg and "runs another specoffload (9.9.9+other-" in msg
    assert str(other / "specoffload") in msg and str(PACKAGE) in msg


# -- failing before anything starts ----------------------------------------------------------------

@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if the engine starts (Ray, actors, or the in-process weights)."""
    from specoffload.llm import LLM

    def started(self, *a):
        pytest.fail("the engine started")

    monkeypatch.setattr(LLM, "_start_ray", started)
    monkeypatch.setattr(LLM, "_start_reference", started)
    monkeypatch.setattr(ray_env, "ensure_ray", started)


def _main(capsys, *args) -> tuple[int, str]:
    from specoffload.cli import main

    capsys.readouterr()  # what making the tiny checkpoint printed
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_bad_out_fails_before_ray_starts(tiny_dir, tmp_path, capsys, nothing_starts):
    d = tiny_dir("llama")
    rc, err = _main(capsys, "generate", "--model", str(d), "--prompt", "w3",
                    "--out", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert rc == 2 and err.strip().splitlines() == [
        f"specoffload: error: cannot write --out {tmp_path / 'no' / 'such' / 'dir.jsonl'}: No such file or directory"]
    rc, err = _main(capsys, "generate", "--model", str(d), "--prompt", "w3", "--trace", str(tmp_path / "no" / "t.json"))
    assert rc == 2 and err.strip().splitlines() == [
        f"specoffload: error: cannot write --trace {tmp_path / 'no' / 't.json'}: {tmp_path / 'no'} is not a writable folder"]


def test_prompt_longer_than_the_context_fails_before_weights_load(tiny_dir, tmp_path, capsys, nothing_starts):
    """The tiny model's context is 256 tokens: the tokenizer alone finds a 300-word prompt too
    long, and a results file that was never written is not left behind."""
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, "generate", "--model", str(tiny_dir("llama")), "--no-chat-template",
                    "--prompt", " ".join(["w5"] * 300), "--max-tokens", "4", "--out", str(out))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("specoffload: error: prompt 0 has 300 tokens + max_tokens 4 > the model's context of 256")
    assert not out.exists()


def test_truncated_checkpoint_fails_before_ray_starts(tiny_dir, tmp_path, capsys, nothing_starts):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir("llama"), d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc, err = _main(capsys, "generate", "--model", str(d), "--prompt", "w3")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"specoffload: error: {f}: not a readable safetensors file (truncated: ")


# -- errors from inside the actors -----------------------------------------------------------------

def test_interrupted_start_kills_the_actors_and_removes_the_weights(monkeypatch, tmp_path):
    """Ctrl-C (or any error) while the actors start: the coordinator is killed and the run's
    shared-memory folder removed (a failed run once left 514 MB in /dev/shm)."""
    import ray

    from specoffload.actors import coordinator as coord_mod
    from specoffload.actors.io_loader import run_dir

    monkeypatch.setenv("SPECOFFLOAD_SHM", str(tmp_path))
    d = run_dir("feedbeef")
    d.mkdir()
    (d / "layer_000.bin").write_bytes(b"\0" * 1024)
    killed = []

    class Coordinator:
        class ready:
            @staticmethod
            def remote():
                return "ref"

    class Loader:
        class ready:
            @staticmethod
            def remote():
                return "dead"

    def get(ref, *a, **k):
        if ref == "ref":
            raise KeyboardInterrupt
        assert ref == "dead" and (d / "layer_000.bin").exists()  # the loader is gone before its files go
        raise ray.exceptions.RayActorError()

    c, loader = Coordinator(), Loader()
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", killed.append)
    monkeypatch.setattr(ray, "get_actor", lambda name: loader if name == "specoffload-io_loader-feedbeef" else None)
    with pytest.raises(KeyboardInterrupt):
        coord_mod.wait_ready(c, "feedbeef")
    assert killed == [c, loader] and not d.exists()


def test_an_actors_error_is_one_line_naming_its_log(tiny_dir, tmp_path):
    """An error raised while the actors start (the executor refuses the plan) is the user's one
    line, naming the log that holds the actor's traceback; Ray streams no traceback to the
    terminal, and the run leaves nothing in shared memory."""
    plan = tmp_path / "plan.json"
    plan.write_text('{"device": "cpu", "disk_layers": [0]}')
    shm = tmp_path / "shm"
    shm.mkdir()
    r = _cli(tmp_path, "generate", "--model", str(tiny_dir("llama")), "--draft", "self:1", "--plan", str(plan),
             "--prompt", "w3", "--max-tokens", "2", "--ray-address", "local", "--no-dashboard",
             env={"SPECOFFLOAD_SHM": str(shm)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Error" not in r.stderr.replace(
        "specoffload: error:", ""), r.stderr
    prefix = "specoffload: error: the self-speculative draft's 1 layers must not be on disk (actor tracebacks: "
    assert lines[-1].startswith(prefix) and lines[-1].endswith(".log)")
    log = Path(lines[-1][len(prefix):-1])
    assert log.is_relative_to(tmp_path / "cache" / "logs")
    text = log.read_text()
    assert "gpu_executor" in text and "Traceback" in text and "must not be on disk" in text
    assert list(shm.iterdir()) == []


# -- a quiet normal run ----------------------------------------------------------------------------

def test_to_device_takes_read_only_arrays_without_a_warning():
    """Ray hands arrays over read-only; torch warned about each (`not writable`) on every run."""
    import torch

    from specoffload.models.host_io import to_device

    a = np.arange(4)
    a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = to_device(a, "cpu", torch.long)
    t += 1  # its own memory: writing it leaves the array alone
    assert t.tolist() == [1, 2, 3, 4] and a.tolist() == [0, 1, 2, 3]


def _cli(tmp_path, *args, env=None):
    """The CLI as a user runs it: Ray's own default auth mode, a private home for Ray's token
    and specoffload's cache."""
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    e.update(HOME=str(tmp_path / "home"), SPECOFFLOAD_CACHE=str(tmp_path / "cache"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "specoffload.cli", *args], capture_output=True, text=True,
                          timeout=300, env=e, cwd=tmp_path)


def test_a_normal_run_prints_no_warnings(tiny_dir, tmp_path):
    """A speculative run on its own local cluster (dashboard and all): results and Ray's
    notices, but no warning (Ray's token-auth notice, torch's `not writable`, ...)."""
    r = _cli(tmp_path, "generate", "--model", str(tiny_dir("llama")), "--draft", "self:1", "-k", "3",
             "--prompt", "w3 w4", "--prompt", "w9 w10 w11 w12 w13", "--max-tokens", "9", "--ignore-eos",
             "--no-chat-template", "--batch-size", "2", "--ray-address", "local", "--quiet",
             env={"SPECOFFLOAD_DASHBOARD": "1"})
    assert r.returncode == 0, r.stderr
    assert "18 tokens in" in r.stderr
    # where the start went, every figure a number (a missing one would print None)
    started = re.search(r"started in ([0-9.]+) s: Ray ([0-9.]+) s, then side by side host weights ([0-9.]+) s "
                        r"\(loader up -?[0-9.]+ s, read ([0-9.]+) s, write ([0-9.]+) s on [0-9]+ threads\) "
                        r"and the executor ([0-9.]+) s.*both done at ([0-9.]+) s", r.stderr)
    assert started, r.stderr
    noisy = [ln for ln in r.stderr.splitlines() if "warn" in ln.lower() or "not writable" in ln
             or "Traceback" in ln or "Fatal" in ln or " W " in ln]
    assert noisy == [], r.stderr


# -- help ------------------------------------------------------------------------------------------

def _parsers():
    from specoffload import bench, cli, plan_cli

    top = cli._build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return top, {"generate": sub.choices["generate"], "run-batch": sub.choices["run-batch"], "plan": plan_cli._parser(), "bench": bench.build_parser()}


def test_every_subcommand_and_option_has_help_in_sentences():
    top, parsers = _parsers()
    text = top.format_help()
    assert all(f"    {name} " in text for name in ("generate", "plan", "bench"))
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub._choices_actions:
        assert action.help and action.help.rstrip().endswith("."), action.dest
    for name, p in parsers.items():
        assert p.description and p.description.rstrip().endswith("."), (name, p.description)
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            h = (a.help or "").strip()
            assert h.endswith("."), (name, a.option_strings, h)


def test_sigterm_shuts_the_run_down_and_keeps_what_finished(tiny_dir, tmp_path):
    """`timeout`, `kill` and schedulers stop a run with SIGTERM: one line and exit 143, the actors
    shut down (nothing left in shared memory), every line in --out whole. Ray's driver core
    otherwise answers SIGTERM with a stack dump and an abort that skips all of that."""
    shm = tmp_path / "shm"
    shm.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{3 + i} w{9 + i}" for i in range(8)) + "\n")
    out = tmp_path / "out.jsonl"
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    e.update(HOME=str(tmp_path / "home"), SPECOFFLOAD_CACHE=str(tmp_path / "cache"), SPECOFFLOAD_SHM=str(shm))
    p = subprocess.Popen([sys.executable, "-m", "specoffload.cli", "generate", "--model", str(tiny_dir("llama")),
                          "--prompts", str(prompts), "--out", str(out), "--max-tokens", "48", "--ignore-eos",
                          "--batch-size", "1", "--no-chat-template", "--ray-address", "local", "--no-dashboard",
                          "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=e, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not (out.is_file() and out.read_text().count("\n") >= 1):  # the first request has finished
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else "slow"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("specoffload: terminated (SIGTERM); finished requests are in the "
                                            "output file, if one was given"), err
    assert "Traceback" not in err and "SIGTERM received" not in err, err
    lines = out.read_text().splitlines()
    assert 1 <= len(lines) < 8 and all(json.loads(ln)["token_ids"] for ln in lines)
    assert list(shm.iterdir()) == []
