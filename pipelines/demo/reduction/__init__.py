"""The demo reduction program: what the demo pipelines run, following the /workflow contract.

    python -m pipelines.demo.reduction calibrate   # per scan: raw counts -> calibrated spectra
    python -m pipelines.demo.reduction combine     # per source: calibrated spectra -> one

Standalone on purpose (numpy and matplotlib, no Django): it is what an instrument team would
ship in a container. Everything it needs comes from the environment of the contract
(``WORKFLOW_MANIFEST``, ``WORKFLOW_INPUT_DIR``, ``WORKFLOW_OUTPUT_DIR``; see
``pipelines.containers``) or the same options on the command line. It re-verifies every input's
checksum from the manifest before reading any of them, and exits non-zero naming a corrupted or
missing input rather than reduce bad data.

Outputs under ``$WORKFLOW_OUTPUT_DIR``: ``science/*.csv`` (calibrated or combined spectra),
``qa/metrics.json``, ``plots/*.png``, ``statistics/summary.json``, ``logs/reduction.log``.
Exit codes: 0 done, 2 bad usage or manifest, 3 corrupted or missing input, 4 data that cannot
be reduced (too short, channel counts that differ).
"""

VERSION = "1.0.0"
