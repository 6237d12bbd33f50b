"""UniTAB stages: a unified text-and-box sequence model (pretraining with EMA, grounding + caption evaluation)."""
