"""actors: the Ray actors that wrap the pipeline's stages."""
