"""
``camera_sim``: synthetic ``sensor_msgs/Image`` frames at a fixed rate and size.

Publishes a cycle of ``frames`` pre-generated random images (seeded, so runs
are repeatable) with sensor-data QoS, stamped with the node's clock, in any
encoding the offload node accepts.  For the demo, the launch file and tests.
"""

from __future__ import annotations

import array
import sys

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import Image

from rrto_ros.image import ENCODINGS, array_to_image
from rrto_ros.nodes import log_bridge, spin
from rrto_ros.nodes import messages as m
from rrto_ros.nodes.params import Param, declare

PARAMS = [
    Param('topic', '/camera/image_raw', 'topic to publish on'),
    Param('frame_id', 'camera', 'header.frame_id of every frame'),
    Param('rate_hz', 15.0, 'frames per second', range=(0.01, 1000.0)),
    Param('width', 640, 'image width, pixels', range=(1, 8192)),
    Param('height', 480, 'image height, pixels', range=(1, 8192)),
    Param('encoding', 'rgb8', 'sensor_msgs/Image encoding', choices=tuple(ENCODINGS)),
    Param('frames', 8, 'distinct frames, published in a cycle', range=(1, 1000)),
    Param('seed', 0, 'random seed of the frames', range=(0, 2**31 - 1)),
]


class CameraSim(Node):
    """Publish synthetic camera frames."""

    NODE_NAME = 'camera_sim'

    def __init__(self, **kwargs):
        super().__init__('camera_sim', **kwargs)
        log_bridge.install()
        self.params = p = declare(self, PARAMS)
        self._frames = [self._frame(i) for i in range(p['frames'])]
        self.published = 0
        self._pub = self.create_publisher(Image, p['topic'], m.IMAGE_QOS)
        self.create_timer(1.0 / p['rate_hz'], self._tick)
        self.get_logger().info(f'publishing {p["width"]}x{p["height"]} {p["encoding"]} frames '
                               f'at {p["rate_hz"]:g} Hz on {self._pub.topic_name}')

    def _frame(self, index: int) -> dict:
        p = self.params
        enc = ENCODINGS[p['encoding']]
        rng = np.random.default_rng([p['seed'], index])
        shape = (p['height'], p['width'], enc.channels)
        if enc.dtype == np.uint8:
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            pixels = rng.uniform(0.2, 10.0, shape).astype(enc.dtype)   # depth in metres
        fields = array_to_image(pixels, p['encoding'])
        fields['data'] = array.array('B', fields['data'])
        return fields

    def _tick(self) -> None:
        fields = self._frames[self.published % len(self._frames)]
        msg = Image(height=fields['height'], width=fields['width'], encoding=fields['encoding'],
                    is_bigendian=int(fields['is_bigendian']), step=fields['step'],
                    data=fields['data'])
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.params['frame_id']
        self._pub.publish(msg)
        self.published += 1


def main(args=None) -> int:
    """Publish until Ctrl-C or shutdown; exit 2 on invalid parameters."""
    return spin.run(CameraSim, args)


if __name__ == '__main__':
    sys.exit(main())
