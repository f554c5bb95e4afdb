"""The disk tier's reads: after a layer's first, checked read, later passes copy its bytes
straight from the safetensors files into the staging buffer; the buffer must hold exactly what
the checked path puts there."""

from __future__ import annotations

import os

import pytest
import torch

from specoffload.actors.disk_tier import DiskTier
from specoffload.errors import CheckpointError


def _staged(tier: DiskTier, j: int) -> dict:
    """name -> the bytes staged for it (padding and a smaller layer's leftover tail excluded)."""
    buf, entries = tier.get(j)
    out = {e.name: bytes(buf[e.offset: e.offset + e.nbytes].numpy()) for e in entries}
    tier.done_with(j)
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "llama", "qwen3_moe"])
def test_direct_reads_equal_the_checked_read_byte_for_byte(tiny_dir, family):
    d = tiny_dir(family)
    tier = DiskTier(("checkpoint", str(d), None), [0, 1], cuda=False, read_threads=3)
    try:
        # layer 0 checked at init (and layer 1 too where its kind differs), then read directly
        first = {j: _staged(tier, j) for j in (0, 1)}
        assert tier.extents[0] is not None and tier.extents[1] is not None
        again = {j: _staged(tier, j) for j in (0, 1)}
        assert tier.direct_reads >= 3
        assert again == first
        ref = DiskTier(("checkpoint", str(d), None), [0, 1], cuda=False)
        ref._direct = lambda j: None  # every read through read_layer
        ref.extents.clear()
        assert {j: _staged(ref, j) for j in (0, 1)} == first and ref.direct_reads == 0
        ref.close()
    finally:
        tier.close()


def test_another_dtype_than_stored_reads_through_the_checked_path(tiny_dir):
    """The tiny checkpoints are stored in float32; run in bfloat16 the bytes on disk are not the
    layout's, so every pass converts through read_layer (and the output bytes are bf16)."""
    d = tiny_dir("mixtral")
    tier = DiskTier(("checkpoint", str(d), "bfloat16"), [0], cuda=False)
    try:
        a, b = _staged(tier, 0), _staged(tier, 0)
        assert tier.extents[0] is None and tier.direct_reads == 0 and a == b
        assert {e.dtype for e in tier.layouts[0][0]} == {"bfloat16"}
    finally:
        tier.close()


def test_a_file_cut_short_after_its_check_is_one_line(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("llama"), d)
    tier = DiskTier(("checkpoint", str(d), None), [0], cuda=False)
    try:
        _staged(tier, 0)
        (path, off, n), = tier.extents[0]["o"]
        os.truncate(path, off + n // 2)
        with pytest.raises(CheckpointError, match="ended .* bytes early"):
            _staged(tier, 0)
    finally:
        tier.close()


def test_layers_of_different_kinds_each_keep_their_layout(tiny_dir):
    """The tiny Qwen MoE checkpoints mix dense and sparse layers; each disk layer is staged in
    its own layout (the buffers fit the largest), equal to what read_layer gives."""
    from specoffload.models.checkpoint import Checkpoint

    d = tiny_dir("qwen3_moe")
    ck = Checkpoint(d)
    kinds = {j: sorted(ck.read_layer(j)) for j in range(ck.spec.num_layers)}
    assert len({tuple(v) for v in kinds.values()}) > 1  # the premise: the checkpoint mixes kinds
    layers = list(range(ck.spec.num_layers))
    tier = DiskTier(("checkpoint", str(d), None), layers, cuda=False)
    try:
        for _ in range(2):  # checked or direct, then direct
            for j in layers:
                buf, entries = tier.get(j)
                want = ck.read_layer(j)
                assert sorted(e.name for e in entries) == kinds[j]
                for e in entries:
                    got = buf[e.offset: e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)
                    assert torch.equal(got, want[e.name])
                tier.done_with(j)
    finally:
        tier.close()
