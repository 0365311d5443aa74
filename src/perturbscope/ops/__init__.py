"""Operations around the pipelines: the screens registry, retraining on a schedule, the MLflow
model registry. Nothing here is a Kedro node; the retrain CLI drives Kedro sessions.

* :mod:`perturbscope.ops.screens` -- ``conf/<env>/screens.yml``: which screens exist, their
  files and fingerprints, and a cheap check of a file before a session starts;
* :mod:`perturbscope.ops.retrain` -- ``python -m perturbscope.ops.retrain`` (also
  ``python -m perturbscope.ops.retrain``): retrain every screen whose file is new or changed;
* :mod:`perturbscope.ops.registry` -- register, compare and promote models in MLflow;
  :func:`~perturbscope.ops.registry.load_registered_model`.
"""
