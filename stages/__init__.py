"""The vlflow stage library (imported as vlflow.stages)."""
