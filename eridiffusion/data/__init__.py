"""Image folders, captions, aspect buckets and the latent / text-embedding cache."""
