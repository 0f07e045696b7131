"""Hugging Face Space entry point: the page of `pasam app`, from the same code (`pasam_hf.app`).

Spaces run `python app.py` and expect the page on 0.0.0.0:7860. The package comes from `pasam_hf/` beside this file
(copied in before pushing, see README.md), or from this repository's `src/` when run from a checkout.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for candidate in (HERE, HERE.parent / "src"):
    if (candidate / "pasam_hf" / "__init__.py").is_file():
        sys.path.insert(0, str(candidate))
        break

from pasam_hf.app.models import load_app_model  # noqa: E402

# The model the Space serves: a converted PA-SAM (or SAM) checkpoint on the Hub, e.g. "your-name/pa-sam-vit-b"
# (`pasam convert sam_vit_b_01ec64.pth --out pa-sam-vit-b`, then upload it). None serves a small random model, and
# the page says so.
MODEL = None


def main() -> None:
    from pasam_hf.app.ui import serve

    serve(load_app_model(MODEL), host="0.0.0.0", port=7860)


if __name__ == "__main__":
    main()
