"""fastdit's benchmark scripts (run them as `python benchmarks/<name>.py`); `benchmarks.common` holds
the helpers they share."""
