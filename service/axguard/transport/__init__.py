"""gRPC: the server and its lifecycle (server), the process launcher and workers, the error →
status table (status), interceptors, TLS and tokens (security), torch thread tuning at
start-up (torch_threads), and per protocol a servicer and its converters beside the stubs:
v1/ (axguard.v1, stubs in the client distribution) and oip/ (the Open Inference Protocol)."""

from .launch import launch
from .server import ServerParts, build_server, drain, serve, start_serving

__all__ = ["ServerParts", "build_server", "drain", "launch", "serve", "start_serving"]
