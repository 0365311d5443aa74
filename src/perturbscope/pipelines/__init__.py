"""perturbscope pipelines: one sub-package each, discovered by ``find_pipelines``."""
