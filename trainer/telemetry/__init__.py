"""Telemetry: metrics.jsonl and W&B, per-layer statistics, throughput figures, anomaly detection."""
