"""alignscan's tests. ``REPO`` is the checkout's root, once: tests take it as the session
fixture ``repo_root`` (tests/conftest.py); import-time constants and helpers that many
tests share, where no fixture reaches, import it from here."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
