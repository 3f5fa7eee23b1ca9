"""
Fleet mode: one rrto_server replica per GPU, placed and restarted by Ray.

A directory maps each model digest to the replicas holding it warm, adds
replicas to a model when its load rises and drops them when it falls, and
answers robots over ZeroMQ (:mod:`rrto_wire.fleet`); robots then talk to a
replica directly.  Ray is needed only by :mod:`rrto_fleet.ray_fleet` and
``python -m rrto_fleet``; :mod:`rrto_fleet.replica`,
:mod:`rrto_fleet.directory` and :mod:`rrto_fleet.front` run without it.
"""
