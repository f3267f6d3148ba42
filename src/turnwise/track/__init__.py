"""Logging behind one interface: console, JSONL and MLflow backends; the metric name table."""

from turnwise.track.logger import (
    ConsoleLogger,
    JsonlLogger,
    Logger,
    MlflowLogger,
    MultiLogger,
    default_tracking_uri,
    flatten_params,
)

__all__ = ["ConsoleLogger", "JsonlLogger", "Logger", "MlflowLogger", "MultiLogger", "default_tracking_uri",
           "flatten_params"]
