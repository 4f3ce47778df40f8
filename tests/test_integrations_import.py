"""The trainer integrations import lazily: `import saf_kernels` (and `saf_kernels.integrations`)
never imports Lightning or Transformers, whether or not they are installed."""

from __future__ import annotations

import subprocess
import sys


def test_import_saf_kernels_imports_no_trainer():
    trainers = "('lightning', 'pytorch_lightning', 'transformers', 'accelerate')"
    code = ("import sys, saf_kernels, saf_kernels.integrations, saf_kernels.optim; "
            f"bad = sorted(m for m in {trainers} if m in sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
