"""Kedro settings for perturbscope."""

from omegaconf.resolvers import oc

from kedro.config import OmegaConfigLoader

from perturbscope.hooks import ScreenTagHook

HOOKS = (ScreenTagHook(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # ``oc.env`` lets the ``test`` environment point outputs at a temporary folder.
    "custom_resolvers": {"oc.env": oc.env},
    # an environment (local, test) overrides single nested knobs, not whole sections
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}
