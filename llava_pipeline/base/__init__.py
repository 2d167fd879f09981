"""The bottom layer: PipelineError, JSON and hashes, peak RSS, the machine, the .pte's method names,
the config schema and its composition from conf/. Imports nothing of the package above it."""
