"""The avatar mesh: shared code (wire format, presets, media, telemetry) and the `avatar` CLI."""
