"""Code shared by the training stage packages (imports torch: use only from stage code, never from a spec.py)."""
