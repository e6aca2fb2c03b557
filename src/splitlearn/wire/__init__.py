"""The wire: tensor codecs, messages and their protobuf form, a party's link (checks, accounting) and the
transports under it (in-process, gRPC with mutual TLS).
"""
