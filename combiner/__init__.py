"""The gRPC front end: servicers translating protobuf to broker calls, server, CLI."""

__version__ = "0.1.0"
