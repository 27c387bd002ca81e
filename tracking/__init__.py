"""The MLflow side of the project, shared by `pipelines/`, `tune/` and `serve/`.

`dfnet/` imports neither Ray nor MLflow; everything that talks to an MLflow tracking server or
model registry lives here (see :mod:`tracking.registry`).
"""
