"""The gateway's one error hierarchy; library exceptions are translated at each boundary."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration (YAML or a model manifest) is invalid; the message is meant for a person."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SourceError(GatewayError):
    """A PLC source failed (connect, read, decode)."""


class NotConnected(SourceError):
    """An operation needed a live session and there was none."""


class ModelError(GatewayError):
    """A model file or manifest cannot be loaded or does not fit its assets."""


class StoreError(GatewayError):
    """SQLite refused a write (disk full, locked, corrupt)."""


class PublishError(GatewayError):
    """The MQTT broker refused or did not acknowledge in time."""


# Process exit codes, documented in the README.
EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3
