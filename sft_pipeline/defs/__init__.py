"""The Dagster layer in the `dg` layout: one module per lifecycle stage (its assets and checks), plus
resources, the hand-off I/O manager, jobs and automation. `dg.load_from_defs_folder` loads it all."""
