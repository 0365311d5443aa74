"""Kedro settings for perturbscope."""

from kedro.config import OmegaConfigLoader
from omegaconf.resolvers import oc

from perturbscope.hooks import (
    OnDiskScreenHook,
    ProjectStoreHook,
    RunInfoHook,
    RunOutputsHook,
    ScreenTagHook,
)

HOOKS = (
    ProjectStoreHook(),
    OnDiskScreenHook(),
    RunOutputsHook(),
    ScreenTagHook(),
    RunInfoHook(),
)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # ``oc.env`` lets the ``test`` environment point outputs at a temporary folder.
    "custom_resolvers": {"oc.env": oc.env},
    # the screens registry (conf/<env>/screens.yml) is read as globals, so the catalog
    # (raw_screen's file) and the parameters (schema overrides) both see it
    "config_patterns": {
        "globals": ["globals.yml", "screens.yml"],
        # kedro-mlflow adds this pattern in its hook; declared here so that mlflow.yml can also
        # be read without a context (the retrain CLI checks a screen before creating one)
        "mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"],
    },
    # an environment (local, test) overrides single nested knobs, not whole sections
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}
