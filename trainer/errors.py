"""The one exception type for bad input, reported as a single line before training starts."""

import os


class ConfigError(Exception):
    """Bad input: the message says what is wrong and how to fix it, in one line."""


def hub_unreachable() -> str:
    """Why the Hugging Face hub gave nothing, for an error line: offline by setting, or not reachable."""
    offline = any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return "the hub is offline (HF_HUB_OFFLINE is set)" if offline else "the hub could not be reached"
