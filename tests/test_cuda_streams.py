"""Draft graphs captured while the weight copier streams: each role keeps a stream of its own.

`torch.cuda.Stream()` hands out a fixed pool's streams in turn, so a capture that drew a new
one each time reached the copier's stream after ~30 captures and the feeder's copies fell into
the capture (w1-long on an H100 in session 33 failed after ~80 passes). These run on a GPU
(`pytest -m cuda`, scripts/gpu_check.py); CUDA streams do not exist on a CPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from specoffload.actors.weight_stream import WeightStreamer
from specoffload.models.cuda_streams import GRAPH_CAPTURE, KV_COPY, WEIGHT_COPY, side_stream
from specoffload.speculation.draft_graph import GraphedDraftStep
from test_weight_stream import _host_layer
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)

cuda_only = gpu.cuda_only("CUDA streams need a GPU")


@cuda_only
def test_role_streams_stay_apart_however_often_the_pool_is_drawn():
    roles = [WEIGHT_COPY, KV_COPY, GRAPH_CAPTURE]
    first = {r: side_stream(r, "cuda").cuda_stream for r in roles}
    assert len(set(first.values())) == 3
    for _ in range(100):  # other code drawing from torch's pool, round after round
        torch.cuda.Stream()
    assert {r: side_stream(r, torch.device("cuda", torch.cuda.current_device())).cuda_stream for r in roles} == first


class _OneMatmul:
    """A draft's forward reduced to what a graph can replay: one gather and one matmul."""

    def __init__(self):
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.w = torch.randn(64, 64, device=self.device, generator=torch.Generator(self.device).manual_seed(0))

    def forward(self, cache, tokens, q_lens, n_q):
        return self.w[tokens] @ self.w


@cuda_only
def test_many_captures_while_layers_stream():
    """Each capture starts right after a release queued the next layer's copy (32 MiB in 1 MiB
    pieces, ~1-2 ms of the feeder recording and waiting on events), so captures overlap the
    feeder's work: with a fresh pool stream per capture, one in 32 was the copier's stream."""
    g = torch.Generator().manual_seed(0)
    layers = {j: _host_layer({"a": torch.randn(8 << 20, generator=g)}) for j in range(4)}
    order = [0, 1, 2, 3]
    ws = WeightStreamer({j: (b, e) for j, (b, e, _) in layers.items()}, order, 2, "cuda", chunk_bytes=1 << 20)
    assert ws.copy_stream.cuda_stream != side_stream(GRAPH_CAPTURE, "cuda").cuda_stream
    model = _OneMatmul()
    d = model.device
    cache = SimpleNamespace(batch=8, lens=torch.zeros(8, device=d), pos=torch.zeros(8, device=d),
                            k=[torch.zeros(1, device=d)], v=[torch.zeros(1, device=d)])
    tokens = torch.arange(8, device=d)
    ws.prefetch()
    for p in range(24):  # 96 captures
        for j in order:
            w = ws.acquire(j)
            assert torch.equal(w["a"].cpu(), layers[j][2]["a"]), (p, j)
            ws.release(j)  # queues the copy of the layer two ahead into this slot
            step = GraphedDraftStep(model, cache)
            step.step(tokens)  # eager, then captured while that copy is being issued
            assert step.error is None and step.graph is not None, (p, j, step.error)
            assert torch.equal(step.step(tokens + 1), model.w[tokens + 1] @ model.w)  # the replay
    torch.cuda.synchronize()
