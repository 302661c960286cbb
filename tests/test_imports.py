"""Commands that never run the model start without importing torch (about two seconds of start-up):
the filesystem's modules read the LM codec's defaults (the default model's name, the decode batch)
from llmfs.codec.lm, which loads its torch-using submodules only on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_filesystem_modules_and_lm_defaults_do_not_import_torch():
    code = (
        "import sys\n"
        "import llmfs.mount, llmfs.mkfs, llmfs.models, llmfs.statcmd, llmfs.umount, llmfs.compact\n"
        "from llmfs.codec.lm import DECODE_BATCH, DEFAULT_MODEL\n"
        "from llmfs.models import store_spec\n"
        "assert DEFAULT_MODEL == 'smollm2-135m' and DECODE_BATCH >= 1\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_the_lm_package_still_exports_its_codec_lazily():
    from llmfs.codec import lm
    from llmfs.codec.lm.codec import DECODE_BATCH, SEGMENT_TOKENS, LMCodec

    assert lm.LMCodec is LMCodec and lm.SEGMENT_TOKENS == SEGMENT_TOKENS
    assert lm.DECODE_BATCH == DECODE_BATCH
    assert lm.ByteTokenizer().decode(lm.ByteTokenizer().encode(b"\xff a")) == b"\xff a"
