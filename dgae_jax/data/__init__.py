"""Input pipelines: random-access image sources (sources.py) and grain streams (pipeline.py)."""
