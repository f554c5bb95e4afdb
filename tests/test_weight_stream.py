"""The weight streamer hands out each layer's exact bytes, pass after pass, on every device
this machine has (CPU: host views in place; CUDA: pieces queued by the feeder thread into
rotating slots, with a 1 MiB piece size so each layer is many pieces)."""

from __future__ import annotations

import pytest
import torch

from specoffload.actors.shm_layout import layout, views
from specoffload.actors.weight_stream import WeightStreamer
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)

DEVICES = ["cpu", gpu.CUDA]


def _host_layer(ts: dict) -> tuple:
    """(flat host buffer, entries, the tensors): one layer as the loader lays it out, pinned
    where CUDA is."""
    entries, size = layout(ts)
    buf = torch.zeros(size, dtype=torch.uint8)
    for e, t in zip(entries, ts.values()):
        views(buf, [e])[e.name].copy_(t)
    return (buf.pin_memory() if torch.cuda.is_available() else buf), entries, ts


def _host_layers(n: int):
    g = torch.Generator().manual_seed(0)
    return {j: _host_layer({"a": torch.randn(700, 1100, generator=g),
                            "b": torch.randn(3, 513, generator=g).to(torch.bfloat16)}) for j in range(n)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slots", [2, 3])
def test_every_pass_sees_every_layer_exactly(device, slots):
    layers = _host_layers(5)
    order = [0, 1, 2, 3, 4]
    ws = WeightStreamer({j: (b, e) for j, (b, e, _) in layers.items()}, order, slots, device, chunk_bytes=1 << 20)
    ws.prefetch()
    for _ in range(3):  # passes: the cycle wraps around the slots
        for j in order:
            w = ws.acquire(j)
            for name, t in layers[j][2].items():
                assert torch.equal(w[name].cpu(), t), (j, name)
            ws.release(j)
    if device == "cuda":
        assert ws.bytes_copied >= 3 * sum(b.numel() for b, _, _ in layers.values())


@pytest.mark.parametrize("device", DEVICES)
def test_reset_after_a_pass_fails_midway(device):
    """A pass that stops between acquire and release (prefill out of memory at a layer) leaves
    its slots held; after reset the next pass starts at the first layer with exact bytes."""
    layers = _host_layers(5)
    order = [0, 1, 2, 3, 4]
    ws = WeightStreamer({j: (b, e) for j, (b, e, _) in layers.items()}, order, 2, device, chunk_bytes=1 << 20)
    ws.prefetch()
    ws.acquire(0)
    ws.release(0)
    ws.acquire(1)  # ... and the pass fails here: 1 held, 2 loading
    # the CPU keeps the same slot ledger (nothing copied), so it refuses as the GPU does
    with pytest.raises(RuntimeError, match=r"every slot holds a layer in use \(slots hold \[1, 2\]\)"):
        ws.acquire(0)
    assert ws.in_use == {1}  # what the executor's pass boundary checks
    ws.reset()
    assert not ws.in_use
    for _ in range(2):
        for j in order:
            w = ws.acquire(j)
            for name, t in layers[j][2].items():
                assert torch.equal(w[name].cpu(), t), (j, name)
            ws.release(j)


@gpu.cuda_only("slots live in GPU memory")
def test_slots_that_do_not_fit_are_a_capacity_error():
    """Too many slots for the GPU memory left: a one-line CapacityError naming what to lower
    (the bench's baseline once asked for its resident layers plus the speculative modes' slots)."""
    from specoffload.errors import CapacityError

    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    # The fraction caps what the allocator reserves, but a slot can also land in the free part
    # of a segment an earlier test's tensor still holds (this test once did not raise): make a
    # slot larger than twice all such slack, so 1.5 slots of new room plus the slack hold fewer
    # than two.
    slack = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    size = max(32 << 20, 2 * slack + (2 << 20))
    layers = {j: _host_layer({"a": torch.full((size // 2,), float(j), dtype=torch.bfloat16)}) for j in range(3)}
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 1.5 * size) / total)
    try:
        with pytest.raises(CapacityError, match="weight slots of .* do not fit.*lower num_slots"):
            WeightStreamer({j: (b, e) for j, (b, e, _) in layers.items()}, [0, 1, 2], 3, "cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
