"""perturbscope: analysis of CRISPR Perturb-seq screens.

Kedro pipelines (``perturbscope.pipelines``) over plain-PyTorch models
(``perturbscope.models``, usable without Kedro) and scanpy.
"""

__version__ = "0.1.0"
