"""llmfs — a FUSE filesystem whose blocks are stored compressed: zstd when written, a language model
once they are cold (docs/design.md).

Dependencies point one way: fuseops (the FUSE edge) → namespace (POSIX semantics) → store (LMDB) →
codec (containers and codecs). Errors are typed exceptions below the edge and become errno only in
fuseops.
"""

__version__ = "0.1.0"
