"""Toy stage types used by the engine's tests (fast, no ML): testing.write, testing.concat, testing.train."""
