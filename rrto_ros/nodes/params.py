"""
Declare a node's parameters with descriptors; validate them at start and on change.

Every node lists its parameters as :class:`Param` entries: typed default,
description, inclusive range, allowed choices or a check, and whether it may
change at run time (everything else is ``read_only``).  :class:`Parameters`
registers one set-parameters callback *before* declaring, so the same checks
run on the values given at start (YAML, ``-p``) and on every later
``ros2 param set``; a bad start value raises :class:`ParameterError` naming
the parameter, which ``main()`` turns into a non-zero exit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.exceptions import ParameterException
from rclpy.node import Node
from rclpy.parameter import Parameter

from rrto_wire.curve import ClientKeys


class ParameterError(Exception):
    """A parameter value the node cannot start with; the message names the parameter."""

    logger = ''   # the refusing node's logger name (its real name, after any remapping)


class _Invalid(Exception):
    """Raised by the set-parameters callback while declaring, to keep its reason intact."""


@dataclass(frozen=True)
class Param:
    """One parameter: name, typed default, description and constraints."""

    name: str
    default: Any
    description: str
    runtime: bool = False                        # may change while running (else read_only)
    range: tuple | None = None                   # inclusive (low, high)
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None   # returns why a value is invalid

    def descriptor(self) -> ParameterDescriptor:
        """Return the ParameterDescriptor ``ros2 param describe`` shows."""
        ptype = Parameter.Type.from_parameter_value(self.default)
        desc = ParameterDescriptor(name=self.name, type=ptype.value,
                                   description=self.description, read_only=not self.runtime)
        if self.choices:
            desc.additional_constraints = 'one of: ' + ', '.join(map(str, self.choices))
        if self.range is not None and ptype == Parameter.Type.DOUBLE:
            desc.floating_point_range = [FloatingPointRange(
                from_value=float(self.range[0]), to_value=float(self.range[1]), step=0.0)]
        elif self.range is not None and ptype == Parameter.Type.INTEGER:
            desc.integer_range = [IntegerRange(
                from_value=int(self.range[0]), to_value=int(self.range[1]), step=0)]
        return desc

    def problem(self, value: Any) -> str | None:
        """Return why ``value`` is invalid for this parameter, or None."""
        if self.choices and value not in self.choices:
            return f'{value!r} is not one of {", ".join(map(str, self.choices))}'
        if self.range is not None and isinstance(value, (int, float)) \
                and not self.range[0] <= value <= self.range[1]:
            return f'{value} is outside [{self.range[0]}, {self.range[1]}]'
        return self.check(value) if self.check else None


class Parameters:
    """Declare ``params`` on ``node``; ``values`` holds what the node started with."""

    def __init__(self, node: Node, params: Sequence[Param],
                 on_change: Callable[[str, Any], None] | None = None):
        self._params = {p.name: p for p in params}
        self._on_change = on_change
        self._started = False
        node.add_on_set_parameters_callback(self._on_set)
        for p in params:
            try:
                node.declare_parameter(p.name, p.default, p.descriptor())
            except _Invalid as exc:
                raise ParameterError(str(exc)) from None
            except ParameterException as exc:   # wrong type, out of range (rclpy's own checks)
                text = str(exc).removesuffix(f': {p.name}')
                raise ParameterError(f"parameter '{p.name}': {text}") from None
        self.values = {name: node.get_parameter(name).value for name in self._params}
        self._started = True

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def _on_set(self, parameters: list[Parameter]) -> SetParametersResult:
        for param in parameters:
            spec = self._params.get(param.name)
            if spec is None:
                continue
            reason = spec.problem(param.value)
            if reason is not None:
                message = f"parameter '{param.name}': {reason}"
                if not self._started:
                    raise _Invalid(message)   # declare_parameter would lose the reason
                return SetParametersResult(successful=False, reason=message)
        if self._started:
            for param in parameters:
                if param.name in self._params:
                    try:   # the node may refuse a value only it can check (a plan table's model)
                        if self._on_change is not None:
                            self._on_change(param.name, param.value)
                    except ValueError as exc:
                        return SetParametersResult(successful=False,
                                                   reason=f"parameter '{param.name}': {exc}")
                    self.values[param.name] = param.value
        return SetParametersResult(successful=True)


def declare(node: Node, params: Sequence[Param], **options) -> Parameters:
    """
    Declare ``params`` in a node's constructor; on a bad value destroy the node and raise.

    The node is destroyed as a plain :class:`Node`: its own ``destroy_node`` would
    touch what its constructor never made.
    """
    try:
        return Parameters(node, params, **options)
    except ParameterError as exc:
        exc.logger = node.get_logger().name
        Node.destroy_node(node)
        raise


def fail(name: str, reason: str) -> ParameterError:
    """Return a ParameterError for a value that passed its own checks but cannot be used."""
    return ParameterError(f"parameter '{name}': {reason}")


KEY_PARAMS = [
    Param('server_key', '', "the server's public CURVE .key file ('' = plain TCP; "
          'docs/security.md)'),
    Param('client_key', '', "this robot's CURVE .key_secret file ('' = plain TCP)"),
]


def client_keys(server_key: str, client_key: str) -> ClientKeys | None:
    """
    Return the CURVE keys the ``server_key``/``client_key`` parameters name (None: plain TCP).

    Raises :class:`ParameterError` naming the parameter, never the key, when a
    file is missing or malformed or only one of the two is given.
    """
    if not server_key and not client_key:
        return None
    try:
        return ClientKeys.load(server_key, client_key)
    except ValueError as exc:   # a key file missing, malformed, or only one given
        name = 'server_key' if not server_key or server_key in str(exc) else 'client_key'
        raise fail(name, str(exc)) from None


_ENDPOINT = re.compile(r'^(tcp://(\[[0-9a-fA-F:.]+\]|[^:/\s]+):\d{1,5}|ipc://\S+|inproc://\S+)$')


def check_endpoint(value: str) -> str | None:
    """Return why ``value`` is not a ZeroMQ endpoint (``tcp://host:port``, ``ipc://path``)."""
    if not _ENDPOINT.match(value):
        return f'{value!r} is not a ZeroMQ endpoint like tcp://host:5555'
    if value.startswith('tcp://') and not 0 < int(value.rsplit(':', 1)[1]) < 65536:
        return f'{value!r} has an invalid port'
    return None
