"""ROS 2 nodes: the only modules of rrto_ros (with rrto_ros.bringup) that import rclpy."""
