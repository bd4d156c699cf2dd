"""The latent cache: its file format, reader, writer, the caching job and its benchmark."""
