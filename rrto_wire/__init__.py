"""
The wire contract that the robot (``rrto_ros``) and the server (``rrto_server``) share.

Message kinds and headers, tensor frames and their codecs, error codes, the
uploaded program format, operator names and output tree specs.  Both sides
import this package; the robot never imports ``rrto_server``.
"""
