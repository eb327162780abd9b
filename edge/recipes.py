"""Recipes: named rule sets of the station config that a trigger selects per part.

A PLC that runs several part types on one line names the type with each job (OPC UA StartJob's
`recipe`, or "recipe" in an MQTT trigger). A recipe overrides the station's effective limits
(package values overridden by `rules:`) field by field, so it lists only what differs. The
variant shares the compiled model: only the postprocess parameters and verdict limits change,
and the event's `rules` records which recipe judged the part (`rules.recipe`).
"""

from __future__ import annotations

import dataclasses
import threading

from edge.config import RulesConfig
from edge.model_loader import LoadedModel
from edge.rules import effective_rules


class Recipes:
    """Thread-safe: the submit thread asks, a reload swaps the base model underneath."""

    def __init__(self, recipes: dict[str, RulesConfig]) -> None:
        self.rules = dict(recipes)
        self._lock = threading.Lock()
        self._base: LoadedModel | None = None
        self._variants: dict[str, LoadedModel] = {}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.rules)

    def model(self, base: LoadedModel, name: str) -> LoadedModel:
        """`base` judging by recipe `name`; KeyError for a name the config does not have (the gate
        refuses those before a frame is taken)."""
        with self._lock:
            if base is not self._base:  # a reload: variants of the old model must not outlive it
                self._base, self._variants = base, {}
            variant = self._variants.get(name)
            if variant is None:
                variant = self._variants[name] = apply_recipe(base, name, self.rules[name])
            return variant


def apply_recipe(base: LoadedModel, name: str, recipe: RulesConfig) -> LoadedModel:
    """A copy of `base` with the recipe's set fields replacing its effective values."""
    policy = effective_rules(base.params, recipe, base.rules)
    rules_dict = {**policy.to_dict(), "roi": base.rules_dict.get("roi"), "recipe": name}
    return dataclasses.replace(base, params=policy.params, rules=policy.rules, rules_dict=rules_dict)
