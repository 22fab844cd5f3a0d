"""The ingest service: the public write path for customer events (gRPC and Segment-compatible HTTP)."""
