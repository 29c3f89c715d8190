"""Small helpers shared by every stage of the pipeline: logging, atomic outputs, fingerprints."""
