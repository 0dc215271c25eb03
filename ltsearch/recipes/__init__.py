"""Recipes composed of parts, each part one module found by name in its registry:
``losses/`` (LOSSES), ``arch/`` (ARCHS), ``stage2/`` (STAGE2), ``finetune/`` (FINETUNE); class weights, samplers, mixup and
post-hoc adjustment are sections of the recipe. Presets name common compositions."""
from ltsearch.recipes import arch, finetune, losses, stage2  # noqa: F401  (registers the parts)
from ltsearch.recipes.presets import PRESETS
from ltsearch.recipes.protocol import (ARCHS, FINETUNE, LOSSES, STAGE2, Batch, Method, MethodContext, Phase,
                                       Registry)
from ltsearch.recipes.recipe import (Recipe, RecipeConfig, check_backbone, check_recipe, load_recipe,
                                     reported_metrics, scale_recipe)

__all__ = ["ARCHS", "FINETUNE", "LOSSES", "STAGE2", "PRESETS", "Batch", "Method", "MethodContext", "Phase",
           "Recipe", "RecipeConfig", "Registry", "check_backbone", "check_recipe", "load_recipe",
           "reported_metrics", "scale_recipe"]
