"""rrto_server: record once, replay per request; the GPU side of rrto_ros (never imports rclpy)."""

__version__ = '0.1.0'
