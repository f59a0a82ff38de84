"""What a ``tokensift bench`` run does: :class:`BenchConfig`, the named suites, and the cells'
settings (one policy at one size)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokensift.bench.tasks import QUERY_AGNOSTIC, RULER_TASKS, get_task
from tokensift.errors import TokensiftError
from tokensift.policies import POLICIES, build_policy

# wrapped combinations the bench adds to the registry: only inners other than the wrapper's default
# (graphkv, pyramidkv and adakv already wrap snapkv; caote wraps h2o)
WRAPPED_DEFAULTS = ("caote(snapkv)",)
ALL_TOKENS = "@all"  # policy suffix: one setting with no budget
KERNELS = ("packed", "stock")


@dataclass
class BenchConfig:
    """What to run. ``for_suite`` fills the suite's defaults; explicit values win."""

    suite: str = "quick"
    policies: list[str] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=lambda: [QUERY_AGNOSTIC])
    samples: int = 2
    seed: int = 0
    ppl_length: int = 8192
    ppl_samples: int = 1
    fidelity_samples: int = 2
    cost_lengths: list[int] = field(default_factory=list)
    full_only_tasks: list[str] = field(default_factory=list)  # retrieval tasks run with the full cache only
    lm_budgets: list[int] = field(default_factory=list)  # ppl/fidelity budgets (default: ``budgets``)
    model: str | None = None
    kernels: str = "packed"  # linear layers on prepacked oneDNN weights ("stock": PyTorch's default path)
    device: str | None = None  # where the model runs (None: the CPU); see tokensift.devices
    dtype: str | None = None  # the model's weights (None: float32, the exact reference)
    length_samples: list[list[int]] = field(default_factory=list)  # [[length, samples], ...]: fewer prompts at some lengths
    full_gate: float | None = None  # run a task's policies only where the full cache scores at least this

    def samples_at(self, length: int) -> int:
        """Retrieval prompts per cell at ``length`` (``samples`` unless ``length_samples`` says otherwise)."""
        return dict((n, s) for n, s in self.length_samples).get(length, self.samples)

    @classmethod
    def for_suite(cls, suite: str, **overrides) -> BenchConfig:
        if suite not in SUITES:
            raise TokensiftError(f"unknown suite '{suite}'; use one of: {', '.join(SUITES)}")
        base = SUITES[suite]()
        if overrides.get("tasks") is not None and overrides.get("full_only_tasks") is None:
            base.full_only_tasks = []  # tasks named by hand run with every policy
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        if not base.policies:
            base.policies = default_policies()
        return base


def default_policies() -> list[str]:
    """Every registered policy that builds on its own, plus the usual wrapper combinations."""
    names = sorted(POLICIES)
    wrapped = [expr for expr in WRAPPED_DEFAULTS if expr.split("(")[0] in POLICIES]
    return ["full"] + [n for n in names if n != "full"] + wrapped


SUITES = {
    "quick": lambda: BenchConfig(
        suite="quick", budgets=[128], lengths=[1024], tasks=list(RULER_TASKS) + ["ppl", "fidelity", "cost"],
        samples=2, ppl_length=2048, fidelity_samples=1, cost_lengths=[1024],
        policies=["full", "streaming_llm", "snapkv", "h2o", "tova", "knorm", "a2sf", "random"],
    ),
    # the full matrix on the task the full cache solves at 4k (>= 0.5 over 20 prompts on the embedded
    # model: niah only); the others get their full-cache score only, which the report lists (name them
    # with --tasks to run them with every policy)
    "standard": lambda: BenchConfig(
        suite="standard", budgets=[64, 128, 256, 512, 1024], lengths=[4096],
        tasks=list(RULER_TASKS) + ["ppl", "fidelity", "cost"], samples=20, cost_lengths=[4096],
        full_only_tasks=["niah_multivalue", "niah_multikey", "niah_multiquery", "vt", "cwe"], lm_budgets=[128, 512],
    ),
    "full": lambda: BenchConfig(
        suite="full", budgets=[64, 128, 256, 512, 1024], lengths=[1024, 2048, 4096, 8192],
        tasks=list(RULER_TASKS) + ["ppl", "fidelity", "cost"], samples=20,
        protocols=[QUERY_AGNOSTIC, "query_aware"], cost_lengths=[1024, 2048, 4096, 8192],
    ),
    # long context on Gemma 3 270M (32k context; 15 of its 18 layers slide over 512 tokens, so
    # policies act on the 3 full-attention layers): each task's full cache first, then every policy
    # at 4 budgets where the full cache scores >= 0.3 (the others are reported, not run further)
    "long": lambda: BenchConfig(
        suite="long", model="gemma3", budgets=[256, 512, 1024, 2048], lengths=[8192, 16384, 32768],
        tasks=["niah", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "essay_qa"],
        samples=8, length_samples=[[32768, 4]], full_gate=0.3,
    ),
}


@dataclass(frozen=True)
class Setting:
    """One policy at one size."""

    policy: str
    budget: int | None = None
    ratio: float | None = None

    @property
    def label(self) -> str:
        if self.budget is not None:
            return f"{self.policy}@{self.budget}"
        return f"{self.policy}@r{self.ratio}" if self.ratio is not None else self.policy

    def build(self):
        return build_policy(self.policy, budget=self.budget, ratio=self.ratio)


def settings_for(config: BenchConfig, budgets: list[int] | None = None) -> list[Setting]:
    """Every (policy, size) pair; ``full`` once; policies that fail to build are reported and skipped.

    ``name@all`` runs a policy once without a budget (e.g. ``zipcache@all``: quantize, evict nothing).
    """
    out = []
    for policy in config.policies:
        if policy == "full" or policy.endswith(ALL_TOKENS):
            out.append(Setting(policy.removesuffix(ALL_TOKENS)))
            continue
        budgets = config.budgets if budgets is None else budgets
        sizes = [Setting(policy, budget=b) for b in budgets] + [Setting(policy, ratio=r) for r in config.ratios]
        for setting in sizes:
            try:
                setting.build()
            except TokensiftError as error:
                print(f"skipping {setting.label}: {error}")
                continue
            out.append(setting)
    return out


def cell_key(task: str, protocol: str, length: int, setting: Setting) -> str:
    return f"{task}|{protocol}|{length}|{setting.label}"



def check_config(config: BenchConfig) -> None:
    """One-line errors for a matrix no run can do: unknown tasks, protocols or policies, sizes out of range."""
    from tokensift.bench.tasks.base import context_length
    from tokensift.bench.tasks.instance import check_protocol
    from tokensift.policies.registry import get_policy_class, parse_expression

    for name in config.tasks + config.full_only_tasks:
        if name != "cost":
            get_task(name)
    for protocol in config.protocols:
        check_protocol(protocol)
    for length in config.lengths + config.cost_lengths + ([config.ppl_length] if "ppl" in config.tasks else []):
        context_length(length)
    for count, what in ((config.samples, "--samples"), (config.ppl_samples, "ppl samples"), (config.fidelity_samples, "fidelity samples")):
        if count < 1:
            raise TokensiftError(f"{what} must be at least 1, got {count}")
    for budget in config.budgets + config.lm_budgets:
        if budget < 1:
            raise TokensiftError(f"a budget must be at least 1 token, got {budget}")
    for ratio in config.ratios:
        if not 0.0 < ratio < 1.0:
            raise TokensiftError(f"a ratio must be between 0 and 1 exclusive, got {ratio}")
    for expression in config.policies:
        node = parse_expression(expression.removesuffix(ALL_TOKENS))
        while node is not None:
            get_policy_class(node.name)
            node = node.inner
