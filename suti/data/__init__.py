"""Subject-cluster data: the embedded world, folder sources, the TFDS builder, grain loaders."""
