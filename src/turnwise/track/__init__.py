"""Logging behind one interface: console, JSONL and MLflow backends."""

from turnwise.track.logger import JsonlLogger, Logger, MlflowLogger, MultiLogger, default_tracking_uri

__all__ = ["JsonlLogger", "Logger", "MlflowLogger", "MultiLogger", "default_tracking_uri"]
