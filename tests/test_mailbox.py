"""The shared-memory mailboxes that carry a pass's q/k/v and attention outputs between the
executor and the CPU worker: what goes in comes out, growth replaces the file, and the plain
object-store path gives the same tensors."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from specoffload.actors.io_loader import default_shm_root
from specoffload.actors.mailbox import ExecutorMailboxes, Mailbox, WorkerMailboxes
from specoffload.models.spec import ModelSpec
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)


def _spec():
    return ModelSpec(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=8, rms_eps=1e-5, rope_theta=1e4, max_positions=64,
                     dtype="bfloat16")


def _qkv(T, g):
    return (torch.randn(T, 4, 8, generator=g).bfloat16(), torch.randn(T, 2, 8, generator=g).bfloat16(),
            torch.randn(T, 2, 8, generator=g).bfloat16())


def test_round_trip_grow_and_free(tmp_path):
    spec, g = _spec(), torch.Generator().manual_seed(0)
    ex, wk = ExecutorMailboxes(spec, str(tmp_path), torch.device("cpu")), WorkerMailboxes(spec)
    for T in (5, 3, 12):  # 12 outgrows the first file: a new one replaces it
        box = ex.ensure(7, 0, T)
        q, k, v = _qkv(T, g)
        msg = ex.send_qkv(box, q, k, v, lambda: None)
        rq, rk, rv = wk.recv_qkv(msg)
        assert torch.equal(rq, q) and torch.equal(rk, k) and torch.equal(rv, v)
        out = (rq.float() * 2).bfloat16().reshape(T, -1)
        back = ex.recv_out(box, wk.send_out(msg, out))
        assert torch.equal(back, out)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and ex.boxes[(7, 0)].capacity >= 12  # the outgrown file is gone
    assert len(wk.maps) == 1  # and the worker dropped its mapping of it
    ex.free(7)
    wk.free(7)
    assert os.listdir(tmp_path) == [] and not wk.maps


def test_plain_path_carries_the_same_tensors():
    spec, g = _spec(), torch.Generator().manual_seed(1)
    ex, wk = ExecutorMailboxes(spec, None, torch.device("cpu")), WorkerMailboxes(spec)
    assert ex.ensure(0, 0, 4) is None
    q, k, v = _qkv(4, g)
    rq, rk, rv = wk.recv_qkv(ex.send_qkv(None, q, k, v, lambda: None))
    assert torch.equal(rq, q) and torch.equal(rk, k) and torch.equal(rv, v)
    msg = ex.send_qkv(None, q, k, v, lambda: None)
    out = q.reshape(4, -1) + 1
    assert torch.equal(ex.recv_out(None, wk.send_out(msg, out)), out)


def test_failed_registration_falls_back_to_the_object_store(tmp_path, monkeypatch):
    """A mailbox the driver will not page-lock is dropped (file and all) with one warning, and
    the executor's later passes take the object-store path."""
    def refuse(self):
        raise RuntimeError(f"cudaHostRegister failed (1) for mailbox {self.path}")

    monkeypatch.setattr(Mailbox, "register", refuse)
    ex = ExecutorMailboxes(_spec(), str(tmp_path), torch.device("cuda"))  # registration is tried on CUDA only
    with pytest.warns(RuntimeWarning, match="object store: cudaHostRegister failed"):
        assert ex.ensure(0, 0, 8) is None
    assert ex.ensure(0, 1, 8) is None and not ex.boxes and os.listdir(tmp_path) == []


@gpu.cuda_only("page-locked mailboxes and their DMAs need CUDA")
@pytest.mark.parametrize("mapped_out", [False, True])
def test_cuda_round_trip(mapped_out):
    """On the GPU the mailbox is registered and both directions are DMAs on the current stream;
    with mapped_out (plan.mapped_out) a kernel reads the output from the mailbox instead, the
    same values, and a second output written there after the first is read reads as itself.
    In /dev/shm like the engine's: registering a file mapping on a disk filesystem can fail."""
    spec, g = _spec(), torch.Generator().manual_seed(2)
    dev = torch.device("cuda", torch.cuda.current_device())
    tmp_path = tempfile.mkdtemp(dir=default_shm_root())
    ex, wk = ExecutorMailboxes(spec, tmp_path, dev, mapped_out=mapped_out), WorkerMailboxes(spec)
    for T in (6, 40, 40):
        box = ex.ensure(0, 1, T)
        assert box.registered
        q, k, v = (t.to(dev) for t in _qkv(T, g))
        msg = ex.send_qkv(box, q, k, v, torch.cuda.current_stream(dev).synchronize)
        rq, rk, rv = wk.recv_qkv(msg)
        assert torch.equal(rq, q.cpu()) and torch.equal(rk, k.cpu()) and torch.equal(rv, v.cpu())
        back = ex.recv_out(box, wk.send_out(msg, rq.reshape(T, -1) * 3))
        assert back.device == dev and torch.equal(back.cpu(), (q.cpu() * 3).reshape(T, -1))
    ex.close()
    assert os.listdir(tmp_path) == []
    os.rmdir(tmp_path)


@pytest.mark.parametrize("q_lens", [[3, 3, 3], [1, 3, 2]])  # a verification block; ragged (packed)
def test_attention_written_into_the_mailbox_equals_a_fresh_result(q_lens):
    """The worker writes attention straight into the mailbox's `out`: same values as the
    tensor `attend_layer` returns otherwise, and the mailbox is then sent without a copy."""
    from specoffload.models.attention import KVCache

    g = torch.Generator().manual_seed(3)
    T = sum(q_lens)
    caches = [KVCache(1, 3, 2, 8, 16, torch.bfloat16) for _ in range(2)]
    hist_k, hist_v = torch.randn(3, 2, 5, 8, generator=g).bfloat16(), torch.randn(3, 2, 5, 8, generator=g).bfloat16()
    for c in caches:
        c.k[0][:, :, :5].copy_(hist_k)
        c.v[0][:, :, :5].copy_(hist_v)
        c.lens = torch.tensor([5, 2, 4])
        c.begin_pass(torch.tensor(q_lens))
    q, k, v = _qkv(T, g)
    want = caches[0].attend_layer(0, q, k, v)
    dest = torch.full((T, 32), float("nan"), dtype=torch.bfloat16)
    got = caches[1].attend_layer(0, q, k, v, out=dest)
    assert got is dest and torch.equal(got, want)
