"""An experiment grid: strategies x budgets x kappa x R x seeds over shared run options."""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, field_validator, model_validator

from protocol.config import FULL_EARLYSTOP, GRADMATCH_PB, ROUND_STRATEGIES, STRATEGIES, RunConfig, Strict


class Grid(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the experiment folder")
    base: dict = Field(default_factory=dict, description="shared run options (any part of the config tree)")
    strategies: tuple[str, ...] = Field(min_length=1, description="strategy names; FULL is always run as reference")
    budgets: tuple[float, ...] = Field((0.1,), min_length=1)
    kappas: tuple[float, ...] = Field((0.5,), min_length=1, description="0: no warm start")
    select_every: tuple[int, ...] = Field((20,), min_length=1)
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    earlystop_match: str = Field(
        GRADMATCH_PB, description="FULL-EARLYSTOP stops at the wall time of this strategy's trial (largest kappa)"
    )
    strategy_options: dict[str, dict] = Field(default_factory=dict, description="per-strategy selector options")

    @field_validator("strategies")
    @classmethod
    def _known(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in names if n not in STRATEGIES]
        if unknown:
            raise ValueError(f"strategies {unknown} unknown; must be among {', '.join(STRATEGIES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"strategies == {list(names)}, must not repeat")
        return names

    @model_validator(mode="after")
    def _consistent(self) -> "Grid":
        if FULL_EARLYSTOP in self.strategies and self.earlystop_match not in self.strategies:
            raise ValueError(
                f"earlystop_match == {self.earlystop_match!r}, must be one of the grid's strategies"
            )
        if FULL_EARLYSTOP in self.strategies and self.earlystop_match not in ROUND_STRATEGIES:
            raise ValueError(
                f"earlystop_match == {self.earlystop_match!r}, must be a strategy that selects "
                f"({', '.join(ROUND_STRATEGIES)})"
            )
        for budget in self.budgets:
            if not 0 < budget <= 1:
                raise ValueError(f"budgets contains {budget}, each must be in (0, 1]")
        RunConfig.model_validate(self.base)  # shared options must make a valid run on their own
        return self


class Trial(Strict):
    """One run of the grid; ``key`` names its folder, so a resumed experiment finds it again."""

    strategy: str
    budget: float
    kappa: float
    select_every: int
    seed: int
    matches: str | None = Field(None, description="FULL-EARLYSTOP: key of the trial whose wall time it matches")
    config: dict

    @property
    def key(self) -> str:
        text = json.dumps({"strategy": self.strategy, "config": self.config, "matches": self.matches}, sort_keys=True)
        label = f"{self.strategy}-b{self.budget:g}-k{self.kappa:g}-r{self.select_every}-s{self.seed}"
        return f"{label}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
