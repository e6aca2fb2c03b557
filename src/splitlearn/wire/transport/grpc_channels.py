"""What the gRPC transport asks of gRPC: the one method (``/splitlearn.v1.SplitLearning/Connect``),
the channel options (keepalive, message limits, a fixed receive window), a server bound with
mutual TLS (or insecure), and channels dialed to a named peer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from .tls import Credentials

__all__ = ["SERVICE", "METHOD", "PARTY_HEADER", "RUN_HEADER", "KEEPALIVE_MS", "RECEIVE_WINDOW", "channel_options", "make_server",
           "bind", "dial_channel", "peer_name", "why", "Serve"]

SERVICE = "splitlearn.v1.SplitLearning"
METHOD = f"/{SERVICE}/Connect"
PARTY_HEADER = "x-splitlearn-party"
RUN_HEADER = "x-splitlearn-run"  # the run a dialing process belongs to (a party service runs one after another)
KEEPALIVE_MS = 30_000  # detect dead peers and keep idle connections open through NATs
# HTTP/2 flow control with a fixed window: what a peer can park in this party's gRPC buffers, unread, is
# at most this per stream. gRPC's default (BDP probing) grows the window with the link, without bound
# for a peer that floods (100 x 1 MiB parked up to 127 MiB). Measured over an emulated 50 ms link
# (wire/transport/slowlink.py), 2 MiB messages: 8 MiB gives 113 MiB/s, 4 MiB 62, gRPC's own window 119.
RECEIVE_WINDOW = 8 << 20

Serve = Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]


def channel_options(receive_limit: int, send_limit: int) -> list[tuple[str, int]]:
    """Options of both ends: message limits (bytes), keepalive, and the fixed receive window."""
    return [("grpc.max_receive_message_length", receive_limit), ("grpc.max_send_message_length", send_limit),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW)]


def make_server(serve: Serve, pool: ThreadPoolExecutor, options: list[tuple[str, int]]) -> grpc.Server:
    """A server (not bound, not started) whose ``Connect`` streams are ``serve``'s, raw bytes both ways."""
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Connect": grpc.stream_stream_rpc_method_handler(
        serve, request_deserializer=None, response_serializer=None)})
    return grpc.server(pool, handlers=[handler], options=options + [
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 3), ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0)])  # a port in use is an error, not shared


def bind(server: grpc.Server, address: str, credentials: Credentials | None) -> int:
    """Listen on ``address`` (with credentials: TLS, every client's certificate signed by the CA);
    the port bound. A RuntimeError if gRPC cannot."""
    if credentials is None:
        return server.add_insecure_port(address)
    c = credentials
    return server.add_secure_port(address, grpc.ssl_server_credentials([(c.key, c.cert)], root_certificates=c.ca,
                                                                       require_client_auth=True))


def dial_channel(address: str, peer: str, credentials: Credentials | None,
                 options: list[tuple[str, int]]) -> grpc.Channel:
    """A channel to ``peer`` at ``address``, reconnecting with a short backoff; with credentials, the
    listener's certificate must be the CA's for ``peer`` (the TLS target name)."""
    options = options + [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                         ("grpc.max_reconnect_backoff_ms", 2000)]
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    c = credentials
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(c.ca, c.key, c.cert),
                               options=options + [("grpc.ssl_target_name_override", peer)])


def peer_name(context: grpc.ServicerContext, credentials: Credentials | None) -> str:
    """Who dialed in: the CN of its client certificate, or (insecure) the name its header states."""
    if credentials is None:
        return dict(context.invocation_metadata()).get(PARTY_HEADER, "")
    cn = context.auth_context().get("x509_common_name") or [b""]
    return cn[0].decode(errors="replace")


def why(e: BaseException) -> str:
    """What a gRPC error (or call) says of itself: its status and details, else its type."""
    code, details = getattr(e, "code", None), getattr(e, "details", None)
    if callable(code) and callable(details):
        return f"{code().name if code() else '?'}: {details()}"
    return type(e).__name__
