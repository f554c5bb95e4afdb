"""What a user sets for an engine besides the model, the draft and the plan, as vLLM's
`EngineArgs`: one frozen, self-checking value that `LLM(**kwargs)` and the CLI flags (the
same names) both fill. None means "the plan's value", or the default the comment gives.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..errors import ConfigError
from ..placement.draft_kv import PLACEMENTS
from ..placement.plan import Plan
from ..scheduler.schedule import SCHEDULES
from ..sources.fp8_quantize import QUANTIZE_CHOICES
from .run_config import RunConfig

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineArgs:
    engine: str = "ray"  # "ray": the four actors; "reference": the plain in-process path
    device: str = "auto"  # without a plan: "cuda" if there is one, else "cpu"
    gpu_memory: int | str | None = None  # without a plan: the executor's memory cap
    schedule: str | None = None  # "single" with a draft, else "none" (or the planner's)
    k: int | None = None  # draft tokens per round: RunConfig's (or the planner's)
    adaptive_k: bool | None = None  # off (or the planner's)
    batch_size: int | None = None  # the plan's (Plan's default without one)
    dtype: str | None = None  # the checkpoint's
    draft_window: int | None = None  # with draft_kv_fp8: replace the plan's ring
    draft_kv_fp8: bool = False
    draft_sinks: int | None = None
    draft_kv: str | None = None  # placement/draft_kv.py's PLACEMENTS
    draft_fp8: bool = False  # a separate draft's matrices in fp8
    # "fp8": a bf16 target quantized per channel as it loads (sources/fp8_quantize.py): half
    # the bytes in host memory and per pass. An fp8 checkpoint is fp8 without it.
    quantize: str | None = None
    micro_batches: int | None = None
    # The first rows of each batch keep their target KV on the GPU and attend there (the
    # plan's value, 0 without a plan; placement/gpu_kv_rows.py)
    gpu_kv_rows: int | None = None
    # Waiting requests take finished rows of the running batch (None: the planner's choice,
    # else placement/refill.py's default: off until measured on the GPU)
    refill: bool | None = None
    refill_prefill: str = "pass"  # joining rows' prefill rides the next pass, or "own" pass (RunConfig)
    # riding a pass, beside its parts on a stream of their own (True) or in line with them
    # (None: the plan's, in line; Plan.join_overlap)
    join_overlap: bool | None = None
    trace: bool = False  # keep a timeline of stage spans (engine "ray")
    ray_address: str | None = None
    # Ray's dashboard on the local cluster this starts, if it starts one (None: on, unless
    # SPECOFFLOAD_DASHBOARD=0)
    dashboard: bool | None = None
    progress: bool = True
    workload: object = None  # with plan="auto": a placement.planner.Workload to plan for

    def __post_init__(self):
        if self.engine not in ("ray", "reference"):
            raise ConfigError(f"engine must be 'ray' or 'reference', got {self.engine!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.draft_kv is not None and self.draft_kv not in PLACEMENTS:
            raise ConfigError(f"draft_kv must be one of {', '.join(PLACEMENTS)}, got {self.draft_kv!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} or None, got {self.quantize!r}")
        if self.trace and self.engine != "ray":
            raise ConfigError("a timeline trace needs engine='ray' (the spans are the actors')")

    @classmethod
    def from_cli(cls, args, **over) -> "EngineArgs":
        """From parsed `cli.add_engine_options` flags (the same names), `over` taking precedence."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)} | over)

    def plan_from(self, plan, num_layers: int) -> Plan:
        """`plan` (a Plan, a dict, a file, or None for one from device/gpu_memory/batch_size)
        with these arguments applied over it, checked against the model's layers."""
        if isinstance(plan, Plan):
            p = plan
        elif isinstance(plan, dict):
            p = Plan.from_dict(plan)
        elif plan is not None:
            p = Plan.from_file(plan)
        else:
            device = self.device
            if device == "auto":
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            p = Plan(device=device, gpu_memory=self.gpu_memory, batch_size=self.batch_size or Plan.batch_size)
        if self.batch_size is not None and p.batch_size != self.batch_size:
            p = replace(p, batch_size=self.batch_size)
        if self.draft_window is not None or self.draft_kv_fp8:
            p = replace(p, draft_window=self.draft_window, draft_kv_fp8=self.draft_kv_fp8)
        if self.draft_fp8:
            p = replace(p, draft_fp8=True)
        p.check_layers(num_layers)
        if self.micro_batches is not None or self.draft_sinks is not None or self.draft_kv is not None:
            p = replace(p, micro_batches=self.micro_batches or p.micro_batches,
                        draft_sinks=p.draft_sinks if self.draft_sinks is None else self.draft_sinks,
                        draft_kv=self.draft_kv or p.draft_kv)
        if self.gpu_kv_rows is not None:
            p = replace(p, gpu_kv_rows=self.gpu_kv_rows)
        if self.join_overlap is not None:
            p = replace(p, join_overlap=bool(self.join_overlap))
        if self.trace:
            p = replace(p, trace=True)
        return p

    def run_config(self, batch_size: int, has_draft: bool, chosen: dict | None = None) -> RunConfig:
        """The run's settings: these arguments, else the planner's `chosen` run options, else
        the defaults."""
        chosen = chosen or {}
        schedule = self.schedule or chosen.get("schedule") or ("single" if has_draft else "none")
        if schedule != "none" and not has_draft:
            raise ConfigError(f"schedule {schedule!r} needs a draft (--draft self:N or a checkpoint folder)")
        k = self.k if self.k is not None else chosen.get("k", RunConfig.k)
        adaptive_k = bool(self.adaptive_k if self.adaptive_k is not None else chosen.get("adaptive_k"))
        refill = self.refill if self.refill is not None else chosen.get("refill")
        return RunConfig(schedule=schedule, k=k, k_max=max(k, 8), adaptive_k=adaptive_k, batch_size=batch_size,
                         refill=refill, refill_rows=chosen.get("refill_rows", 0) if refill else 0,
                         refill_prefill=self.refill_prefill)
