"""The base of every parameter set: an algorithm's settings and a config section alike."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Typed settings: unknown keys and wrong types are errors, values are immutable.

    An algorithm declares its parameters as a subclass next to its code (its one
    source of defaults and bounds); the study config embeds that class as a section.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
