"""``import finetune.data`` must stay cheap: the CLI's --help imports it."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_imports_no_heavy_libraries():
    heavy = ("torch", "lightning", "pandas", "transformers", "datasets", "PIL")
    code = (
        "import sys, finetune.data as data\n"
        "assert callable(data.__getattr__)\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_attributes_are_imported_on_first_use():
    import finetune.data as data
    from finetune.data.text import TextClassificationData

    assert data.TextClassificationData is TextClassificationData
    assert set(data.__all__) <= set(dir(data))
