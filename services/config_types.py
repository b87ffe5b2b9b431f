"""The building blocks every config section shares: the frozen, closed section base and bounded number types."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Prob = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class Section(BaseModel):
    """A config section: unknown keys are errors; frozen, so an actor's section cannot change under it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


__all__ = ["Beta", "NonNegFloat", "NonNegInt", "PosFloat", "PosInt", "Prob", "Section"]
