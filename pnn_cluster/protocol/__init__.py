"""What drivers and servers agree on, declared once: the ZeroMQ wire format and the SCPI instruments.

:mod:`.zmq` is the device server's wire format (protocol version, error
kinds, arrays as raw frames); :mod:`.scpi` is SCPI syntax (headers, numbers,
IEEE 488.2 blocks, error-queue entries) and the declarative instrument
command sets from which both the pyvisa drivers (:mod:`pnn_cluster.drivers`)
and the simulated bench (:mod:`pnn_cluster.servers`) are built. Drivers and
servers import this package and :mod:`pnn_cluster.devices`, never each other.
"""
