from glob import glob

from setuptools import find_packages, setup

package_name = 'rrto_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=['rrto_ros', 'rrto_ros.*', 'rrto_server', 'rrto_server.*',
                                    'rrto_wire', 'rrto_wire.*', 'rrto_fleet', 'rrto_fleet.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml')),
        ('share/' + package_name + '/config/plans', glob('config/plans/*.json')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='rrto_ros maintainers',
    maintainer_email='rrto@example.com',
    description='Record/replay offloading of robot DNN inference to a GPU server.',
    license='Apache-2.0',
    tests_require=['pytest'],
    extras_require={'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'rrto_server = rrto_server.__main__:main',
            'rrto-plan = rrto_ros.plan_cli:main',
            'rrto-plan-tasks = rrto_server.rtsearch:main',
            'rrto-keys = rrto_server.keys:main',
            'offload_node = rrto_ros.nodes.entry:offload_node',
            'bandwidth_monitor = rrto_ros.nodes.entry:bandwidth_monitor',
            'server_node = rrto_ros.nodes.entry:server_node',
            'camera_sim = rrto_ros.nodes.entry:camera_sim',
        ],
    },
)
