"""fastdit.training.ds_logging: DeepSpeed's INFO/WARNING chatter hidden by default, back on request."""
import logging
import os

import pytest

from fastdit.training import ds_logging

INFO = b"[2026-11-26 19:03:39,360] [INFO] [launch.py:169:main] dist_world_size=2"
WARN = b"[2026-11-26 19:03:04,668] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU."
ERR = b"[2026-11-26 19:03:04,668] [ERROR] [engine.py:1:x] broken"


def test_level_from_the_environment(monkeypatch):
    monkeypatch.delenv(ds_logging.ENV, raising=False)
    assert ds_logging.deepspeed_log_level() == logging.ERROR
    monkeypatch.setenv(ds_logging.ENV, "INFO")
    assert ds_logging.deepspeed_log_level() == logging.INFO
    monkeypatch.setenv(ds_logging.ENV, "loud")
    with pytest.raises(ValueError, match="FASTDIT_DEEPSPEED_LOG='loud' is not one of debug, info"):
        ds_logging.deepspeed_log_level()


def test_logger_filter_hides_below_the_level(monkeypatch):
    monkeypatch.delenv(ds_logging.ENV, raising=False)
    ds_logging.quiet_deepspeed()
    logger = logging.getLogger("DeepSpeed")
    rec = lambda lvl: logging.LogRecord("DeepSpeed", lvl, __file__, 1, "m", None, None)  # noqa: E731
    assert not logger.filter(rec(logging.WARNING)) and logger.filter(rec(logging.ERROR))
    monkeypatch.setenv(ds_logging.ENV, "info")
    ds_logging.quiet_deepspeed()  # replaces the filter, does not stack a second one
    assert logger.filter(rec(logging.INFO)) and not logger.filter(rec(logging.DEBUG))


def test_filter_stream_drops_deepspeed_lines_and_passes_the_rest_at_once(tmp_path):
    r, w = os.pipe()
    text = b"\n".join([INFO, b"fastdit: custom DiT", WARN, ERR, b"done"]) + b"\n\rtrain: 50%"
    os.write(w, text)
    os.close(w)
    out = tmp_path / "out"
    with open(out, "wb") as f:
        ds_logging.filter_stream(r, f, logging.ERROR)
    assert out.read_bytes() == b"fastdit: custom DiT\n" + ERR + b"\ndone\n\rtrain: 50%"
    r, w = os.pipe()
    os.write(w, text)
    os.close(w)
    with open(out, "wb") as f:
        ds_logging.filter_stream(r, f, logging.INFO)
    assert out.read_bytes() == text
