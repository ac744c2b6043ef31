"""Data files shipped inside the package: the GPT-2 BPE ranks (r50k_base.tiktoken) and the
tiny-shakespeare corpus (tinyshakespeare.txt.gz), found next to this file in a checkout, an
editable install and a wheel alike."""
from pathlib import Path

DIR = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The shipped file `name`; FileNotFoundError naming it if the install lacks it."""
    p = DIR / name
    if not p.is_file():
        raise FileNotFoundError(f"{p}: packaged data file missing; reinstall llmc")
    return p
