"""Drivers for real devices: SCPI instruments through pyvisa (:mod:`.visa`) and the ZeroMQ client (:mod:`.zmq_client`).

Import the submodule you need; this package imports nothing heavy by itself.
"""
