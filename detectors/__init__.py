"""lossguard's detection core: event and alert contracts, metric aliases, detectors, config.

Pure Python + numpy: no Kafka, no Faust; the only I/O is the in-process API's alert files. The same detectors run inside the Faust worker and
in-process.
"""

from . import batch, gradient, loss, lr, nonfinite, resources, rlhf, validation  # noqa: F401  (register them)
from .alerts import SEVERITIES, Alert, decode_alert, severity_rank
from .aliases import canonical_metrics, canonical_name
from .base import DETECTORS, Detector, register_detector
from .config import ConfigError, build_config, default_config
from .driver import RunDriver, load_detectors
from .events import (
    ControlEvent,
    MetricEvent,
    SchemaError,
    decode_control_event,
    decode_metric_event,
    decode_metric_record,
    encode_metric_batch,
)
from .inprocess import (
    AdvancedAnomalyDetector,
    AnomalyDetectionHook,
    ProfilerRegistry,
    profiler_registry,
    register_hook,
    unregister_hook,
)
from .suite import DetectorSuite

__all__ = [
    "Alert", "SEVERITIES", "severity_rank", "decode_alert",
    "canonical_name", "canonical_metrics",
    "Detector", "DETECTORS", "register_detector",
    "ConfigError", "build_config", "default_config",
    "MetricEvent", "ControlEvent", "SchemaError", "decode_metric_event", "decode_metric_record",
    "encode_metric_batch", "decode_control_event",
    "DetectorSuite", "RunDriver", "load_detectors",
    "AdvancedAnomalyDetector", "AnomalyDetectionHook", "ProfilerRegistry", "profiler_registry",
    "register_hook", "unregister_hook",
]
