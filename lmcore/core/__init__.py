"""Core helpers every layer may use: errors, atomic file writes and hashing, the project layout,
the machine description, the document readers and the registry of labelled tasks. Nothing here
imports another part of lmcore."""
