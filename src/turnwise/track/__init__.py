"""Logging behind one interface: JSONL and MLflow backends; the metric name table; MLflow traces."""

from turnwise.track.logger import (
    JsonlLogger,
    Logger,
    MlflowLogger,
    MultiLogger,
    default_artifact_location,
    default_tracking_uri,
    flatten_params,
    load_registered_model,
    silence_third_party_bars,
)
from turnwise.track.traces import TraceOptions

__all__ = ["JsonlLogger", "Logger", "MlflowLogger", "MultiLogger", "TraceOptions", "default_artifact_location",
           "default_tracking_uri", "flatten_params", "load_registered_model",
           "silence_third_party_bars"]
