"""Storage helpers shared by every manager and worker: checksums and safe paths.

Per-storage-type backends (posix, s3) live next to these modules.
"""
