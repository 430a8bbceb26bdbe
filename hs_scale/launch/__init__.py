"""Python side of the launchers (launchers/): the Ray Train entry, the DeepSpeed config derived from an hs_scale
config, and local Slurm / Ray clusters for tests and laptops. Every launch path ends in `hs_scale.training.run.train`
with the same config (docs/launching.md)."""
