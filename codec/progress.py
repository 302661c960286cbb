"""A progress bar over bytes on a terminal, and nothing otherwise (a pipe, a log, a test): what
`llmfs compress`/`decompress` and `llmfs compact` show while they work. It lives in codec/ so that
the standalone codec can use it without importing the filesystem; the filesystem's commands import
it from here. tqdm is imported only when a bar is really drawn."""

from __future__ import annotations

import sys


class Progress:
    """`update(n)` adds n bytes done; `__call__(done, total)` sets both (a callback for work that
    reports totals, such as compaction). `total` None: unknown (no ETA). Also a context manager
    that closes the bar."""

    def __init__(self, desc: str, total: int | None = None):
        self.desc, self.total = desc, total
        self.tty = sys.stderr.isatty()
        self.bar = None

    def _bar(self):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.desc,
                file=sys.stderr,
                leave=False,
            )
        return self.bar

    def update(self, n: int) -> None:
        if self.tty:
            self._bar().update(n)

    def __call__(self, done: int, total: int, workers: dict[str, int] | None = None) -> None:
        """workers: bytes each worker has done (a compaction on a cluster), shown after the bar."""
        if not self.tty:
            return
        bar = self._bar()
        if workers:
            from tqdm import tqdm

            bar.set_postfix_str(
                " ".join(f"{k}:{tqdm.format_sizeof(v, 'B', 1024)}" for k, v in sorted(workers.items())),
                refresh=False,
            )
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
