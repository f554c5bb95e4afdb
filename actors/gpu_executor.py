"""The GPU executor actor: target layers as they stream in, plus the resident draft.

Owns the device (CUDA, or the CPU for CI and laptops: same code, no copies). Per target
pass it receives one call per layer; each call finishes the previous layer (output
projection, FFN/MoE) with the attention output that the CPU worker sent back, then starts
this layer (norm, q/k/v, RoPE) and returns q/k/v for the CPU worker. Hidden states stay on
the device between calls; only q/k/v and attention outputs cross processes, as numpy.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch

from ..errors import CapacityError, ConfigError, OutOfGpuMemoryMidRun, SpecOffloadError
from ..models.attention import KVCache, gpu_attention_backends, pack_index
from ..models.cuda_streams import EXECUTOR, JOIN_PREFILL, KV_COPY, side_stream
from ..models.forward import Forward
from ..models.fp8_weights import SELF_DRAFT_REFUSAL
from ..models.fused import FUSED
from ..models.host_io import packed, to_device, to_host
from ..models.resident import ResidentModel, last_index
from ..placement.draft_kv import DraftKV
from ..placement.gpu_kv_rows import part_ranges, split_keep
from ..placement.plan import Plan
from ..sources.open import open_source
from ..speculation.runner import SpecRunner
from . import kv_ring
from .disk_tier import DiskTier
from .doorbell import BELL
from .gpu_budget import GpuBudget
from .gpu_rows import GpuRows
from .mailbox import ExecutorMailboxes
from .pass_layers import PassLayers
from .shm_layout import map_file, register, views
from .stage_timer import StageTimer
from .weight_stream import WeightStreamer
from .wire import to_wire


class GPUExecutor:
    # plan fields that set_switch changes on running actors
    SWITCHES = ("draft_feed_last", "early_posts", "mapped_out", "draft_prime_beside", "fused_prefill")

    def __init__(self, spec, plan: Plan, manifest: dict | None = None, draft_desc=None, target_desc=None):
        """Starts CUDA and loads the draft; `attach(manifest)` then maps the target's host
        layers. The coordinator starts an executor while the loader still writes the host
        copy, so the draft's load overlaps the target's; given a manifest, both happen here."""
        self.spec, self.plan, self.target_desc = spec, plan, target_desc
        plan.check_layers(spec.num_layers)
        t0 = time.perf_counter()
        if plan.device == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("plan.device is 'cuda' but this executor sees no CUDA device")
            self.device = torch.device("cuda", torch.cuda.current_device())
            gpu_attention_backends()  # no cuDNN attention: a graph built per pass (models/attention.py)
            if plan.join_overlap:
                # Rows joining a pass prefill on a stream of the default, lowest priority: this
                # actor's own work (the pass's parts) goes on one of a higher priority, so that
                # the device runs a part's next kernel before the join's queued ones. Not yet
                # measured (session 35 ran the overlap with both at the default priority).
                # Every call of this actor runs on this thread, where the stream is current.
                torch.cuda.set_stream(side_stream(EXECUTOR, self.device, priority=-1))
        else:
            self.device = torch.device("cpu")
        self.budget = GpuBudget(self.device, plan.gpu_memory)
        self._maps = []
        self.host = {}
        self.gpu_row_tokens = 0
        self.early_posts = 0  # `_post_arrived`'s
        self.post_early = plan.early_posts
        self.fused_prefill = plan.fused_prefill
        # layer -> an event after the joining prefill that read it on its own stream: the
        # layer's slot is refilled only after it too (`_done`)
        self._join_read: dict[int, torch.cuda.Event] = {}
        # The draft loads first: its load peak (a checkpoint layer staged while it is
        # quantized) then falls in memory that the slots and resident layers take later.
        with self.budget.part("draft"):
            self._draft = self._load_draft(draft_desc) if draft_desc and draft_desc[0] != "self" else None
        self._self_draft_layers = int(draft_desc[1]) if draft_desc and draft_desc[0] == "self" else None
        self.init_seconds = time.perf_counter() - t0
        if manifest is not None:
            self.attach(manifest)

    def attach(self, manifest: dict):
        """Map the loader's host copy of the target (pinned where CUDA is), copy the globals
        and resident layers to the device, and set up the weight slots and the runner."""
        spec, plan, t0 = self.spec, self.plan, time.perf_counter()
        cuda = self.device.type == "cuda"
        for j, (path, entries) in manifest["layers"].items():
            buf, _ = map_file(path, entries)
            if cuda:
                register(buf, f"{buf.numel()} bytes")
            self._maps.append(buf)
            self.host[int(j)] = (buf, entries)
        # Pinning the host layers (cudaHostRegister) costs time in proportion to their size.
        self.budget.seconds["map and pin host layers"] = round(time.perf_counter() - t0, 1)
        gbuf, gv = map_file(*manifest["globals"])
        self._maps.append(gbuf)
        with self.budget.part("globals"):
            self.glob = self._globals(gv, manifest["tied"])
        with self.budget.part("resident layers"):
            self.resident = {}
            for j in plan.gpu_layers:  # one at a time, so a failure names the layer
                self.resident[j] = {k: v.to(self.device) for k, v in views(*self.host[j]).items()}
        draft = self._draft if self._self_draft_layers is None else self._self_draft(self._self_draft_layers)
        streamed = plan.streamed_layers(spec.num_layers)
        self.timer = StageTimer(self.device, role="gpu_executor", trace=plan.trace)
        disk = None
        if plan.disk_layers:
            if self.target_desc is None:
                raise ConfigError("disk layers need the target's checkpoint to read them from")
            disk = DiskTier(self.target_desc, list(plan.disk_layers), cuda)
            disk.prefetch(plan.disk_layers[0])
        with self.budget.part("weight slots"):
            self.streamer = WeightStreamer({j: self.host[j] for j in streamed if j in self.host}, streamed,
                                           plan.num_slots, self.device, self.timer, disk, plan.copy_chunk_mib << 20)
        self.runner = SpecRunner(draft, self.device, plan.draft_kv_policy, prefill_chunk=plan.prefill_batch,
                                 graphs=plan.draft_graphs, feed_last=None if plan.draft_feed_last else False,
                                 prime_beside=plan.draft_prime_beside)
        self.tb: dict[int, dict] = {}
        self._failed: dict[int, Exception] = {}  # batches whose start raised: why
        self.pass_layers = PassLayers()
        self.mail = ExecutorMailboxes(spec, manifest.get("dir") if plan.shm_activations else None, self.device,
                                      doorbells=plan.layer_doorbell, mapped_out=plan.mapped_out)
        self._drafting: dict[int, object] = {}
        self.streamer.prefetch()
        self.init_seconds += time.perf_counter() - t0

    # -- setup -----------------------------------------------------------------------------
    def _globals(self, gv: dict, tied: bool) -> dict:
        # plan.host_embedding: the table stays the loader's mapped host copy (a tied one is the
        # head, and a self-draft would embed on the host at every draft step)
        host = self.plan.host_embedding and not tied and self._self_draft_layers is None
        glob = {k: v if host and k == "embed" else v.to(self.device) for k, v in gv.items()}
        if tied:
            glob["head"] = glob["embed"]
        return glob

    def _self_draft(self, n: int) -> ResidentModel:
        if not 1 <= n < self.spec.num_layers:
            raise ConfigError(f"self-speculative draft needs 1..{self.spec.num_layers - 1} layers, got {n}")
        if set(range(n)) & set(self.plan.disk_layers):
            raise ConfigError(f"the self-speculative draft's {n} layers must not be on disk")
        if self.plan.draft_fp8:
            raise ConfigError(SELF_DRAFT_REFUSAL)
        layers = [self.resident.get(j) or views(*self.host[j]) for j in range(n)]
        return ResidentModel(self.spec.with_layers(n), self.glob, layers, self.device)

    def _load_draft(self, desc) -> ResidentModel:
        return ResidentModel.from_source(open_source(desc), self.device, fp8_weights=self.plan.draft_fp8)

    def ready(self) -> dict:
        d = self.runner.draft
        return {"device": str(self.device), "init_s": round(self.init_seconds, 1), "resident_layers": len(self.resident),
                "slots": self.streamer.nslots, "draft": d is not None, "gpu_context": self.budget.context,
                "init_parts_s": dict(self.budget.seconds),
                "draft_gib": round(d.weight_bytes() / 2**30, 2) if d is not None else 0.0,
                "mailboxes": self.mail.folder is not None}

    def memory(self) -> dict:
        """Device bytes: CUDA context, each startup part, allocated now, the peaks (see GpuBudget)."""
        return self.budget.report()

    def _layer(self, j: int) -> dict:
        return self.resident[j] if j in self.resident else self.streamer.acquire(j)

    def _done(self, j: int):
        also = self._join_read.pop(j, None)
        if j not in self.resident:
            self.streamer.release(j, also)

    # -- batches ---------------------------------------------------------------------------
    def start(self, bid, prompts, samp, capacity, with_draft, joins=None, gpu_rows: int = 0):
        """joins: the running batch these sequences will take rows of (`merge`). gpu_rows: its
        first rows keep their target K/V here and attend here (actors/gpu_rows.py); rows
        joining a batch keep theirs in the GPU rows its finished sequences freed."""
        # Whatever an earlier run left under this id goes first: a start that fails must be
        # the error its prefill calls report, not a stale batch they would run on, and a draft
        # cache left behind must not be held while the new one is allocated.
        self.free(bid)
        try:
            with self.timer.span("prefill"):
                self.runner.start(bid, samp, prompts if (with_draft and self.runner.draft) else None, capacity, joins)
        except torch.OutOfMemoryError as e:
            self._failed[bid] = self._draft_out_of_memory(prompts, e)
            raise self._failed[bid] from None
        except Exception as e:
            # The backend queues this batch's prefill layers without waiting for start: each
            # of them should report this cause, not an unknown batch.
            self._failed[bid] = e
            raise
        self.tb[bid] = {"bid": bid, "prompts": prompts, "lens": to_device([len(p) for p in prompts], self.device, torch.long)}
        if gpu_rows and joins is not None:  # in the rows the running batch's finished sequences left
            self.tb[bid]["gpu"] = self._batch(joins)["gpu"].spare(gpu_rows)
        elif gpu_rows:
            try:
                with self.budget.part("gpu_kv_rows"):
                    self.tb[bid]["gpu"] = GpuRows(self.spec, gpu_rows, capacity, self.device, self.plan.kv_dtype)
            except torch.OutOfMemoryError as e:
                self.free(bid)
                self._failed[bid] = CapacityError(
                    f"the target KV of {gpu_rows} GPU rows ({capacity} tokens each) ran out of GPU memory "
                    f"({self.budget.summary()} GiB held): lower gpu_kv_rows or raise gpu_memory "
                    f"({str(e).splitlines()[0][:60]})")
                raise self._failed[bid] from None

    def _draft_out_of_memory(self, prompts, e) -> CapacityError:
        return CapacityError(
            f"the draft's KV cache and prefill for a batch of {len(prompts)} sequences (longest "
            f"{max(map(len, prompts))} tokens) ran out of GPU memory ({self.budget.summary()} GiB held at "
            f"start): lower batch_size, give the draft a window (--draft-window), an fp8 draft, or "
            f"raise gpu_memory ({str(e).splitlines()[0][:60]})")

    def _batch(self, bid) -> dict:
        if bid in self.tb:
            return self.tb[bid]
        err = self._failed.get(bid)
        if isinstance(err, SpecOffloadError):  # the user's problem: the same one line, not a consequence
            raise err.with_traceback(None)  # a fresh traceback each time (scripts/ray_failed_calls.py)
        raise RuntimeError(f"batch {bid} did not start on the executor: {err}" if err else f"no batch {bid} on the executor")

    def keep(self, bid, idx):
        t = to_device(idx, self.device, torch.long)
        st = self._batch(bid)
        st["lens"] = st["lens"][t]
        self.runner.keep(bid, idx)
        if "gpu" in st:
            rows, _, _ = split_keep(idx, st["gpu"].rows)
            st["gpu"].keep(rows)

    def merge(self, bid, new, order=None):
        """Batch `new`'s sequences (prefilled, first tokens out) take rows of bid's: after its
        rows, or, with GPU rows on both sides, in `order` (placement/gpu_kv_rows.merge_order:
        indices into bid's rows followed by new's), new's GPU rows appended to bid's here."""
        st, nw = self._batch(bid), self.tb.pop(new)
        try:
            if "gpu" in nw and "gpu" not in st:
                raise RuntimeError(f"batch {new} brings GPU rows to batch {bid}, which has none")
            self.runner.merge(bid, new)
            st["lens"] = torch.cat([st["lens"], nw["lens"]])
            if "gpu" in nw:
                st["gpu"].append(nw["gpu"])  # into the storage its finished rows left: no allocation
            if order is not None:
                st["lens"] = st["lens"][to_device(order, self.device, torch.long)]
                self.runner.keep(bid, np.asarray(order))
        except BaseException as e:
            # The coordinator does not wait for a merge: a batch left half merged would run on
            # (rows and state of different heights, a device-side assert, a pass that never
            # ends). It fails instead, and its next pass reports this, in one line.
            self.free(bid, mailboxes=False)  # its mailboxes stay: its next pass marks them failed
            self.runner.free(new)
            event = f"rows joining batch {bid} ran out of GPU memory ({self.budget.summary()} GiB held)"
            self._failed[bid] = OutOfGpuMemoryMidRun(
                f"{event}: lower batch_size or gpu_kv_rows, or raise gpu_memory ({str(e).splitlines()[0][:60]})",
                what=event) if isinstance(e, torch.OutOfMemoryError) else e
            raise self._failed[bid] from None
        finally:
            self.mail.free(new)

    def free(self, bid, mailboxes: bool = True):
        self.tb.pop(bid, None)
        self._failed.pop(bid, None)
        self.runner.free(bid)
        self._drafting.pop(bid, None)
        if mailboxes:
            self.mail.free(bid)
        if not self.tb:  # nothing running: the rings kept for joins do not outlive the run
            self.mail.drop_spares()

    # -- prefill: each layer's weights serve every sub-batch before the next layer --------
    @torch.inference_mode()
    def prefill_layer(self, bid, s: int, j: int, in_pass: bool = False, after=None, overlap: bool = False):
        """Layer j for prefill sub-batch s, attention on the device; returns its K/V. in_pass:
        a part of the target pass now running (rows joining a batch), which releases the layer.
        after: with plan.shm_prefill, the K/V store whose ring slot this call reuses (Ray
        starts this call once it is done; the value itself is unused, see kv_ring.py).
        overlap (in_pass, on CUDA, with the ring): computed on a stream of its own beside the
        pass's parts, and returned before its K/V reach the ring (`_prefill_beside`).

        The driver queues every (layer, sub-batch) call before it waits on the head, so after a
        failure the rest would fail on its consequences (a layer slot never released). Instead
        the failing call and every one after it return None (the CPU worker stores nothing) and
        `prefill_head` raises the first error. They used to raise that one stored error object
        again, which lengthens its traceback with every raise: 960 calls took 110 s instead of
        1 s (`scripts/ray_failed_calls.py`, development machine), and W4's prefill error
        reached the user ~150 s late."""
        try:
            st = self._batch(bid)
        except Exception:  # noqa: BLE001 - a batch whose start failed: its head raises why
            st = None
        if st is not None and s == 0:
            self._joined_copies(st, before=j)  # the worker stores the layer before now, once this returns
        if st is None or "prefill_error" in st:
            if in_pass:  # the pass's own parts still count on this call to release the layer
                self._pass_layer_done(j)
            return None
        try:
            if overlap and in_pass and self.device.type == "cuda" and self.plan.shm_prefill:
                return self._prefill_beside(st, bid, s, j)
            return self._prefill_layer(st, bid, s, j, in_pass)
        except torch.OutOfMemoryError as e:
            self._prefill_failed(st, in_pass)
            P = self.plan.prefill_batch
            longest = max(map(len, st["prompts"][s * P:(s + 1) * P]))
            st["prefill_error"] = CapacityError(
                f"prefill ran out of GPU memory at layer {j} (sub-batch of {P} sequences, longest "
                f"{longest} tokens): lower prefill_batch or raise gpu_memory ({str(e).splitlines()[0]})")
        except Exception as e:  # noqa: BLE001 - kept for the head to raise
            self._prefill_failed(st, in_pass)
            st["prefill_error"] = e
        return None

    def _prefill_failed(self, st, in_pass: bool):
        """Leave the executor usable for the next batch: drop this one's prefill activations
        and free the weight slots the failed layer and its prefetch hold. In a pass (rows
        joining) the pass's own parts go on with the layer: `_prefill_layer` has counted it."""
        st.pop("subs", None)
        st.pop("ahead", None)
        if not in_pass:
            self.streamer.reset()

    def _pass_layer_done(self, j: int):
        """One part of the running pass is done with layer j: release it after the last."""
        if self.pass_layers.finished(j):
            self._done(j)

    def _prefill_layer(self, st, bid, s: int, j: int, in_pass: bool = False):
        P = self.plan.prefill_batch
        if j == 0 and s == 0 and not in_pass:  # a prefill pass of its own begins
            self._pass_boundary()
        n_sub = -(-len(st["prompts"]) // P)
        ahead = st.pop("ahead", None)  # (s, j, cache) a previous call launched, or what that raised
        try:
            if ahead is None:
                cache = self._prefill_compute(st, bid, s, j)
            elif ahead[:2] != (s, j):  # its sub-batch is a layer on: computing this one would be wrong
                raise RuntimeError(f"prefill call for sub-batch {s}, layer {j} came where sub-batch "
                                   f"{ahead[0]}, layer {ahead[1]} was launched ahead")
            elif isinstance(ahead[2], BaseException):
                raise ahead[2]
            else:
                cache = ahead[2]
        finally:  # done with the layer, even if it failed (a pass counts on every part)
            if in_pass:
                self._pass_layer_done(j)
            elif s == n_sub - 1:
                self._done(j)
        # The cache just built holds this layer's K/V padded as [P, Hkv, longest, d]: the
        # CPU worker stores that with one strided copy. Rows kept here (GPU rows) are not sent.
        k, v = self._keep_gpu_rows(st, s, j, cache)
        # None: no ring asked for, or page-locking it failed (then Ray's object store carries them)
        ring = self.mail.ensure_ring(bid, P, max(map(len, st["prompts"]))) if self.plan.shm_prefill else None
        if ring is None:
            with self.timer.host_span("to_host", f"b{bid} L{j} s{s} kv"):
                k, v = to_host(k, v)
            return to_wire(k), to_wire(v)
        # A batch's own prefill launches the next sub-batch's layer before it waits for this
        # one's K/V to reach the ring: the device computes while Ray returns this call and
        # starts the next (W4-small's trace, session 20: the device sat idle a median 1.5 ms
        # between sub-batches of 22.6). Rows joining a pass (in_pass) share the layer with the
        # pass's own parts, so they do not run ahead.
        nxt = (s + 1, j) if not in_pass and s + 1 < n_sub else None
        with self.timer.host_span("to_host", f"b{bid} L{j} s{s} kv"):
            return self._send_ahead(ring, j * n_sub + s, k, v, st, bid, nxt)

    def _prefill_beside(self, st, bid, s: int, j: int):
        """Rows joining a pass, their layer j on a stream of their own: the pass's parts,
        queued on the executor's stream after this call, do not wait for it there, and this
        call returns once it is launched, not done (the parts' hand-offs to the CPU worker
        wait on this actor's thread). Its K/V go to the ring on the K/V stream; the backend
        has the worker store them once this batch's next layer's first call, or its head,
        has returned: each of those first waits for the copies of the layers before it
        (`_joined_copies`), a layer of the pass later, when they are long done."""
        ring = self.mail.ensure_ring(bid, self.plan.prefill_batch, max(map(len, st["prompts"])))
        if ring is None:  # page-locking the ring failed: the plain path (Ray carries the K/V)
            return self._prefill_layer(st, bid, s, j, in_pass=True)
        side, cur = side_stream(JOIN_PREFILL, self.device), torch.cuda.current_stream(self.device)
        st["beside"] = True
        read = torch.cuda.Event()
        try:
            side.wait_stream(cur)  # the layer's copy (acquire), this batch's earlier state
            with torch.cuda.stream(side):
                cache = self._prefill_compute(st, bid, s, j)
                k, v = self._keep_gpu_rows(st, s, j, cache)
                copies = side_stream(KV_COPY, self.device)
                copies.wait_stream(side)
                with torch.cuda.stream(copies):
                    n_sub = -(-len(st["prompts"]) // self.plan.prefill_batch)
                    handle = kv_ring.send(ring, j * n_sub + s, k, v)
                done = torch.cuda.Event()
                done.record(copies)
        finally:  # the layer's slot waits for what read it here, even after a failed launch
            read.record(side)
            self._join_read[j] = read
            self._pass_layer_done(j)
        # kept (their memory too) until the copies are known done
        st.setdefault("joined_copies", []).append((j, done, cache, k, v))
        return handle

    def _keep_gpu_rows(self, st, s: int, j: int, cache: KVCache):
        """Sub-batch s's layer-j K/V, padded [P, Hkv, longest, d]: the batch's GPU rows among
        them are kept here (the last layer also sets their lengths); returns the rest's K/V,
        which the CPU worker stores."""
        k, v = cache.k[0], cache.v[0]
        if "gpu" not in st:
            return k, v
        P, last = self.plan.prefill_batch, j == self.spec.num_layers - 1
        st["gpu"].store_prefill(j, s * P, k, v, [len(p) for p in st["prompts"][s * P:(s + 1) * P]] if last else None)
        skip = max(0, st["gpu"].rows - s * P)
        return k[skip:], v[skip:]

    def _joined_copies(self, st, before: int | None = None):
        """Wait for the ring copies of a joining batch's layers before `before` (None: all)."""
        if not st.get("joined_copies"):
            return
        keep = []
        for entry in st["joined_copies"]:
            if before is None or entry[0] < before:
                entry[1].synchronize()
            else:
                keep.append(entry)
        st["joined_copies"] = keep

    def _prefill_compute(self, st, bid, s: int, j: int) -> KVCache:
        """Launch layer j of prefill sub-batch s on the device: its one-layer cache, which holds
        the K/V the CPU worker stores (attention runs here)."""
        spec, P = self.spec, self.plan.prefill_batch
        subs = st.setdefault("subs", {})
        if j == 0:
            prompts = st["prompts"][s * P:(s + 1) * P]
            toks, q_lens = packed(prompts, self.device)
            b, i = pack_index(q_lens, toks.shape[0])
            # seq_lens: the prompt's length, as a length-dependent RoPE needs (models/rope.py)
            # fused: plan.fused_prefill (models/fused.py)
            f = Forward.start(spec, self.glob, toks, i, q_lens[b], FUSED if self.fused_prefill else None)
            subs[s] = {"pass": f, "q_lens": q_lens, "longest": max(map(len, prompts))}
        sub = subs[s]
        w = self._layer(j)
        with self.timer.span("prefill", f"b{bid} L{j} s{s}"):
            ql = sub["q_lens"]
            cache = KVCache(1, len(ql), spec.num_kv_heads, spec.head_dim, sub["longest"],
                            spec.torch_dtype, self.device, (spec.sliding_windows[j],))
            # n_k on the host: reading the lengths would wait for the stream (rows joining a pass)
            cache.begin_pass(ql, sub["pass"].h.shape[0], sub["longest"], sub["longest"])
            sub["pass"].layer(w, partial(cache.attend_layer, 0))
            if j == spec.num_layers - 1:
                sub["logits"] = sub.pop("pass").logits(last_index(ql))
        return cache

    def _send_ahead(self, ring, call: int, k, v, st, bid, nxt):
        """Copy K/V into the ring's slot for `call` and return its handle once they are there,
        having launched sub-batch and layer `nxt` (or nothing) meanwhile. On CUDA the copies
        run on a stream of their own, so that compute does not queue behind them. What the
        launch raises (out of memory) is kept for the call that owns it, which raises it."""
        done = None
        if self.device.type == "cuda":
            stream = side_stream(KV_COPY, self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the K/V are computed
            with torch.cuda.stream(stream):
                handle = kv_ring.send(ring, call, k, v)
            done = torch.cuda.Event()
            done.record(stream)
        else:
            handle = kv_ring.send(ring, call, k, v)
        if nxt is not None:
            try:
                st["ahead"] = (*nxt, self._prefill_compute(st, bid, *nxt))
            except Exception as e:  # noqa: BLE001 - the next call raises it
                st["ahead"] = (*nxt, e)
        if done is not None:
            done.synchronize()  # k and v stay referenced until here: their memory is not reused early
        return handle

    @torch.inference_mode()
    def prefill_head(self, bid, u_sample):
        st = self._batch(bid)
        self._joined_copies(st)  # rows joining: the last layer's K/V, stored once this returns
        if st.pop("beside", False):  # and the logits and GPU rows, computed on the joining stream
            torch.cuda.current_stream(self.device).wait_stream(side_stream(JOIN_PREFILL, self.device))
        if "prefill_error" in st:
            raise st.pop("prefill_error")
        subs = st.pop("subs")
        logits = torch.cat([subs[s]["logits"] for s in sorted(subs)])
        try:
            return self.runner.finish(bid, logits[:, None], 0, None, u_sample, first=True)
        except torch.OutOfMemoryError as e:  # rows joining: their draft priming ran beside the pass
            raise self._draft_out_of_memory(st["prompts"], e) from None

    # -- one target pass (decode: k = 0, verification: k draft tokens + 1) ---------------
    # A pass runs the batch as micro-batches (contiguous ranges of its sequences), each
    # layer's weights serving all of them before release, so that while the CPU worker
    # attends for one micro-batch the GPU computes another.
    @torch.inference_mode()
    def verify_begin(self, bid, k: int, micro_batches: int = 1):
        try:
            return self._verify_begin(bid, k, micro_batches)
        except BaseException as e:
            # The CPU worker's calls for this pass are queued already, waiting on the doorbell
            # of a pass that will not come: they stop, and the pass's first layer call (the
            # first the coordinator reads) raises this.
            self.mail.fail(bid)
            if bid in self.tb:
                self.tb[bid].pop("parts", None)  # one begun partway is no pass to run
                self.tb[bid]["pass_error"] = e
            raise

    def _verify_begin(self, bid, k: int, micro_batches: int):
        st, spec = self._batch(bid), self.spec
        toks, q_lens = self.runner.target_inputs(bid, k)
        b, i = pack_index(q_lens, toks.shape[0])
        st["q_lens"] = q_lens
        ql = np.full(q_lens.shape[0], k + 1)  # what target_inputs feeds, known without a device read
        starts = [0, *ql.cumsum().tolist()]
        gpu = st.get("gpu")
        if gpu is not None and gpu.rows == 0:  # its GPU rows all finished: kept for rows joining later
            gpu = None
        # GPU rows [0, g) attend here; the CPU worker is sent the rest's q/k/v with its own row
        # numbers (the batch's row g is its row 0). part_ranges: the CPU rows' micro-batches, the
        # first also carrying the GPU rows (a batch of GPU rows only is one part, and the worker
        # gets an empty range for it).
        g = gpu.rows if gpu is not None else 0
        ranges = part_ranges(len(ql), g, micro_batches)
        passes = Forward.start(spec, self.glob, toks, st["lens"][b] + i).split(
            [(starts[lo], starts[hi]) for lo, hi in ranges])
        st["parts"] = []
        for p, ((lo, hi), f) in enumerate(zip(ranges, passes)):
            cpu_tokens = starts[hi] - starts[max(lo, g)]  # the part's rows past the GPU's g
            st["parts"].append({"bid": bid, "lo": lo, "hi": hi, "g": g, "q_lens_np": ql[max(lo, g):hi], "pass": f,
                                "g_tokens": starts[min(g, hi)] - starts[min(g, lo)], "tokens": cpu_tokens,
                                "box": self.mail.ensure(bid, p, max(1, cpu_tokens))})
        if gpu is not None:
            gpu.begin_pass(k + 1)
        return len(st["parts"])

    def pass_begin(self, parts: int):
        """The pass about to run has this many parts (micro-batches over all its batches)."""
        self._pass_boundary()
        self.pass_layers.begin(parts)

    def _pass_boundary(self):
        """Between passes no layer is in use. One still held comes from a pass that failed
        midway, on either side (a failed attention call never reaches this actor's later
        calls): give its slots back, or the next pass finds none free."""
        if self.streamer.in_use:
            self.streamer.reset()

    def _pre(self, part, j):
        w = self._layer(j)
        with self.timer.span("target", f"b{part['bid']} L{j} [{part['lo']}:{part['hi']}) qkv"):
            q, k, v = part["pass"].qkv(w)
        t, g = part["g_tokens"], part["g"]
        with self.timer.host_span("to_host", f"b{part['bid']} L{j} [{part['lo']}:{part['hi']}) qkv"):
            msg = self.mail.send_qkv(part["box"], q[t:], k[t:], v[t:], self._sync)
        # in the worker's rows (row g is its 0); a part of GPU rows only is the empty range there
        lo = max(part["lo"] - g, 0)
        hi = max(part["hi"] - g, lo)
        if not t:
            return msg, part["q_lens_np"], lo, hi
        # The GPU rows attend while the CPU worker attends for the rest (queued after the
        # copy out, so it does not delay the worker's q/k/v).
        with self.timer.span("target", f"b{part['bid']} L{j} [0:{min(g, part['hi'])}) gpu attention"):
            part["gpu_out"] = self._batch(part["bid"])["gpu"].attend(j, q[:t], k[:t], v[:t])
        self.gpu_row_tokens += t
        return msg, part["q_lens_np"], lo, hi

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _post(self, part, j, attn):
        attn = self.mail.recv_out(part["box"], attn, part["tokens"])  # first: a failed pass stops here
        if part["g_tokens"]:  # the GPU rows' output first: they are the batch's first rows
            attn = torch.cat([part.pop("gpu_out"), attn])
        w = self._layer(j)
        with self.timer.span("target", f"b{part['bid']} L{j} [{part['lo']}:{part['hi']}) ffn"):
            part["pass"].finish(w, attn)
        part["posted"] = j
        if self.pass_layers.finished(j):  # every part of the pass is past layer j: refill its slot
            self._done(j)

    def _copy_pending(self, j: int) -> bool:
        """Layer j's weights are far from in: acquiring them would block this thread a while."""
        return j not in self.resident and self.streamer.pieces_pending(j)

    def _post_arrived(self, parts: list, p: int, j: int):
        """While layer j+1's weights still copy, finish layer j for the batch's later parts
        whose attention output is back already (a doorbell pass; their own calls then skip it).
        Their calls come after this one, which would wait for the copy first: the last part's
        FFN frees layer j's slot, which the copy after the awaited one needs (w1-long's two
        slots: the copy engine idled ~5 ms a pass for it, session 37's trace)."""
        for part in parts[p + 1:]:
            if part.get("posted") != j and self.mail.out_arrived(part["box"]):
                self._post(part, j, BELL)
                self.early_posts += 1

    @torch.inference_mode()
    def target_layer(self, bid, j: int, attn, p: int = 0):
        """Micro-batch p: finish layer j-1 with its attention output (j > 0), start layer j.

        The pass's later calls take this one's output (through the CPU worker), so Ray fails
        them with its error without running them; an out-of-memory becomes a one-line
        CapacityError, and the weight slots the pass held are given back for the next one.
        attn BELL (plan.layer_doorbell): the output comes through the mailbox (actors/doorbell.py);
        a failure here then marks it failed, so the worker's queued calls stop waiting."""
        try:
            st = self._batch(bid)
            parts = st.get("parts")
            if parts is None:
                err = st.pop("pass_error", None)
                raise err.with_traceback(None) if err else RuntimeError(f"batch {bid}'s pass did not begin")
            if j > 0 and parts[p].get("posted") != j - 1:  # (an earlier call may have finished it)
                self._post(parts[p], j - 1, attn)
            if j > 0 and isinstance(attn, str) and attn == BELL and self.post_early and self._copy_pending(j):
                self._post_arrived(parts, p, j - 1)
            return self._pre(parts[p], j)
        except BaseException as e:
            self.mail.fail(bid)
            if not isinstance(e, torch.OutOfMemoryError):
                raise
            self.streamer.reset()
            event = (f"a verification pass ran out of GPU memory at layer {j} ({int(parts[p]['hi'] - parts[p]['lo'])} "
                     f"sequences, {int(parts[p]['q_lens_np'][0])} tokens each)")
            raise OutOfGpuMemoryMidRun(f"{event}: lower batch_size or the draft length, or raise gpu_memory "
                                       f"({str(e).splitlines()[0]})", what=event) from None

    @torch.inference_mode()
    def verify_head(self, bid, k: int, u_accept, u_sample, *attns):
        """Finish the last layer of every micro-batch (one attention output each), then verify."""
        st, spec = self._batch(bid), self.spec
        parts = st.pop("parts")
        for p, attn in enumerate(attns):
            self._post(parts[p], spec.num_layers - 1, attn)
        with self.timer.span("target"):
            logits = Forward.logits_of([x["pass"] for x in parts])
        B = st["q_lens"].shape[0]
        res = self.runner.finish(bid, logits.view(B, k + 1, -1), k, u_accept, u_sample)  # (tokens, counts[, logprobs])
        if "gpu" in st and st["gpu"].rows:  # (none: the pass left it out, verify_begin)
            st["gpu"].finish_pass(k + 1, res[1])
        st["lens"] = st["lens"] + to_device(res[1], self.device, torch.long)
        return res

    # -- draft -----------------------------------------------------------------------------
    def propose(self, bid, k, u_draft):
        with self.timer.span("draft", f"b{bid} k={k}"):
            self.runner.propose(bid, k, u_draft)

    def draft_begin(self, bid, k, u_draft):
        self._drafting[bid] = self.runner.propose_steps(bid, k, u_draft)

    def draft_step(self, bid, n: int = 1):
        """Run n more draft steps for a batch whose proposals were begun earlier."""
        it = self._drafting.get(bid)
        with self.timer.span("draft", f"b{bid} step"):
            for _ in range(n):
                if it is None or next(it, None) is None:
                    self._drafting.pop(bid, None)
                    break

    def draft_finish(self, bid):
        it = self._drafting.pop(bid, None)
        if it is not None:
            with self.timer.span("draft"):
                for _ in it:
                    pass

    def set_worker_pid(self, pid: int):
        """The CPU worker's process, written into every mailbox from now on (actors/doorbell.py)."""
        self.mail.worker_pid = int(pid)

    def set_copy_chunk(self, mib: int):
        """Weight copies issued in pieces of `mib` MiB from the next layer queued on."""
        self.streamer.set_chunk(mib << 20)

    def set_switch(self, name: str, on: bool) -> bool:
        """One of the executor's plan switches (SWITCHES: plan.draft_feed_last, early_posts,
        mapped_out, draft_prime_beside, fused_prefill) from the next round, pass, join or
        prefill sub-batch on; what it took
        (mapped_out needs CUDA). Benchmarks compare both ways on the same actors."""
        if name not in self.SWITCHES:
            raise ValueError(f"{name!r} is not one of the executor's switches {self.SWITCHES}")
        on = bool(on)
        if name == "draft_feed_last":
            self.runner.feed_last = None if on else False  # None: on where the steps are graphed
        elif name == "early_posts":
            self.post_early = on
        elif name == "mapped_out":
            self.mail.mapped_out = on = on and self.device.type == "cuda"
        elif name == "fused_prefill":
            self.fused_prefill = on
        else:
            self.runner.prime_beside = on
        return on

    def set_draft_kv(self, kv: DraftKV):
        """The draft KV placement for batches started from now on (benchmarks compare them)."""
        if self.runner.batches:
            raise RuntimeError("the draft KV policy changes only between runs")
        self.runner.configure(kv)

    # -- measurements ----------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.timer.collect()
        s.setdefault("weight_copy_s", 0.0)
        s["weight_bytes"] = self.streamer.bytes_copied
        s["draft_graph_steps"] = self.runner.graph_steps
        s["gpu_row_tokens"] = self.gpu_row_tokens  # (token, layer) pairs attended here (plan.gpu_kv_rows)
        s["executor_bell_wait_s"] = round(self.mail.bell_wait_s, 3)
        s["early_posts"] = self.early_posts  # parts' layers finished while the next layer copied
        return s

    def trace_events(self) -> list[dict]:
        return self.timer.take_events()
