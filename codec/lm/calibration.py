"""Fixed calibration text for engine.calibrate: the per-channel input ranges that the smoothed int8
linear layers are balanced with come from one exact-engine pass over these tokens when a model is
converted. Any edit changes the converted weights (bump engine.ENGINE_VERSION with it). Mixed prose,
code, configuration and numbers, like the files a filesystem holds; none of it is benchmark text."""

CALIB_TEXT = r'''Chapter 3. Maintaining the archive

Every night at a quarter past two, the backup job copies the day's changes to the second disk and
writes a short report. When the report says "0 errors", nobody reads it; when it does not, the
person on call opens the log, looks for the first failure, and decides whether to retry. Most
failures are harmless: a file that changed while it was being read, a network share that went away
for a minute. A few are not. In March the controller began to return stale blocks, and for three
weeks the copies were quietly wrong. Since then we verify every copy against its checksum and keep
the last thirty reports.

    $ du -sh /srv/archive/2024-*
    14G     /srv/archive/2024-01
    17G     /srv/archive/2024-02
    9.8G    /srv/archive/2024-03

import hashlib
import os
from dataclasses import dataclass, field


@dataclass
class Manifest:
    """Paths and digests of one snapshot, in the order they were written."""
    root: str
    entries: dict[str, str] = field(default_factory=dict)

    def add(self, path: str) -> None:
        h = hashlib.sha256()
        with open(os.path.join(self.root, path), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        self.entries[path] = h.hexdigest()

    def diff(self, other: "Manifest") -> list[str]:
        return sorted(p for p in self.entries.keys() | other.entries.keys()
                      if self.entries.get(p) != other.entries.get(p))


[server]
listen = 0.0.0.0:8443
workers = 4
timeout_ms = 2500
log_level = "info"   # debug, info, warn, error

Permission is hereby granted to use, copy and modify this document, provided that the notice above
appears in all copies. THE DOCUMENT IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND.

int parse_header(const uint8_t *buf, size_t len, struct header *out) {
    if (len < 16 || memcmp(buf, "ARCH", 4) != 0)
        return -EINVAL;
    out->version = buf[4];
    out->flags = buf[5] | (buf[6] << 8);
    out->size = le64(buf + 8);
    return 0;
}

Q: Why does the restore take longer than the backup?
A: The backup only reads what changed; a restore has to rebuild every file from the last full copy
and each increment after it. On 1.2 million files that is 41 minutes instead of 6.

| date       | files   | bytes      | errors |
|------------|---------|------------|--------|
| 2024-03-11 | 118,204 | 9,874,112  | 0      |
| 2024-03-12 | 118,391 | 10,002,958 | 2      |
'''
