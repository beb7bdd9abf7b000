"""Where images come from: the synthetic generator, Harvard Dataverse, a local folder."""
