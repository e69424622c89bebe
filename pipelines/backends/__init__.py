"""HPC backends: where a reduction run's job is executed.

The interface and the registry live in ``pipelines.backends.base`` (``Backend``, ``JobSpec``,
``JobStatus``, ``BACKENDS``, ``get_backend``); one module per backend (``local.py`` today, SLURM
and Kubernetes with the HPC issue). This package's ``__init__`` imports nothing on purpose: the
local backend's job wrapper (``pipelines.backends.local_job``) runs inside this package and must
start without Django.
"""
