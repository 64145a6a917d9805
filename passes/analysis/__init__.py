"""Analyses the passes share: they read graphs and prove properties, they rewrite nothing.

* :mod:`.fx_utils` — reading FX nodes (example values, calls, in-place writes) and inserting
  calls with their example values.
* :mod:`.causal_mask` — proves an attention mask causal (or says why not) from how the graph
  builds it.
* :mod:`.sequence_window` — proves a block local along the sequence except through its carries
  (scans, causal attention): what lets a block run chunk by chunk.
"""
