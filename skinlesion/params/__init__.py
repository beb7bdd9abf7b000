"""The typed view of params.yaml: one schema module per section, so a stage depends only on the
sections it reads."""
