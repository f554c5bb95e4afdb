"""What `specoffload bench` varies between the timed runs of one invocation: the comma-list
flags, parsed and checked once (`SettingLists`), and one run's values (`RunSettings`). Each
list of more than one value runs every mode at each of its values, and names the run by it."""
from __future__ import annotations

from dataclasses import dataclass

from specoffload.placement.plan import Plan


class BenchError(Exception):
    """A bad option or a run that cannot start: one line, exit status 2."""


@dataclass(frozen=True)
class RunSettings:
    """One timed run's settings beside its mode (schedule, k, draft KV placement)."""

    micro_batches: int
    resident: int  # target layers the actors keep on the GPU (fixed when they start)
    doorbell: bool
    copy_chunk_mib: int
    gpu_kv_rows: int
    join_overlap: bool
    draft_feed_last: bool
    refill_rows: int  # 0: placement/refill.py's default for the batch
    draft_prime_beside: bool
    mapped_out: bool
    early_posts: bool
    fused_prefill: bool
    kv_huge_pages: bool = False

    def __post_init__(self):
        least = {"micro_batches": 1, "copy_chunk_mib": 1, "resident": 0, "gpu_kv_rows": 0, "refill_rows": 0}
        for name, low in least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


def _switches(text: str, flag: str) -> list[bool]:
    items = text.split(",")
    if any(x not in ("0", "1") for x in items):  # "10" too: each item is one switch
        raise BenchError(f"{flag} needs a comma list of 0 and 1, got {text!r}")
    return [x == "1" for x in items]


def _counts(text: str, flag: str, what: str, least: int = 1) -> list[int]:
    """A comma list of integers >= least (a flag's values), or a one-line BenchError."""
    try:
        values = [int(x) for x in text.split(",")]
        if min(values) < least:
            raise ValueError
    except ValueError:
        raise BenchError(f"{flag} needs a comma list of {what} >= {least}, got {text!r}") from None
    return values


@dataclass(frozen=True)
class SettingLists:
    """The list flags of one invocation. Speculative modes run at every combination; the plain
    baseline has no draft, so it keeps the first join, feed, refill and priming setting and
    varies only the lists that concern it too (micro-batches, copy pieces, GPU rows, how the
    attention output comes back, parts finished early, fused prefill)."""

    micro_batches: list[int]
    doorbell: list[bool]
    copy_chunk_mib: list[int]
    baseline_copy_chunk_mib: list[int]
    gpu_kv_rows: list[int]
    join_overlap: list[bool]
    draft_feed_last: list[bool]
    refill_rows: list[int]
    draft_prime_beside: list[bool]
    mapped_out: list[bool]
    early_posts: list[bool]
    fused_prefill: list[bool]
    kv_huge_pages: list[bool]
    # the baseline runs only each pass switch list's first value (--baseline-switches first):
    # one plain run instead of one a combination, where a call has device time for one
    baseline_switches_first: bool = False

    @classmethod
    def parse(cls, a, cuda: bool = False) -> SettingLists:
        """From bench's parsed flags (gpu_kv_rows already counted: `auto` needs the model);
        cuda: where the runs go, for the plan's defaults that depend on it (fused_prefill)."""
        chunks = _counts(a.copy_chunk_mib, "--copy-chunk-mib", "sizes")
        return cls(
            micro_batches=_counts(a.micro_batches, "--micro-batches", "counts"),
            doorbell=_switches(a.doorbell, "--doorbell"),
            copy_chunk_mib=chunks,
            baseline_copy_chunk_mib=chunks[:1] if a.baseline_copy_chunk_mib is None else _counts(
                a.baseline_copy_chunk_mib, "--baseline-copy-chunk-mib", "sizes"),
            gpu_kv_rows=list(a.gpu_kv_rows),
            join_overlap=_switches(a.join_overlap, "--join-overlap"),
            draft_feed_last=_switches(a.draft_feed_last, "--draft-feed-last"),
            refill_rows=_counts(a.refill_rows, "--refill-rows", "integers", least=0),
            draft_prime_beside=_switches(a.draft_prime_beside, "--draft-prime-beside"),
            mapped_out=_switches(a.mapped_out, "--mapped-out"),
            early_posts=_switches(a.early_posts, "--early-posts"),
            fused_prefill=_switches(a.fused_prefill or str(int(Plan(device="cuda" if cuda else "cpu").fused_prefill)),
                                    "--fused-prefill"),
            kv_huge_pages=_switches(a.kv_huge_pages, "--kv-huge-pages"),
            baseline_switches_first=a.baseline_switches == "first")

    def first(self, resident: int = 0) -> RunSettings:
        """The plan's settings: each list's first."""
        return RunSettings(self.micro_batches[0], resident, self.doorbell[0], self.copy_chunk_mib[0],
                           self.gpu_kv_rows[0], self.join_overlap[0], self.draft_feed_last[0], self.refill_rows[0],
                           self.draft_prime_beside[0], self.mapped_out[0], self.early_posts[0], self.fused_prefill[0],
                           self.kv_huge_pages[0])

    def runs(self, resident: int, micro: int | None = None) -> list[RunSettings]:
        """A speculative mode's runs, in the order the table lists them (micro: the mode's own
        micro-batch count, if its name gives one)."""
        return [RunSettings(m, resident, bell, chunk, rows, join, feed, rr, prime, mapped, early, fused, huge)
                for m in ([micro] if micro else self.micro_batches) for bell in self.doorbell
                for chunk in self.copy_chunk_mib for rows in self.gpu_kv_rows for mapped in self.mapped_out
                for early in self.early_posts for fused in self.fused_prefill for huge in self.kv_huge_pages
                for join in self.join_overlap for feed in self.draft_feed_last
                for rr in self.refill_rows for prime in self.draft_prime_beside]

    def baseline_runs(self, resident: int, gpu_rows: list[int]) -> list[RunSettings]:
        """The plain baseline's runs: its micro-batches, copy pieces, GPU row counts, ways the
        attention output comes back, early posts and fused prefill (only the first of those
        three with baseline_switches_first); doorbells if any run had them."""
        first = self.first(resident)
        n = 1 if self.baseline_switches_first else None
        return [RunSettings(m, resident, max(self.doorbell), chunk, rows, first.join_overlap, first.draft_feed_last,
                            first.refill_rows, first.draft_prime_beside, mapped, early, fused, huge)
                for m in self.micro_batches for chunk in self.baseline_copy_chunk_mib for rows in gpu_rows
                for mapped in self.mapped_out[:n] for early in self.early_posts[:n] for fused in self.fused_prefill[:n]
                for huge in self.kv_huge_pages[:n]]

    def suffix(self, s: RunSettings, baseline: bool) -> str:
        """The part of a run's name that tells it from the invocation's other runs: a tag for
        each list of more than one value (the baseline's draft-only settings are not varied)."""
        out = ""
        if len(self.doorbell) > 1:
            out += "/bell" if s.doorbell else "/ray"
        if len(self.copy_chunk_mib) > 1 or len(self.baseline_copy_chunk_mib) > 1:
            out += f"/c{s.copy_chunk_mib}"
        if len(self.gpu_kv_rows) > 1:
            out += f"/g{s.gpu_kv_rows}"
        if len(self.mapped_out) > 1:
            out += "/mo" if s.mapped_out else "/md"
        if len(self.early_posts) > 1:
            out += "/ep" if s.early_posts else "/op"
        if len(self.fused_prefill) > 1:
            out += "/fused" if s.fused_prefill else "/eager"
        if len(self.kv_huge_pages) > 1:
            out += "/hp" if s.kv_huge_pages else "/sp"
        if baseline:
            return out
        if len(self.join_overlap) > 1:
            out += "/jo" if s.join_overlap else "/jl"
        if len(self.draft_feed_last) > 1:
            out += "/fd" if s.draft_feed_last else "/nf"
        if len(self.refill_rows) > 1:
            out += f"/r{s.refill_rows or 'auto'}"
        if len(self.draft_prime_beside) > 1:
            out += "/pb" if s.draft_prime_beside else "/pi"
        return out

