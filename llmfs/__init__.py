"""llmfs — a FUSE filesystem whose blocks are stored compressed (zstd now, a language model for cold data).

Dependencies point one way: fuseops (the FUSE edge) → namespace (POSIX semantics) → store (LMDB) →
codec (containers and codecs). Errors are typed exceptions below the edge and become errno only in
fuseops.
"""
__version__ = "0.1.0"
