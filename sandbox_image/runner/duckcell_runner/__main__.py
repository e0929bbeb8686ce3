"""Start the runner: lock DuckDB, warm every path a query takes, then serve on the socket."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent import futures

import grpc

from launcher.protocol import runner_pb2_grpc as pb_grpc

from .lockdown import RunnerConfig, open_locked
from .service import RunnerService

_MAX_MESSAGE = 64 * 1024 * 1024
# HTTP/2 flow control for the result stream, the same on the launcher's channel
# (``launcher/sandbox/runner_client.py``): gRPC's bandwidth-delay probing, on by default, pings and
# resizes the window as data flows; on this socket a fixed 8 MiB window moved a 160 MB result
# in ~160 ms instead of ~260 ms, with a third less CPU (README, Benchmarks). The launcher's
# 8 MiB window is also the most a runner sends ahead of a launcher that does not read.
FLOW_CONTROL = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8 * 1024 * 1024))


def main() -> None:
    started = time.perf_counter()
    config = RunnerConfig.from_env()
    con = open_locked(config)
    service = RunnerService(
        con,
        default_timeout_s=config.statement_timeout_ms / 1000,
        batch_rows=config.batch_rows,
    )
    service.warm_up(started)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            *FLOW_CONTROL,
        ],
    )
    pb_grpc.add_RunnerServicer_to_server(service, server)
    if os.path.exists(config.socket_path):
        os.unlink(config.socket_path)
    # The launcher may run as another user than the runner; the directory holding the
    # socket is private to that launcher on the host, so the socket itself can be open.
    old_umask = os.umask(0)
    try:
        server.add_insecure_port(f"unix://{config.socket_path}")
        server.start()
    finally:
        os.umask(old_umask)

    # Python as PID 1 ignores SIGTERM by default; stop promptly instead of waiting for SIGKILL.
    def _terminate(signum: int, frame: object) -> None:
        server.stop(0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
