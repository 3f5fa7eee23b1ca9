"""Forward the core's Python logging (rrto_ros.*, rrto_server.*) to ROS 2 loggers."""

from __future__ import annotations

import logging

import rclpy.logging

_CORE_LOGGERS = ('rrto_ros', 'rrto_server')


class RosLogHandler(logging.Handler):
    """Emit each record through the rclpy logger of the same name, at the same severity."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = rclpy.logging.get_logger(record.name)
            text = self.format(record)
            if record.levelno >= logging.CRITICAL:
                logger.fatal(text)
            elif record.levelno >= logging.ERROR:
                logger.error(text)
            elif record.levelno >= logging.WARNING:
                logger.warning(text)
            elif record.levelno >= logging.INFO:
                logger.info(text)
            else:
                logger.debug(text)
        except Exception:  # noqa: B902 - logging must never raise into the caller
            self.handleError(record)


def install(level: int = logging.INFO) -> None:
    """Route the core's loggers to ROS (once per process; later calls do nothing)."""
    for name in _CORE_LOGGERS:
        py_logger = logging.getLogger(name)
        if not any(isinstance(h, RosLogHandler) for h in py_logger.handlers):
            py_logger.addHandler(RosLogHandler())
            py_logger.setLevel(level)
            py_logger.propagate = False
