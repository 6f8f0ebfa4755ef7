"""The Prometheus endpoint: what monitoring needs to see of migrations.

A registry of its own (not the process-global one), served by prometheus-client's
small HTTP server thread on the configured local address."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .errors import ConfigError
from .session import Job


class Metrics:
    def __init__(self, active: Callable[[], int], unresolved: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations = Counter("migd_migrations", "Migrations that ended, by role and result",
                                  ["role", "result"], registry=r)
        self.state_bytes = Counter("migd_state_bytes", "Device state bytes moved, by direction",
                                   ["direction"], registry=r)
        self.wire_bytes = Counter("migd_wire_bytes", "Bytes on the wire, by direction",
                                  ["direction"], registry=r)
        self.throughput = Gauge("migd_last_throughput_bytes_per_second",
                                "State bytes per second of the last completed migration",
                                ["role"], registry=r)
        buckets = (0.001, 0.005, 0.01, 0.05, 0.1, 0.3, 1, 3, 10, 30)
        self.downtime = Histogram("migd_downtime_seconds", "Source stop to destination running",
                                  buckets=buckets, registry=r)
        self.setup = Histogram("migd_setup_seconds", "Connect, authenticate and accept",
                               buckets=buckets, registry=r)
        self.handshakes = Counter(
            "migd_handshakes", "Incoming connections by how their handshake ended: ok, "
            "refused (failed authentication or protocol), timeout (handshake_timeout), "
            "dropped (max_unauthenticated)", ["result"], registry=r)
        for result in ("ok", "refused", "timeout", "dropped"):
            self.handshakes.labels(result)
        self.active = Gauge("migd_active_migrations", "Migrations running now", registry=r)
        self.active.set_function(lambda: float(active()))
        self.unresolved = Gauge("migd_unresolved_migrations",
                                "Migrations whose outcome this host could not learn: a VF is "
                                "held stopped until 'migd resolve'", registry=r)
        self.unresolved.set_function(lambda: float(unresolved()))
        self.address = ""
        self._server: object | None = None

    def serve(self, address: str) -> str:
        host, _, port = address.rpartition(":")
        try:
            server, _ = start_http_server(int(port), host.strip("[]") or "127.0.0.1",
                                          registry=self.registry)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"metrics {address!r}: cannot listen: {exc}") from None
        self._server = server
        bound_host, bound_port = server.server_address[:2]
        if isinstance(bound_host, bytes):
            bound_host = bound_host.decode()
        self.address = f"{bound_host}:{bound_port}"
        return self.address

    def close(self) -> None:
        shutdown = getattr(self._server, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def handshake(self, result: str) -> None:
        self.handshakes.labels(result).inc()

    def finished(self, job: Job) -> None:
        status = job.status.value
        self.migrations.labels(job.role, status).inc()
        direction = "sent" if job.role == "source" else "received"
        self.state_bytes.labels(direction).inc(job.counters.transferred)
        self.wire_bytes.labels(direction).inc(job.counters.wire_bytes)
        if status == "completed":
            self.throughput.labels(job.role).set(job.rate)
            self.setup.observe(job.setup_time_ms / 1000)
            if job.downtime_ms is not None:
                self.downtime.observe(job.downtime_ms / 1000)
