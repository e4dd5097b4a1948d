"""Core law shared by every state: identities, RNG, samplers, paths, publishing, RNG logs, bundles."""
