"""Studies: sweeps, ablations and YAML study specs as Optuna studies, their workers, the report.

Layers, each importing only the ones above it (no cycles, no function-level imports):

- `stats`, `variants`: mean/std/t intervals; a LoRA variant (the `lora` section) as data and
  its names (the run-key suffix, the readable slug).
- `grid`: sweep/ablation plans and their points; `storage`: the Optuna storage and studies.
- `records`: run summaries -> report records, identities, deduplication.
- `aggregate` -> `tables`, `plots` -> `report`: cells, comparisons, tables, figures, files.
- `leases`, `reuse`, `child` -> `worker` -> `sweep`: claiming and running points.
- `phases` -> `spec` -> `runner`: YAML study specs, their phases, the round-robin runner.
- `layout`: worker processes and threads per machine (used by `train` for the summary).

This package's `__init__` imports nothing, so importing `loralab.study.layout` (train does)
does not pull in the rest.
"""
