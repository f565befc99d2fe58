"""The toolkit's exceptions.

Every error says what is wrong and what to do about it. Each class has a page section in
``docs/errors.md`` under its own name, so a user can search the docs for the class name.
All of them derive from :class:`EMInterpError`, so ``except EMInterpError`` catches any of them.
"""

from __future__ import annotations


class EMInterpError(Exception):
    """Base class of every error raised on purpose by em-interp."""


class UnknownCardError(EMInterpError, KeyError):
    """A card name that is not shipped and is not a card file or HF folder."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class CardError(EMInterpError, ValueError):
    """A card file with a missing, unknown or mistyped field."""


class WeightsUnavailableError(EMInterpError, FileNotFoundError):
    """Weights that cannot be had from here: not cached, and the hub or registry is out of reach."""


class ChecksumError(EMInterpError, ValueError):
    """A downloaded file whose sha256 differs from the one recorded in the card."""


class AdapterMismatchError(EMInterpError, ValueError):
    """A PEFT adapter trained on a different base model than the one it is applied to."""


class HookNameError(EMInterpError, KeyError):
    """A layer index or hook name that the loaded model does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DeviceError(EMInterpError, RuntimeError):
    """A device request the machine cannot satisfy (e.g. n_devices > visible CUDA devices)."""


class VariantError(EMInterpError, ValueError):
    """A variant ("base" / "organism") the card does not define."""


class DataError(EMInterpError, ValueError):
    """A prompt or data file that is empty, malformed, or lacks a needed field (names file and line)."""


class StoreMismatchError(EMInterpError, ValueError):
    """An activation store (or other resumable output folder) written with different settings."""


class TokenizationError(EMInterpError, ValueError):
    """A word that should be one token but is not, or a position a prompt does not have."""


class ConfigError(EMInterpError, ValueError):
    """A config (TOML file or dataclass) with an unknown, missing or out-of-range field."""


class JudgeError(EMInterpError, RuntimeError):
    """A judge that could not score an item (endpoint down, malformed reply): never a score."""


class ServerError(EMInterpError, RuntimeError):
    """An OpenAI-compatible generation server that failed, or answered something malformed: the
    sample is not cached and not counted."""


class SAEMismatchError(EMInterpError, ValueError):
    """An SAE or latent set used with a model or hook it was not made for (``d_in``, hook name)."""


class MetricError(EMInterpError, TypeError):
    """Something that is not a metric was passed where a metric is needed."""
