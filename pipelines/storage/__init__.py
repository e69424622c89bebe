"""Storage shared by every manager and worker: checksums, safe paths, and one ``Storage`` per
location (``storage_for(location)``; the backends are in ``posix`` and ``s3``, registered in
``base.STORAGES``).

Nothing is imported here on purpose: ``pipelines.storage.checksums`` must stay importable
without boto3, and the backends are loaded lazily by ``base.storage_class``.
"""
