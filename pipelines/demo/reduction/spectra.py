"""The numerics of the demo reduction: raw counts -> calibrated spectrum -> combined spectrum.

The demo instruments (``pipelines/demo/simulate.py``) write files of pseudo-random bytes. This
program reads them as a detector would be read: little-endian unsigned 16-bit counts, in dumps
of ``channels`` channels (a spectrometer's channels for CHAI, detectors for Prime-Cam), a
trailing partial dump ignored. Calibration is a linear counts -> kelvin scale around the ADC's
zero level, then a polynomial baseline; noise is measured per channel from the scatter between
dumps (the noise of the mean), and channels whose scatter is an outlier are flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


class DataError(ValueError):
    """Data that cannot be reduced (a file shorter than one dump, channel counts that differ)."""


WEIGHTINGS = ("inverse_variance", "uniform")


@dataclass(frozen=True)
class Parameters:
    """Step parameters the program understands (the manifest's ``parameters``).

    ``flag_sigma``: a channel whose scatter between dumps lies this many robust deviations from
    the median scatter is flagged (a dead or unstable channel). ``despike_sigma`` (off unless
    given): after the baseline, a channel further than this many times its noise from zero is
    flagged as a spike. ``weighting`` (combine): ``inverse_variance`` or ``uniform``.
    """

    channels: int = 256
    counts_offset: float = 32768.0
    kelvin_per_count: float = 0.01
    baseline_order: int = 1
    flag_sigma: float = 5.0
    despike_sigma: float | None = None
    weighting: str = "inverse_variance"

    @classmethod
    def from_manifest(cls, values: dict[str, object]) -> tuple[Parameters, list[str]]:
        """Parameters from the manifest, and the names it holds that this program ignores.
        Raises ValueError naming a parameter of the wrong type, out of range or not one of
        its choices."""
        numbers = {
            "channels": (int, 8, 65536),
            "counts_offset": (float, 0.0, 65535.0),
            "kelvin_per_count": (float, 1e-9, 1e6),
            "baseline_order": (int, 0, 8),
            "flag_sigma": (float, 1.0, 1000.0),
            "despike_sigma": (float, 1.0, 1000.0),
        }
        chosen: dict[str, object] = {}
        for name, (kind, low, high) in numbers.items():
            if name not in values:
                continue
            value = values[name]
            allowed: tuple[type, ...] = (int,) if kind is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise ValueError(f"parameter {name!r} must be {kind.__name__}, got {value!r}")
            assert isinstance(value, int | float)
            if not low <= value <= high:
                raise ValueError(f"parameter {name!r} = {value!r} is outside {low:g} .. {high:g}")
            chosen[name] = kind(value)
        if "weighting" in values:
            if values["weighting"] not in WEIGHTINGS:
                raise ValueError(
                    f"parameter 'weighting' = {values['weighting']!r} is not one of "
                    f"{', '.join(WEIGHTINGS)}"
                )
            chosen["weighting"] = values["weighting"]
        ignored = sorted(set(values) - set(numbers) - {"weighting"})
        return cls(**chosen), ignored  # type: ignore[arg-type]


@dataclass
class Spectrum:
    """A calibrated spectrum of one instrument module: one value per channel, in kelvin."""

    module: str
    instrument: str
    intensity: FloatArray
    noise: FloatArray
    flagged: NDArray[np.bool_]
    n_dumps: int
    sources: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.intensity.size)

    @property
    def good(self) -> NDArray[np.bool_]:
        return ~self.flagged

    def rms(self) -> float:
        """Scatter of the unflagged channels about zero (the baseline is already removed)."""
        values = self.intensity[self.good]
        return float(np.sqrt(np.mean(values**2))) if values.size else float("nan")

    def median_noise(self) -> float:
        values = self.noise[self.good]
        return float(np.median(values)) if values.size else float("nan")


def read_dumps(path: Path, channels: int) -> NDArray[np.uint16]:
    """The file's counts as an array of shape (dumps, channels). Raises DataError when the file
    holds less than one dump."""
    raw = np.fromfile(path, dtype="<u2")
    dumps = raw.size // channels
    if dumps < 1:
        raise DataError(
            f"{path.name}: {raw.size * 2} bytes hold no complete dump of {channels} channels"
        )
    return raw[: dumps * channels].reshape(dumps, channels)


def calibrate(module: str, instrument: str, paths: list[Path], parameters: Parameters) -> Spectrum:
    """One module's files (all dumps of all files together) -> its calibrated spectrum.

    Mean counts per channel minus ``counts_offset``, times ``kelvin_per_count``; noise per
    channel is the standard error of that mean; channels whose scatter lies more than
    ``flag_sigma`` robust deviations from the median scatter are flagged; a polynomial baseline
    of ``baseline_order`` is fitted to the unflagged channels and subtracted.
    """
    dumps = np.concatenate([read_dumps(path, parameters.channels) for path in paths])
    kelvin = (dumps.astype(np.float64) - parameters.counts_offset) * parameters.kelvin_per_count
    mean = kelvin.mean(axis=0)
    n_dumps = int(dumps.shape[0])
    scatter = kelvin.std(axis=0, ddof=1) if n_dumps > 1 else np.zeros_like(mean)
    noise = scatter / np.sqrt(n_dumps)
    flagged = _outliers(scatter, parameters.flag_sigma)
    intensity = mean - _baseline(mean, flagged, parameters.baseline_order)
    if parameters.despike_sigma is not None:
        spikes = np.abs(intensity) > parameters.despike_sigma * np.where(noise > 0, noise, np.inf)
        if spikes.any():
            # Refit without the spikes, so one bright channel does not tilt the baseline.
            flagged = flagged | spikes
            intensity = mean - _baseline(mean, flagged, parameters.baseline_order)
    return Spectrum(
        module=module,
        instrument=instrument,
        intensity=intensity,
        noise=noise,
        flagged=flagged,
        n_dumps=n_dumps,
        sources=[str(path) for path in paths],
    )


def combine(module: str, spectra: list[Spectrum], parameters: Parameters) -> Spectrum:
    """Weighted mean of one module's spectra, channel by channel (``parameters.weighting``:
    inverse variance, or uniform), with the noise propagated. A channel flagged in one input
    gets no weight from it; flagged in all, it stays flagged. Raises DataError when the inputs
    have different numbers of channels."""
    sizes = {s.channels for s in spectra}
    if len(sizes) != 1:
        listed = ", ".join(f"{s.sources[0] if s.sources else '?'}: {s.channels}" for s in spectra)
        raise DataError(f"module {module}: spectra with different channel counts ({listed})")
    intensity = np.stack([s.intensity for s in spectra])
    noise = np.stack([s.noise for s in spectra])
    usable = ~np.stack([s.flagged for s in spectra]) & (noise > 0) & np.isfinite(noise)
    variance = np.where(usable, noise, 1.0) ** 2
    if parameters.weighting == "uniform":
        weights = usable.astype(np.float64)
    else:
        weights = np.where(usable, 1.0 / variance, 0.0)
    total = weights.sum(axis=0)
    flagged = total == 0
    safe_total = np.where(flagged, 1.0, total)
    combined = (weights * intensity).sum(axis=0) / safe_total
    # Noise of a weighted mean of independent inputs: sqrt(sum(w^2 sigma^2)) / sum(w).
    propagated = np.sqrt((weights**2 * np.where(usable, variance, 0.0)).sum(axis=0))
    combined_noise = np.where(flagged, 0.0, propagated / safe_total)
    combined = combined - _baseline(combined, flagged, parameters.baseline_order)
    return Spectrum(
        module=module,
        instrument=spectra[0].instrument,
        intensity=combined,
        noise=combined_noise,
        flagged=flagged,
        n_dumps=sum(s.n_dumps for s in spectra),
        sources=[src for s in spectra for src in s.sources],
    )


def statistics(spectrum: Spectrum) -> dict[str, float | int]:
    """Summary numbers of the unflagged channels."""
    values = spectrum.intensity[spectrum.good]
    if not values.size:
        return {"channels": spectrum.channels, "good_channels": 0}
    percentiles = np.percentile(values, [5, 25, 50, 75, 95])
    return {
        "channels": spectrum.channels,
        "good_channels": int(values.size),
        "dumps": spectrum.n_dumps,
        "mean_k": float(values.mean()),
        "std_k": float(values.std()),
        "min_k": float(values.min()),
        "max_k": float(values.max()),
        "p05_k": float(percentiles[0]),
        "p25_k": float(percentiles[1]),
        "median_k": float(percentiles[2]),
        "p75_k": float(percentiles[3]),
        "p95_k": float(percentiles[4]),
    }


def _outliers(scatter: FloatArray, sigma: float) -> NDArray[np.bool_]:
    centre = np.median(scatter)
    spread = 1.4826 * np.median(np.abs(scatter - centre))
    if spread == 0:
        return np.zeros(scatter.shape, dtype=bool)
    return np.asarray(np.abs(scatter - centre) > sigma * spread)


def _baseline(values: FloatArray, flagged: NDArray[np.bool_], order: int) -> FloatArray:
    x = np.arange(values.size, dtype=np.float64)
    good = ~flagged
    if good.sum() <= order:
        return np.zeros_like(values)
    coefficients = np.polynomial.polynomial.polyfit(x[good], values[good], order)
    return np.asarray(np.polynomial.polynomial.polyval(x, coefficients))
