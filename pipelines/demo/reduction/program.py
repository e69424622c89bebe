"""Command line, manifest and products of the demo reduction (see the package docstring)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.demo.reduction import VERSION
from pipelines.demo.reduction.spectra import (
    DataError,
    Parameters,
    Spectrum,
    calibrate,
    combine,
    statistics,
)

EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_DATA = 4
OUTPUT_SUBDIRS = ("science", "qa", "plots", "statistics", "logs")
CHUNK = 4 * 1024 * 1024

log = logging.getLogger("demo_reduction")


class Failure(Exception):
    """Ends the program with ``exit_code`` and the message on stderr and in the log."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Entry:
    """One file the manifest lists: where it is, what it must hash to, what it is."""

    path: Path
    relative: str
    checksum: str
    algorithm: str
    instrument: str
    module: str
    product_type: str


def _hasher(algorithm: str) -> Callable[[], Any]:
    if algorithm == "sha256":
        return hashlib.sha256
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            raise Failure(
                EXIT_USAGE, "checksum algorithm xxh3_128 needs the xxhash package"
            ) from None
        return xxhash.xxh3_128
    raise Failure(EXIT_USAGE, f"unknown checksum algorithm {algorithm!r} (known: sha256, xxh3_128)")


def file_checksum(path: Path, algorithm: str) -> str:
    hasher = _hasher(algorithm)()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return str(hasher.hexdigest())


def load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Failure(EXIT_USAGE, f"manifest {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise Failure(EXIT_USAGE, f"manifest {path} cannot be read: {error}") from None
    if not isinstance(manifest, dict):
        raise Failure(EXIT_USAGE, f"manifest {path} is not a JSON object")
    schema = manifest.get("schema", 1)
    if schema != 1:
        raise Failure(EXIT_USAGE, f"manifest {path}: schema {schema!r} is not supported (1 is)")
    return manifest


def manifest_entries(manifest: dict[str, Any], key: str, input_dir: Path) -> list[Entry]:
    """The manifest's ``inputs`` or ``upstream_products`` as entries with host paths. Raises
    Failure naming the entry when one lacks a field or points outside the input directory."""
    raw = manifest.get(key, [])
    if not isinstance(raw, list):
        raise Failure(EXIT_USAGE, f"manifest {key!r} must be a list")
    entries = []
    root = input_dir.resolve()
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise Failure(EXIT_USAGE, f"manifest {key}[{index}] is not an object")
        missing = [k for k in ("path", "checksum", "checksum_algorithm") if not item.get(k)]
        if missing:
            raise Failure(EXIT_USAGE, f"manifest {key}[{index}] lacks {', '.join(missing)}")
        relative = str(item["path"])
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise Failure(EXIT_USAGE, f"manifest {key}[{index}] path {relative!r} leaves {root}")
        name = Path(relative).name
        module = str(item.get("module") or name.rsplit("_", 1)[0] or "data")
        entries.append(
            Entry(
                path=path,
                relative=relative,
                checksum=str(item["checksum"]).lower(),
                algorithm=str(item["checksum_algorithm"]),
                instrument=str(item.get("instrument") or ""),
                module=module,
                product_type=str(item.get("product_type") or ""),
            )
        )
    return entries


def verify(entries: list[Entry]) -> int:
    """Hash every entry before any is used; raise Failure (exit 3) naming each missing or
    corrupted one. Returns the number of bytes hashed."""
    problems = []
    total = 0
    for entry in entries:
        try:
            found = file_checksum(entry.path, entry.algorithm)
            total += entry.path.stat().st_size
        except FileNotFoundError:
            problems.append(f"missing input {entry.relative} (expected at {entry.path})")
            continue
        except OSError as error:
            problems.append(f"unreadable input {entry.relative}: {error}")
            continue
        if found != entry.checksum:
            problems.append(
                f"corrupted input {entry.relative}: {entry.algorithm} expected "
                f"{entry.checksum}, found {found}"
            )
    if problems:
        raise Failure(
            EXIT_BAD_INPUT,
            "refusing to reduce: " + "; ".join(problems),
        )
    log.info(
        "verified %d input(s), %d bytes, against the manifest's checksums", len(entries), total
    )
    return total


# --- products ---------------------------------------------------------------------------------


def write_spectrum(path: Path, spectrum: Spectrum, header: dict[str, Any]) -> None:
    lines = [f"# {key}: {value}" for key, value in header.items()]
    lines.append("channel,intensity_k,noise_k,flagged")
    for channel in range(spectrum.channels):
        lines.append(
            f"{channel},{spectrum.intensity[channel]:.6f},{spectrum.noise[channel]:.6f},"
            f"{int(spectrum.flagged[channel])}"
        )
    _write_text(path, "\n".join(lines) + "\n")


def read_spectrum(path: Path) -> Spectrum:
    """A spectrum this program wrote (``write_spectrum``). Raises DataError when it is not one."""
    header: dict[str, str] = {}
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                key, sep, value = line[1:].partition(":")
                if sep:
                    header[key.strip()] = value.strip()
            elif line.strip() and not line.startswith("channel,"):
                rows.append(line.split(","))
    if not rows or "module" not in header:
        raise DataError(f"{path.name} is not a calibrated spectrum of the demo reduction")
    try:
        values = np.array([[float(v) for v in row[1:4]] for row in rows])
    except (ValueError, IndexError):
        raise DataError(f"{path.name}: malformed spectrum rows") from None
    return Spectrum(
        module=header["module"],
        instrument=header.get("instrument", ""),
        intensity=values[:, 0],
        noise=values[:, 1],
        flagged=values[:, 2] != 0,
        n_dumps=int(header.get("dumps", "0") or 0),
        sources=[str(path)],
    )


def plot(path: Path, title: str, layers: dict[str, list[tuple[str, Spectrum, bool]]]) -> None:
    """One panel per module; each layer (label, spectrum, highlight) drawn as a line, the
    highlighted one with its noise band and flagged channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = sorted(layers)
    figure, axes = plt.subplots(
        len(modules), 1, figsize=(8, 2.8 * len(modules)), squeeze=False, constrained_layout=True
    )
    for axis, module in zip(axes[:, 0], modules, strict=True):
        for label, spectrum, highlight in layers[module]:
            x = np.arange(spectrum.channels)
            if highlight:
                axis.fill_between(
                    x,
                    spectrum.intensity - spectrum.noise,
                    spectrum.intensity + spectrum.noise,
                    color="tab:blue",
                    alpha=0.25,
                    linewidth=0,
                    label="noise (1 sigma)",
                )
                axis.plot(x, spectrum.intensity, color="tab:blue", linewidth=1.0, label=label)
                bad = np.flatnonzero(spectrum.flagged)
                if bad.size:
                    axis.plot(bad, spectrum.intensity[bad], "x", color="tab:red", label="flagged")
            else:
                axis.plot(x, spectrum.intensity, color="0.6", linewidth=0.5, alpha=0.7)
        axis.set_title(f"{module}: rms {layers[module][-1][1].rms():.3g} K")
        axis.set_xlabel("channel")
        axis.set_ylabel("T (K)")
        axis.legend(loc="upper right", fontsize="small")
    figure.suptitle(title)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png", dpi=90)
    plt.close(figure)
    os.replace(partial, path)


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _write_json(path: Path, value: object) -> None:
    _write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def _slug(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._")
    return cleaned or "module"


def _metrics(spectrum: Spectrum) -> dict[str, Any]:
    rms, noise = spectrum.rms(), spectrum.median_noise()
    ratio = rms / noise if noise > 0 else float("nan")
    return {
        "instrument": spectrum.instrument,
        "rms_k": rms,
        "median_noise_k": noise,
        # Close to 1 when the scatter of the spectrum is the radiometer noise and nothing else.
        "rms_over_noise": ratio,
        "noise_consistent": bool(0.5 <= ratio <= 2.0),
        "dumps": spectrum.n_dumps,
        "channels": spectrum.channels,
        "flagged_channels": [int(c) for c in np.flatnonzero(spectrum.flagged)],
    }


# --- the two modes -----------------------------------------------------------------------------


def run_calibrate(manifest: dict[str, Any], input_dir: Path, output: Path) -> dict[str, Any]:
    parameters, ignored = Parameters.from_manifest(manifest.get("parameters") or {})
    if ignored:
        log.info("parameters not used by this program: %s", ", ".join(ignored))
    entries = manifest_entries(manifest, "inputs", input_dir)
    if not entries:
        raise Failure(EXIT_USAGE, "calibrate: the manifest lists no inputs")
    bytes_read = verify(entries)
    by_module: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_module[entry.module].append(entry)
    key = str(manifest.get("sub_group_key", ""))
    spectra = {}
    for module, module_entries in sorted(by_module.items()):
        spectrum = calibrate(
            module,
            module_entries[0].instrument,
            [e.path for e in module_entries],
            parameters,
        )
        spectra[module] = spectrum
        write_spectrum(
            output / "science" / f"calibrated_{_slug(module)}.csv",
            spectrum,
            {
                "product": "demo-reduction calibrated spectrum",
                "module": module,
                "instrument": spectrum.instrument,
                "sub_group_key": key,
                "run_id": manifest.get("run_id", ""),
                "dumps": spectrum.n_dumps,
                "files": len(module_entries),
                "rms_k": f"{spectrum.rms():.6f}",
            },
        )
        log.info(
            "%s: %d files, %d dumps x %d channels, rms %.4g K, %d flagged",
            module,
            len(module_entries),
            spectrum.n_dumps,
            spectrum.channels,
            spectrum.rms(),
            int(spectrum.flagged.sum()),
        )
    plot(
        output / "plots" / "calibrated_spectra.png",
        f"calibrated spectra ({key or 'all'})",
        {m: [("calibrated", s, True)] for m, s in spectra.items()},
    )
    return {
        "mode": "calibrate",
        "inputs": len(entries),
        "bytes_read": bytes_read,
        "parameters": parameters.__dict__,
        "modules": {m: _metrics(s) for m, s in spectra.items()},
        "statistics": {m: statistics(s) for m, s in spectra.items()},
    }


def run_combine(manifest: dict[str, Any], input_dir: Path, output: Path) -> dict[str, Any]:
    parameters, ignored = Parameters.from_manifest(manifest.get("parameters") or {})
    if ignored:
        log.info("parameters not used by this program: %s", ", ".join(ignored))
    products = manifest_entries(manifest, "upstream_products", input_dir)
    # Calibrated spectra: SCIENCE products of a final upstream step, or the science/ files of
    # a non-final one (registered as intermediates from its workspace).
    science = [
        p
        for p in products
        if p.path.suffix == ".csv"
        and (p.product_type.upper() == "SCIENCE" or "science" in Path(p.relative).parts[:-1])
    ]
    if not science:
        raise Failure(
            EXIT_USAGE, "combine: the manifest lists no upstream science products (*.csv)"
        )
    bytes_read = verify(science)
    by_module: dict[str, list[Spectrum]] = defaultdict(list)
    for entry in science:
        spectrum = read_spectrum(entry.path)
        by_module[spectrum.module].append(spectrum)
    key = str(manifest.get("sub_group_key", ""))
    combined = {}
    for module, spectra in sorted(by_module.items()):
        result = combine(module, spectra, parameters)
        combined[module] = result
        write_spectrum(
            output / "science" / f"combined_{_slug(module)}.csv",
            result,
            {
                "product": "demo-reduction combined spectrum",
                "module": module,
                "instrument": result.instrument,
                "sub_group_key": key,
                "run_id": manifest.get("run_id", ""),
                "dumps": result.n_dumps,
                "inputs": len(spectra),
                "rms_k": f"{result.rms():.6f}",
            },
        )
        log.info(
            "%s: combined %d spectra, rms %.4g K (inputs %.4g K median)",
            module,
            len(spectra),
            result.rms(),
            float(np.median([s.rms() for s in spectra])),
        )
    plot(
        output / "plots" / "combined_spectra.png",
        f"combined spectra ({key or 'all'})",
        {
            m: [
                *[(f"input {i}", s, False) for i, s in enumerate(by_module[m])],
                ("combined", c, True),
            ]
            for m, c in combined.items()
        },
    )
    modules = {}
    for module, result in combined.items():
        metrics = _metrics(result)
        inputs_rms = [s.rms() for s in by_module[module]]
        # Independent noise averages down as 1/sqrt(N): the ratio says whether it did.
        expected = float(np.median(inputs_rms)) / np.sqrt(len(inputs_rms))
        metrics.update(
            inputs=len(inputs_rms),
            inputs_rms_k=inputs_rms,
            expected_rms_k=expected,
            rms_over_expected=result.rms() / expected if expected > 0 else float("nan"),
        )
        modules[module] = metrics
    return {
        "mode": "combine",
        "inputs": len(science),
        "bytes_read": bytes_read,
        "parameters": parameters.__dict__,
        "modules": modules,
        "statistics": {m: statistics(s) for m, s in combined.items()},
    }


MODES = {"calibrate": run_calibrate, "combine": run_combine}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo.reduction",
        description="Demo reduction: calibrate raw counts per scan, or combine calibrated "
        "spectra. Paths default to the /workflow contract's environment variables.",
    )
    parser.add_argument(
        "mode",
        choices=sorted(MODES),
        help="calibrate: the manifest's raw inputs -> one calibrated spectrum per module; "
        "combine: the upstream calibrated spectra -> one combined spectrum per module",
    )
    parser.add_argument("--manifest", help="manifest.json (default: $WORKFLOW_MANIFEST)")
    parser.add_argument("--input-dir", help="base of the manifest's paths ($WORKFLOW_INPUT_DIR)")
    parser.add_argument("--output-dir", help="where products go ($WORKFLOW_OUTPUT_DIR)")
    return parser


def _required(value: str | None, variable: str, option: str) -> Path:
    chosen = value or os.environ.get(variable)
    if not chosen:
        raise Failure(EXIT_USAGE, f"no {option} given and ${variable} is not set")
    return Path(chosen)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.handlers[:] = [stderr]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        manifest_path = _required(args.manifest, "WORKFLOW_MANIFEST", "--manifest")
        input_dir = _required(args.input_dir, "WORKFLOW_INPUT_DIR", "--input-dir")
        output = _required(args.output_dir, "WORKFLOW_OUTPUT_DIR", "--output-dir")
        for sub in OUTPUT_SUBDIRS:
            (output / sub).mkdir(parents=True, exist_ok=True)
        file_log = logging.FileHandler(output / "logs" / "reduction.log", encoding="utf-8")
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_log)
        log.info("demo reduction %s %s, manifest %s", VERSION, args.mode, manifest_path)
        manifest = load_manifest(manifest_path)
        try:
            summary = MODES[args.mode](manifest, input_dir, output)
        except ValueError as error:  # Parameters and DataError
            code = EXIT_DATA if isinstance(error, DataError) else EXIT_USAGE
            raise Failure(code, str(error)) from None
        summary.update(
            version=VERSION,
            run_id=manifest.get("run_id"),
            step=manifest.get("step"),
            sub_group_key=manifest.get("sub_group_key"),
            elapsed_seconds=round(time.monotonic() - started, 3),
        )
        statistics_part = summary.pop("statistics")
        _write_json(output / "qa" / "metrics.json", summary)
        _write_json(
            output / "statistics" / "summary.json",
            {"mode": args.mode, "run_id": summary["run_id"], "modules": statistics_part},
        )
        log.info("done in %.2f s", time.monotonic() - started)
        return 0
    except Failure as failure:
        log.error("%s", failure)
        return failure.exit_code
    finally:
        for handler in log.handlers:
            handler.close()
        log.handlers[:] = []
