"""edged: edge tracking daemon (capture -> detect -> re-ID -> DeepSORT -> MQTT events)."""

__version__ = "0.1.0"
