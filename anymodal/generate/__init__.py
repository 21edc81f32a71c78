"""Sampling: the decoding engine, the per-task pipeline, typed requests and the files they write."""
