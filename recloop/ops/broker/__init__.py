"""A real single-node Apache Kafka broker (KRaft) assembled from Maven Central jars.

One job per module, in the order a start takes them:

- ``jars``: which Kafka (``KAFKA_VERSION``), fetching its jars with Maven into a versioned
  cache folder, and how a JVM is started on them;
- ``config``: pure functions for loopback ports, the cluster id, ``server.properties`` and
  JVM flags;
- ``process``: ``LocalBroker``, one broker process (format, start, wait until it accepts
  connections, stop), as the test suite, the benchmarks and the demo run it;
- ``detached``: the broker ``recloop kafka up|down|status`` leaves running, remembered by pid.

The names below are the package's public surface; callers import them from here.
"""

from recloop.ops.broker.config import free_port, port_open, render_properties, server_properties
from recloop.ops.broker.detached import (
    DEFAULT_PORT,
    BrokerState,
    broker_status,
    pid_running,
    read_state,
    runtime_dir,
    start_detached,
    stop_detached,
)
from recloop.ops.broker.jars import (
    KAFKA_VERSION,
    BrokerError,
    LibsInfo,
    ensure_kafka_libs,
    kafka_home,
)
from recloop.ops.broker.process import LocalBroker

__all__ = [
    "DEFAULT_PORT",
    "KAFKA_VERSION",
    "BrokerError",
    "BrokerState",
    "LibsInfo",
    "LocalBroker",
    "broker_status",
    "ensure_kafka_libs",
    "free_port",
    "kafka_home",
    "pid_running",
    "port_open",
    "read_state",
    "render_properties",
    "runtime_dir",
    "server_properties",
    "start_detached",
    "stop_detached",
]
