"""Clients for a CoSine deployment: HTTP and gRPC generation, benchmarks."""
